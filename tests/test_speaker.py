import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

from svlib.config import from_dict
from svlib.features import W2VBertFbank
from svlib.model import (
    PRESETS,
    ModelFormatError,
    SpeakerModel,
    SpeakerModelConfig,
    WeightsMismatchError,
    build_speaker_model,
    load_model,
    save_model,
)
from svlib.model.reference import ReferenceCheckpointError, import_reference_checkpoint

torch.set_num_threads(2)

TINY_MFA = {"frontend": {"preset": "tiny"}, "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 24}}


def tiny_model(backend=None, lora=False, seed=0, features=None):
    data = json.loads(json.dumps(TINY_MFA))
    if backend:
        data["backend"] = backend
    if features:
        data["features"] = features
    if lora:
        data["frontend"]["lora"] = {"r": 4, "alpha": 8.0}
        data["frontend"]["freeze"] = True
    torch.manual_seed(seed)
    model = build_speaker_model(from_dict(SpeakerModelConfig, data))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def waves_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.1 * torch.randn(n, generator=g)
    return waves, torch.tensor(lengths)


@pytest.mark.parametrize("backend", [None, {"type": "mhfa", "adapter_dim": 8, "heads": 4, "embed_dim": 24}])
def test_padded_embeddings_equal_single_utterances(backend):
    model = tiny_model(backend)
    lengths = [16000, 9000, 4000]
    waves, lens = waves_batch(lengths)
    with torch.no_grad():
        emb = model(waves, lens)
        assert emb.shape == (3, 24) and model.embed_dim == 24
        for i, n in enumerate(lengths):
            alone = model(waves[i : i + 1, :n], lens[i : i + 1])
            assert (emb[i] - alone[0]).abs().max() < 1e-4


def test_lora_frozen_model_trains_only_lora_and_backend():
    model = tiny_model(lora=True).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("backend.") for n in trainable)
    assert any("lora_" in n for n in trainable) and any(n.startswith("backend.") for n in trainable)
    waves, lens = waves_batch([8000, 6000])
    model(waves, lens).pow(2).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert model.backend.bottleneck.weight.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    model = tiny_model(lora=True)
    waves, lens = waves_batch([12000, 7000])
    meta = {"stage": "train", "eer_pct": 3.5, "steps": 100}
    save_model(model, tmp_path / "m", meta)
    manifest = json.loads((tmp_path / "m" / "svlib_model.json").read_text())
    assert manifest["format_version"] == 1 and manifest["backend"]["adapter_dim"] == 16
    assert (tmp_path / "m" / "encoder" / "config.json").is_file()
    assert all(k.startswith("backend.") for k in load_file(str(tmp_path / "m" / "model.safetensors")))

    loaded = load_model(tmp_path / "m")
    assert not loaded.training and loaded.meta == meta and not loaded.frontend.has_lora
    assert type(loaded.frontend.encoder) is Wav2Vec2BertModel
    with torch.no_grad():
        a = model(waves, lens)
        b = loaded(waves, lens)
    assert (a - b).abs().max() <= 1e-5
    # the encoder folder is a plain HF folder
    hf = Wav2Vec2BertModel.from_pretrained(tmp_path / "m" / "encoder")
    assert sum(p.numel() for p in hf.parameters()) == 41_920

    mhfa = tiny_model({"type": "mhfa", "adapter_dim": 8, "heads": 4, "embed_dim": 24})
    save_model(mhfa, tmp_path / "h", {})
    with torch.no_grad():
        assert (mhfa(waves, lens) - load_model(tmp_path / "h")(waves, lens)).abs().max() == 0.0


