"""The lean relative_key attention (svlib.model.attention) equals HF's stock forward: outputs and gradients,
with padding, shrunk layers, hard-concrete masks, LoRA, bf16, short and long sequences, row blocks; it is
what svlib.model.frontend builds, with the same state dict, and it never allocates the (T, T, d) tensor."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel
from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import Wav2Vec2BertSelfAttention

from svlib.model.attention import (
    BUDGET_ENV,
    LeanRelativeKeyAttention,
    attention_implementation,
    default_implementation,
    relative_distance_index,
    set_attention,
)
from svlib.model.frontend import Frontend, add_lora, build_encoder, encoder_from_config

TOL = 1e-5


def _encoder(seed: int = 0, heads: int = 4, hidden: int = 64, layers: int = 2, dropout: float = 0.0):
    """A stock HF encoder (stock attention) whose distance tables are far from HF's small init."""
    torch.manual_seed(seed)
    config = Wav2Vec2BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=64, output_hidden_size=hidden, attention_dropout=dropout,
                                conformer_conv_dropout=0.0, layerdrop=0.0,
                                apply_spec_augment=False)  # train mode is deterministic but for attention dropout
    model = Wav2Vec2BertModel(config)
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.distance_embedding.weight.normal_(0.0, 1.0)
    return model.eval()


