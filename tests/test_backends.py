import pytest
import torch
import torch.nn.functional as F

from svlib.config import ConfigError, from_dict
from svlib.model.backends import MHFA, AdapterMFA, BackendConfig, build_backend
from svlib.model.frontend import Frontend, build_encoder, count_parameters

torch.set_num_threads(2)

FULL_ENCODER_PARAMS = 580_492_096
FULL_MFA_PARAMS = 6_160_640  # arXiv 2510.04213: 25 adapters 1024->128->128, ASP over 3200 dims, 6400->256


def states_and_mask(lengths, num_states=3, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = max(lengths)
    states = [torch.randn(len(lengths), frames, dim, generator=g) for _ in range(num_states)]
    mask = torch.zeros(len(lengths), frames, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return states, mask


def with_garbage(states, mask, value):
    return [s.masked_fill(~mask.bool().unsqueeze(-1), value) for s in states]


def test_full_size_parameter_count_on_meta_device():
    with torch.device("meta"):
        encoder = build_encoder("w2v-bert-2.0")
        backend = AdapterMFA(encoder.config.num_hidden_layers + 1, encoder.config.hidden_size)
    assert count_parameters(backend) == FULL_MFA_PARAMS
    assert count_parameters(encoder) + count_parameters(backend) == FULL_ENCODER_PARAMS + FULL_MFA_PARAMS
    shapes = {k: tuple(v.shape) for k, v in backend.state_dict().items()}
    assert shapes["adapter_layers.24.0.weight"] == (128, 1024)
    assert shapes["adapter_layers.24.1.weight"] == (128,)
    assert shapes["adapter_layers.24.3.weight"] == (128, 128)
    assert shapes["pooling.attention.0.weight"] == (128, 3200, 1)
    assert shapes["pooling.attention.2.running_var"] == (128,)
    assert shapes["pooling.attention.3.weight"] == (3200, 128, 1)
    assert shapes["bottleneck.weight"] == (256, 6400) and shapes["bottleneck.bias"] == (256,)
    assert "adapter_layers.25.0.weight" not in shapes


def reference_asp_embedding(backend, states):
    """The reference recipe's Layer-Adapter MFA for one unpadded utterance, written out by hand."""
    sd = backend.state_dict()
    feats = []
    for i, h in enumerate(states):
        a = F.linear(h, sd[f"adapter_layers.{i}.0.weight"], sd[f"adapter_layers.{i}.0.bias"])
        a = F.layer_norm(a, a.shape[-1:], sd[f"adapter_layers.{i}.1.weight"], sd[f"adapter_layers.{i}.1.bias"])
        a = F.linear(F.relu(a), sd[f"adapter_layers.{i}.3.weight"], sd[f"adapter_layers.{i}.3.bias"])
        feats.append(a)
    x = torch.cat(feats, dim=-1).transpose(1, 2)  # [B, C, T]
    w = F.relu(F.conv1d(x, sd["pooling.attention.0.weight"], sd["pooling.attention.0.bias"]))
    w = F.batch_norm(w, sd["pooling.attention.2.running_mean"], sd["pooling.attention.2.running_var"],
                     sd["pooling.attention.2.weight"], sd["pooling.attention.2.bias"], training=False, eps=1e-5)
    w = torch.softmax(F.conv1d(w, sd["pooling.attention.3.weight"], sd["pooling.attention.3.bias"]), dim=2)
    mu = (x * w).sum(2)
    sigma = ((x * x * w).sum(2) - mu * mu).clamp(min=1e-5).sqrt()
    return F.linear(torch.cat([mu, sigma], 1), sd["bottleneck.weight"], sd["bottleneck.bias"])


def randomize_bn(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = backend.pooling.attention[2]
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    bn.weight.data.copy_(torch.randn(bn.num_features, generator=g))


def test_mfa_matches_reference_formula_and_ignores_padding():
    torch.manual_seed(0)
    backend = AdapterMFA(3, 32, adapter_dim=16, embed_dim=24).eval()
    randomize_bn(backend)
    lengths = [20, 13, 4]
    states, mask = states_and_mask(lengths)
    with torch.no_grad():
        batch = backend(with_garbage(states, mask, 1e4), mask)
        assert batch.shape == (3, 24)
        for i, n in enumerate(lengths):
            alone = [s[i : i + 1, :n] for s in states]
            ref = reference_asp_embedding(backend, alone)
            assert (backend(alone) - ref).abs().max() < 1e-5
            assert (batch[i] - ref[0]).abs().max() < 1e-5


def test_mfa_training_batch_norm_uses_real_frames_only():
    torch.manual_seed(1)
    backend = AdapterMFA(3, 32, adapter_dim=16, embed_dim=24).train()
    states, mask = states_and_mask([20, 13, 9])
    a = backend(with_garbage(states, mask, 0.0), mask)
    b = backend(with_garbage(states, mask, -50.0), mask)
    assert (a - b).abs().max() == 0.0
    a.sum().backward()
    assert backend.adapter_layers[0][0].weight.grad.abs().sum() > 0
    # without padding the statistics are BatchNorm1d's own over (batch, time)
    full_states, _ = states_and_mask([11, 11])
    bn = backend.pooling.attention[2]
    mean_before = bn.running_mean.clone()
    backend(full_states)
    x = torch.cat([ad(h) for ad, h in zip(backend.adapter_layers, full_states)], -1).transpose(1, 2)
    h = F.relu(backend.pooling.attention[0](x))
    expected = (1 - bn.momentum) * mean_before + bn.momentum * h.mean(dim=(0, 2))
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)


def test_mhfa_shapes_masking_and_formula():
    torch.manual_seed(2)
    backend = MHFA(3, 32, compression_dim=8, heads=4, embed_dim=20).eval()
    assert {k for k, _ in backend.named_parameters()} == {
        "weights_k", "weights_v", "cmp_linear_k.weight", "cmp_linear_k.bias", "cmp_linear_v.weight",
        "cmp_linear_v.bias", "att_head.weight", "att_head.bias", "pooling_fc.weight", "pooling_fc.bias",
    }
    assert backend.pooling_fc.in_features == 32
    with torch.no_grad():
        backend.weights_k.copy_(torch.tensor([0.5, -1.0, 2.0]))
        backend.weights_v.copy_(torch.tensor([1.0, 0.0, -0.5]))
    lengths = [17, 6]
    states, mask = states_and_mask(lengths, seed=4)
    with torch.no_grad():
        batch = backend(with_garbage(states, mask, 1e4), mask)
        assert batch.shape == (2, 20)
        for i, n in enumerate(lengths):
            hs = torch.stack([s[i, :n] for s in states])  # [L, T, D]
            k = torch.einsum("l,ltd->td", torch.softmax(backend.weights_k, 0), hs)
            v = torch.einsum("l,ltd->td", torch.softmax(backend.weights_v, 0), hs)
            k, v = backend.cmp_linear_k(k), backend.cmp_linear_v(v)
            att = torch.softmax(backend.att_head(k), dim=0)  # [T, H]
            pooled = att.T @ v  # [H, C]
            ref = backend.pooling_fc(pooled.reshape(-1))
            assert (batch[i] - ref).abs().max() < 1e-5


def test_mhfa_full_size_count():
    with torch.device("meta"):
        backend = build_backend(BackendConfig(type="mhfa"), 25, 1024)
    # 2 x 25 layer weights, 2 x (1024*128 + 128), 128*64 + 64, 64*128*256 + 256
    assert count_parameters(backend) == 50 + 2 * (1024 * 128 + 128) + (128 * 64 + 64) + (64 * 128 * 256 + 256)


def test_backend_config_and_input_errors():
    cfg = from_dict(BackendConfig, {"type": "mhfa", "heads": 8})
    assert isinstance(build_backend(cfg, 3, 32), MHFA)
    assert build_backend(cfg, 3, 32).to_config() == BackendConfig(type="mhfa", heads=8)
    assert AdapterMFA(3, 32, 16, 24).to_config() == BackendConfig(type="mfa", adapter_dim=16, embed_dim=24)
    with pytest.raises(ConfigError, match="backend.type"):
        from_dict(BackendConfig, {"type": "xvector"}, "backend")
    with pytest.raises(ConfigError, match="embed_dim"):
        BackendConfig(embed_dim=0)
    backend = AdapterMFA(3, 32, 16, 24)
    states, mask = states_and_mask([5, 3])
    with pytest.raises(ValueError, match="expected 3 hidden states"):
        backend(states[:2], mask)
    with pytest.raises(ValueError, match=r"\[batch, frames, 32\]"):
        backend([s[..., :16] for s in states], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        backend(states, mask[:, :3])
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one"):
        backend(states, mask)


@pytest.mark.parametrize("kind", ["mfa", "mhfa"])
def test_embed_norm_removes_the_shared_component_and_round_trips(kind, tmp_path):
    """A from-scratch encoder's embeddings share one big direction (near-equal pooled std's); the embedding
    BatchNorm takes it out in training and applies its running statistics at inference."""
    from svlib.model.speaker import SpeakerModel, load_model, save_model

    torch.manual_seed(0)
    cfg = from_dict(BackendConfig, {"type": kind, "adapter_dim": 16, "heads": 4, "embed_dim": 24, "embed_norm": True})
    plain = build_backend(from_dict(BackendConfig, {"type": kind, "adapter_dim": 16, "heads": 4, "embed_dim": 24}),
                          3, 32)
    normed = build_backend(cfg, 3, 32)
    assert count_parameters(normed) == count_parameters(plain) + 2 * 24  # gamma and beta
    assert normed.to_config().embed_norm is True and plain.to_config().embed_norm is False
    # a shared offset on every frame of every utterance: the plain embeddings all point the same way
    states, mask = states_and_mask([20, 18, 16, 14, 12, 10, 9, 8])
    states = [s + 5.0 for s in states]
    normed.load_state_dict(plain.state_dict(), strict=False)  # same weights, only the norm differs
    with torch.no_grad():
        cos = lambda e: F.cosine_similarity(e[:, None], e[None], dim=-1)[~torch.eye(len(e), dtype=torch.bool)]
        e_plain = plain.train()(states, mask)
        e_norm = normed.train()(states, mask)
        assert cos(e_plain).mean() > 0.9
        assert cos(e_norm).mean().abs() < 0.2
        assert e_norm.mean(0).abs().max() < 1e-5  # training mode: batch statistics, beta = 0
        # inference uses the running statistics, so a single utterance works and does not depend on its batch
        normed.eval()
        one = normed([s[:1, :20] for s in states])
        batch = normed(states, mask)
        assert (one[0] - batch[0]).abs().max() < 1e-5
    # and the model folder keeps it
    model = SpeakerModel(Frontend(build_encoder("tiny")), build_backend(cfg, 3, 32)).eval()
    save_model(model, tmp_path / "m", {})
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.backend.embed_norm, torch.nn.BatchNorm1d)
    waves = 0.1 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(waves, torch.tensor([8000, 6000])) - loaded(waves, torch.tensor([8000, 6000]))).abs().max() == 0


def test_backend_reads_only_the_states_it_is_given():
    """``states=[1, 2]`` reads states 1 and 2 of 3 and nothing else: equal to a 2-state back-end with the same
    weights on those two, unchanged by state 0, and the choice survives the model folder."""
    torch.manual_seed(0)
    states = [torch.randn(2, 7, 32) for _ in range(3)]
    for cls, kwargs in ((AdapterMFA, {"adapter_dim": 16, "embed_dim": 24}),
                        (MHFA, {"compression_dim": 8, "heads": 4, "embed_dim": 20})):
        picked = cls(3, 32, states=[1, 2], **kwargs).eval()
        plain = cls(2, 32, **kwargs).eval()
        plain.load_state_dict(picked.state_dict())
        with torch.no_grad():
            out = picked(states)
            assert torch.allclose(out, plain(states[1:]), atol=1e-6)
            assert torch.equal(out, picked([torch.zeros_like(states[0])] + states[1:]))
        assert picked.to_config().states == [1, 2] and cls(3, 32, **kwargs).to_config().states is None
    for bad in ([3], [-1], [1, 1]):
        with pytest.raises(ConfigError, match=r"distinct indices in \[0, 3\)"):
            AdapterMFA(3, 32, states=bad)
    assert AdapterMFA(3, 32, states=[2, 0]).to_config().states == [0, 2]  # saved in adapter order
    with pytest.raises(ConfigError, match="distinct non-negative"):
        BackendConfig(states=[1, 1])


def test_model_folder_keeps_the_states_choice(tmp_path):
    from svlib.config import from_dict
    from svlib.model.speaker import SpeakerModelConfig, build_speaker_model, load_model, save_model

    model = build_speaker_model(from_dict(SpeakerModelConfig, {
        "frontend": {"preset": "tiny"}, "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 32,
                                                    "states": [2, 1]}})).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.backend.states == [1, 2] and len(loaded.backend.adapter_layers) == 2
    waves, lengths = 0.1 * torch.randn(2, 16000), torch.tensor([16000, 12000])
    with torch.no_grad():
        assert torch.equal(model(waves, lengths), loaded(waves, lengths))