def test_feature_normalisation_is_saved_with_the_model(tmp_path):
    """A model on un-normalised log-mel reloads with the same features; a folder without the key (written
    before it existed) loads per-utterance normalised, and an unknown value is a one-line format error."""
    waves, lens = waves_batch([12000, 7000])
    raw = tiny_model(features={"normalise": "none"})
    assert raw.features.normalise == "none" and tiny_model().features.normalise == "utterance"
    save_model(raw, tmp_path / "raw", {})
    manifest_path = tmp_path / "raw" / "svlib_model.json"
    assert json.loads(manifest_path.read_text())["features"] == {"normalise": "none"}
    loaded = load_model(tmp_path / "raw")
    assert loaded.features.normalise == "none"
    with torch.no_grad():
        assert (raw(waves, lens) - loaded(waves, lens)).abs().max() <= 1e-5
        # the normalisation matters to the embedding: the same weights on normalised features differ
        loaded.features = tiny_model().features
        assert (raw(waves, lens) - loaded(waves, lens)).abs().max() > 1e-2
    with pytest.warns(UserWarning, match="pretrained encoder"):
        from_dict(SpeakerModelConfig, {"frontend": {"folder": "models/w2v-bert-2.0"}, "backend": {"type": "mfa"},
                                       "features": {"normalise": "none"}})
    manifest = json.loads(manifest_path.read_text())
    del manifest["features"]
    manifest_path.write_text(json.dumps(manifest))
    assert load_model(tmp_path / "raw").features.normalise == "utterance"
    for bad, message in (({"normalise": "cmvn"}, r"normalise.*'cmvn'"), (None, "features: expected a mapping"),
                         ("none", "features: expected a mapping")):
        manifest["features"] = bad
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(ModelFormatError, match=r"svlib_model.json: .*" + message):
            load_model(tmp_path / "raw")


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="no svlib_model.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="JSON"):
        save_model(tiny_model(), tmp_path / "x", {"bad": object()})
    save_model(tiny_model(), tmp_path / "m", {})
    path = tmp_path / "m" / "svlib_model.json"
    good = json.loads(path.read_text())

    path.write_text(json.dumps({**good, "format_version": 2}))
    with pytest.raises(ModelFormatError, match="format version 2"):
        load_model(tmp_path / "m")
    broken = dict(good)
    del broken["backend"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ModelFormatError, match=r"missing key\(s\) \['backend'\]"):
        load_model(tmp_path / "m")
    path.write_text(json.dumps(good))

    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    del weights["backend.bottleneck.bias"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match="bottleneck.bias"):
        load_model(tmp_path / "m")