def _inputs(batch: int, frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, frames, 160, generator=g)
    mask = torch.ones(batch, frames, dtype=torch.long)
    for i in range(1, batch):  # every row after the first is padded to a different length
        mask[i, max(1, frames - 7 * i * max(1, frames // 20)):] = 0
    return feats, mask


def _both(model, *args, **kwargs):
    """(stock, lean) outputs of the same model, switching the implementation in place."""
    with torch.no_grad():
        set_attention(model, "stock")
        stock = model(*args, **kwargs).last_hidden_state
        set_attention(model, "lean")
        lean = model(*args, **kwargs).last_hidden_state
    return stock, lean


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("frames", [1, 5, 8, 9, 73, 74, 160])
def test_matches_stock_with_padding(frames):
    model = _encoder()
    feats, mask = _inputs(3, frames)
    stock, lean = _both(model, feats, attention_mask=mask)
    assert attention_implementation(model) == "lean"
    assert stock.abs().max() > 0.1
    assert _max_diff(stock, lean) <= TOL
    stock, lean = _both(model, feats)  # no mask at all: HF passes None to the attention
    assert _max_diff(stock, lean) <= TOL


def test_row_blocks_are_exact(monkeypatch):
    """A small bias budget splits the queries into many blocks (11 rows each here); same result."""
    model = _encoder()
    feats, mask = _inputs(2, 150)
    reference, _ = _both(model, feats, attention_mask=mask)
    monkeypatch.setenv(BUDGET_ENV, str((2 * 4 + 2) * 150 * 11))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(query, *args, **kwargs):
        calls.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    set_attention(model, "lean")
    with torch.no_grad():
        blocked = model(feats, attention_mask=mask).last_hidden_state
    assert calls == 2 * ([11] * 13 + [7])  # 2 layers, 13 blocks of 11 query rows and one of 7
    assert _max_diff(reference, blocked) <= TOL
    monkeypatch.setenv(BUDGET_ENV, "0")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        _both(model, feats, attention_mask=mask)


def test_eager_additive_mask_matches():
    """With attn_implementation='eager' HF hands the attention a float additive mask instead of a bool one."""
    model = _encoder()
    model.config._attn_implementation = "eager"
    for layer in model.encoder.layers:
        layer.self_attn.config._attn_implementation = "eager"
    feats, mask = _inputs(3, 90)
    stock, lean = _both(model, feats, attention_mask=mask)
    assert _max_diff(stock, lean) <= TOL
    # attention weights asked for: the lean module hands over to HF's forward, which returns them
    with torch.no_grad():
        weights = model(feats, attention_mask=mask, output_attentions=True).attentions
    assert attention_implementation(model) == "lean"
    assert len(weights) == 2 and weights[0].shape == (3, 4, 90, 90)
    assert torch.allclose(weights[0].sum(-1), torch.ones(3, 4, 90))


def test_train_mode_gradients_match():
    model = _encoder().train()
    feats, mask = _inputs(3, 100)
    grads = {}
    for kind in ("stock", "lean"):
        set_attention(model, kind)
        model.zero_grad()
        x = feats.clone().requires_grad_(True)
        out = model(x, attention_mask=mask).last_hidden_state
        (out * mask[..., None]).square().sum().backward()
        grads[kind] = {"input": x.grad.clone(), "output": out.detach()}
        grads[kind].update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads["stock"]) == set(grads["lean"])
    assert any("distance_embedding" in n for n in grads["lean"])
    for name, ref in grads["stock"].items():
        scale = max(1.0, ref.abs().max().item())
        assert _max_diff(ref, grads["lean"][name]) <= TOL * scale, name


def test_dropout_only_in_training():
    model = _encoder(dropout=0.5)
    set_attention(model, "lean")
    feats, mask = _inputs(2, 40)
    with torch.no_grad():
        eval_a = model(feats, attention_mask=mask).last_hidden_state
        eval_b = model(feats, attention_mask=mask).last_hidden_state
        model.train()
        train = model(feats, attention_mask=mask).last_hidden_state
    assert torch.equal(eval_a, eval_b)
    assert _max_diff(eval_a, train) > 1e-3


def test_shrunk_layers_match():
    """Per-layer pruned head counts (3 of 4 and 1 of 4 kept, soft mask values folded in)."""
    from svlib.pruning.shrink import layer_sizes, shrink_encoder

    model = _encoder()
    masks = [{"heads": torch.tensor([1.0, 0.0, 0.7, 0.9])}, {"heads": torch.tensor([0.0, 0.0, 0.5, 0.0])}]
    shrink_encoder(model, masks)
    assert [s["heads"] for s in layer_sizes(model)] == [3, 1]
    feats, mask = _inputs(3, 90)
    stock, lean = _both(model, feats, attention_mask=mask)
    assert _max_diff(stock, lean) <= TOL


def test_hard_concrete_masks_match():
    """The heads mask is a pre-hook on linear_out, which the lean forward calls like HF's."""
    from svlib.pruning.masks import attach_masks

    model = _encoder()
    mask_set = attach_masks(model)
    with torch.no_grad():
        for layer in mask_set.gates:
            layer["heads"].log_alpha.normal_(0.0, 3.0)
    feats, mask = _inputs(2, 80)
    stock, lean = _both(model, feats, attention_mask=mask)
    mask_set.detach()
    with torch.no_grad():
        unmasked = model(feats, attention_mask=mask).last_hidden_state
    assert _max_diff(stock, lean) <= TOL
    assert _max_diff(unmasked, lean) > 1e-3  # the masks did act


def test_lora_matches():
    frontend = Frontend(encoder_from_config(_encoder().config)).eval()
    add_lora(frontend, r=4, alpha=8.0, targets=["linear_q", "linear_k", "linear_v", "linear_out"])
    with torch.no_grad():
        for name, p in frontend.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    feats, mask = _inputs(2, 90)
    stock, lean = _both(frontend.encoder, feats, attention_mask=mask)
    assert _max_diff(stock, lean) <= TOL


def test_bf16_autocast_within_bf16_tolerance():
    model = _encoder()
    feats, mask = _inputs(2, 120)
    reference, _ = _both(model, feats, attention_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock, lean = _both(model, feats, attention_mask=mask)
    scale = reference.abs().max().item()
    # bf16 has an 8-bit mantissa (2^-8 = 0.004 relative): both sit at the same bf16 distance from fp32
    assert _max_diff(stock, reference) <= 0.05 * scale
    assert _max_diff(lean, reference) <= 0.05 * scale
    assert _max_diff(stock, lean) <= 0.05 * scale


def test_frontend_builds_lean_with_stock_state_dict(monkeypatch):
    encoder = build_encoder("tiny")
    assert attention_implementation(encoder) == "lean"
    attn = encoder.encoder.layers[0].self_attn
    assert isinstance(attn, Wav2Vec2BertSelfAttention) and type(attn) is LeanRelativeKeyAttention
    stock = Wav2Vec2BertModel(encoder.config)
    assert list(encoder.state_dict()) == list(stock.state_dict())
    clone = copy.deepcopy(encoder)
    assert attention_implementation(clone) == "lean"
    set_attention(clone, "stock")
    assert type(clone.encoder.layers[0].self_attn) is Wav2Vec2BertSelfAttention
    assert attention_implementation(encoder) == "lean"
    monkeypatch.setenv("SVLIB_ATTENTION", "stock")
    assert default_implementation() == "stock"
    assert attention_implementation(build_encoder("tiny")) == "stock"
    monkeypatch.setenv("SVLIB_ATTENTION", "fast")
    with pytest.raises(ValueError, match="SVLIB_ATTENTION"):
        build_encoder("tiny")
    with pytest.raises(ValueError, match="expected one of"):
        set_attention(encoder, "flash")


def test_distance_index_clamps():
    index = relative_distance_index(3, 80, left=64, right=8, device="cpu")
    assert index.shape == (3, 80)
    assert index[0, 0].item() == 64 and index[2, 0].item() == 62  # r - l = 0 and -2
    assert index[0, 8].item() == 72 and index[0, 79].item() == 72  # clamped at +8
    index = relative_distance_index(80, 1, left=64, right=8, device="cpu")
    assert index[79, 0].item() == 0 and index[64, 0].item() == 0 and index[63, 0].item() == 1


def test_no_time_by_time_by_head_dim_allocation():
    """The largest single CPU allocation of a forward: stock builds (T, T, d) floats, lean stays far below."""
    from torch.profiler import ProfilerActivity, profile

    model = _encoder(heads=1, hidden=64, layers=1)  # head dim 64, one head: (T, T, d) is 64x the bias
    feats, mask = _inputs(1, 300)
    txtxd = 300 * 300 * 64 * 4
    largest = {}
    for kind in ("stock", "lean"):
        set_attention(model, kind)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(feats, attention_mask=mask)
        largest[kind] = max(e.self_cpu_memory_usage for e in prof.events())
    assert largest["stock"] >= txtxd
    assert largest["lean"] < txtxd / 8