# ------------------------------------------------------------------------------------ reference import
def reference_checkpoint(path, seed=0, adapter_dim=16, embed_dim=24, classes=10):
    """A checkpoint in the released layout, at tiny size, with every tensor random."""
    torch.manual_seed(seed)
    encoder = Wav2Vec2BertModel(Wav2Vec2BertConfig(**PRESETS["tiny"], mask_time_prob=0.0))
    spk = {f"front.encoder.{k}": v for k, v in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    num_states, hidden = 3, 32
    for i in range(num_states):
        spk[f"adapter_layers.{i}.0.weight"] = 0.2 * torch.randn(adapter_dim, hidden, generator=g)
        spk[f"adapter_layers.{i}.0.bias"] = 0.1 * torch.randn(adapter_dim, generator=g)
        spk[f"adapter_layers.{i}.1.weight"] = 1 + 0.1 * torch.randn(adapter_dim, generator=g)
        spk[f"adapter_layers.{i}.1.bias"] = 0.1 * torch.randn(adapter_dim, generator=g)
        spk[f"adapter_layers.{i}.3.weight"] = 0.2 * torch.randn(adapter_dim, adapter_dim, generator=g)
        spk[f"adapter_layers.{i}.3.bias"] = 0.1 * torch.randn(adapter_dim, generator=g)
    c = adapter_dim * num_states
    spk["pooling.attention.0.weight"] = 0.1 * torch.randn(adapter_dim, c, 1, generator=g)
    spk["pooling.attention.0.bias"] = 0.1 * torch.randn(adapter_dim, generator=g)
    spk["pooling.attention.2.weight"] = 1 + 0.1 * torch.randn(adapter_dim, generator=g)
    spk["pooling.attention.2.bias"] = 0.1 * torch.randn(adapter_dim, generator=g)
    spk["pooling.attention.2.running_mean"] = 0.1 * torch.randn(adapter_dim, generator=g)
    spk["pooling.attention.2.running_var"] = 0.5 + torch.rand(adapter_dim, generator=g)
    spk["pooling.attention.2.num_batches_tracked"] = torch.tensor(1234)
    spk["pooling.attention.3.weight"] = 0.3 * torch.randn(c, adapter_dim, 1, generator=g)
    spk["pooling.attention.3.bias"] = 0.1 * torch.randn(c, generator=g)
    spk["bottleneck.weight"] = 0.05 * torch.randn(embed_dim, 2 * c, generator=g)
    spk["bottleneck.bias"] = 0.1 * torch.randn(embed_dim, generator=g)
    ckpt = {"modules": {"spk_model": spk, "classifier": {"weight": torch.randn(classes, embed_dim, generator=g)}},
            "epoch_idx": 7}
    torch.save(ckpt, path)
    return ckpt


def reference_forward(spk, feats):
    """The reference recipe's forward for one utterance, from the raw tensors: a stock HF model run layer
    by layer (its forward_w2v_bert), then the Layer-Adapter MFA written out with torch.nn.functional."""
    encoder = Wav2Vec2BertModel(Wav2Vec2BertConfig(**PRESETS["tiny"], mask_time_prob=0.0)).eval()
    encoder.load_state_dict({k[len("front.encoder."):]: v for k, v in spk.items() if k.startswith("front.encoder.")})
    x = encoder.feature_projection(feats)[0]
    states = [x]
    for layer in encoder.encoder.layers:
        out = layer(x)
        x = out[0] if isinstance(out, tuple) else out
        states.append(x)
    adapted = []
    for i, h in enumerate(states):
        a = F.linear(h, spk[f"adapter_layers.{i}.0.weight"], spk[f"adapter_layers.{i}.0.bias"])
        a = F.layer_norm(a, a.shape[-1:], spk[f"adapter_layers.{i}.1.weight"], spk[f"adapter_layers.{i}.1.bias"])
        adapted.append(F.linear(F.relu(a), spk[f"adapter_layers.{i}.3.weight"], spk[f"adapter_layers.{i}.3.bias"]))
    x = torch.cat(adapted, -1).transpose(1, 2)
    w = F.relu(F.conv1d(x, spk["pooling.attention.0.weight"], spk["pooling.attention.0.bias"]))
    w = F.batch_norm(w, spk["pooling.attention.2.running_mean"], spk["pooling.attention.2.running_var"],
                     spk["pooling.attention.2.weight"], spk["pooling.attention.2.bias"], training=False)
    w = torch.softmax(F.conv1d(w, spk["pooling.attention.3.weight"], spk["pooling.attention.3.bias"]), dim=2)
    mu = (x * w).sum(2)
    sigma = ((x * x * w).sum(2) - mu * mu).clamp(min=1e-5).sqrt()
    return F.linear(torch.cat([mu, sigma], 1), spk["bottleneck.weight"], spk["bottleneck.bias"])


def test_reference_checkpoint_import_matches_reference_forward(tmp_path):
    ckpt = reference_checkpoint(tmp_path / "model_lmft_0.14.pth")
    model, classifier = import_reference_checkpoint(tmp_path / "model_lmft_0.14.pth", "tiny")
    assert not model.training and model.meta["epoch_idx"] == 7
    assert torch.equal(classifier, ckpt["modules"]["classifier"]["weight"])
    assert model.backend.pooling.attention[2].num_batches_tracked.item() == 1234

    fbank = W2VBertFbank()
    waves, lens = waves_batch([16000, 11000], seed=5)
    with torch.no_grad():
        ours = model(waves, lens)
        for i in range(2):
            feats, _ = fbank(waves[i : i + 1, : lens[i]], lens[i : i + 1])
            ref = reference_forward(ckpt["modules"]["spk_model"], feats)
            assert (ours[i] - ref[0]).abs().max() < 1e-4
            assert (model.embed_features(feats) - ref).abs().max() < 1e-5

    # an imported model saves and reloads like any other
    save_model(model, tmp_path / "imported", model.meta)
    with torch.no_grad():
        assert (load_model(tmp_path / "imported")(waves, lens) - ours).abs().max() == 0.0


def test_reference_checkpoint_with_unmerged_lora(tmp_path):
    ckpt = reference_checkpoint(tmp_path / "merged.pth")
    spk = ckpt["modules"]["spk_model"]
    g = torch.Generator().manual_seed(9)
    unmerged = {}
    expected_q = None
    for key, value in spk.items():
        if not key.startswith("front.encoder."):
            unmerged[key] = value
            continue
        name = key[len("front.encoder."):]
        if name.endswith(("linear_q.weight", "linear_v.weight")):
            owner = name[: -len(".weight")]
            a, b = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
            unmerged[f"front.encoder.base_model.model.{owner}.base_layer.weight"] = value
            unmerged[f"front.encoder.base_model.model.{owner}.lora_A.default.weight"] = a
            unmerged[f"front.encoder.base_model.model.{owner}.lora_B.default.weight"] = b
            if owner == "encoder.layers.0.self_attn.linear_q":
                expected_q = value + (b @ a) * (8.0 / 4)
        else:
            unmerged[f"front.encoder.base_model.model.{name}"] = value
    torch.save({"modules": {"spk_model": unmerged}}, tmp_path / "unmerged.pth")
    with pytest.raises(ReferenceCheckpointError, match="set frontend.lora"):
        import_reference_checkpoint(tmp_path / "unmerged.pth", "tiny")
    from svlib.model import FrontendConfig, LoraConfig

    model, classifier = import_reference_checkpoint(
        tmp_path / "unmerged.pth", FrontendConfig(preset="tiny", lora=LoraConfig(r=4, alpha=8.0)))
    assert classifier is None
    got = model.frontend.encoder.encoder.layers[0].self_attn.linear_q.weight
    assert torch.allclose(got, expected_q, atol=1e-6)


def test_reference_checkpoint_mismatches_are_all_listed(tmp_path):
    ckpt = reference_checkpoint(tmp_path / "ok.pth")
    spk = ckpt["modules"]["spk_model"]
    del spk["front.encoder.encoder.layers.1.conv_module.depthwise_conv.weight"]
    del spk["adapter_layers.2.3.bias"]
    spk["front.encoder.encoder.layers.0.ffn2.output_dense.weight"] = torch.zeros(32, 65)
    spk["pooling.attention.2.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError) as err:
        import_reference_checkpoint(tmp_path / "bad.pth", "tiny")
    msg = str(err.value)
    for needle in ("encoder.layers.1.conv_module.depthwise_conv.weight", "adapter_layers.2.3.bias",
                   "encoder.layers.0.ffn2.output_dense.weight: model (32, 64) vs checkpoint (32, 65)",
                   "pooling.attention.2.extra"):
        assert needle in msg

    # wrong architecture: a tiny checkpoint read as the small preset
    with pytest.raises(WeightsMismatchError, match="adapter_layers.3.0.weight"):
        import_reference_checkpoint(tmp_path / "ok.pth", "small")
    torch.save({"spk_model": {}}, tmp_path / "other.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"\['modules'\]\['spk_model'\]"):
        import_reference_checkpoint(tmp_path / "other.pth", "tiny")
    stray = {"modules": {"spk_model": {**spk, "classifier_head.weight": torch.zeros(1)}}}
    torch.save(stray, tmp_path / "stray.pth")
    with pytest.raises(WeightsMismatchError, match="classifier_head.weight"):
        import_reference_checkpoint(tmp_path / "stray.pth", "tiny")


def test_speaker_model_is_plain_module_composition():
    model = tiny_model()
    assert isinstance(model, SpeakerModel)
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {"frontend", "backend"}  # fbank buffers are derived, not weights
