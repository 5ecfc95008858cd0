import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

from svlib.pruning import (
    ConstantBlock,
    Lagrangian,
    MaskConfig,
    TargetSchedule,
    attach_masks,
    count_macs,
    count_params,
    dense_sizes,
    distill_loss,
    layer_sizes,
    load_pruned_encoder,
    param_groups,
    prune_model,
    save_pruned_encoder,
    shrink_encoder,
)

torch.set_num_threads(2)

FEAT = 16


def tiny_config(**kw) -> Wav2Vec2BertConfig:
    args = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        conv_depthwise_kernel_size=5, feature_projection_input_dim=FEAT,
        left_max_position_embeddings=6, right_max_position_embeddings=2,
    )
    args.update(kw)
    return Wav2Vec2BertConfig(**args)


def tiny_model(seed=0, **kw) -> Wav2Vec2BertModel:
    torch.manual_seed(seed)
    model = Wav2Vec2BertModel(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so folding mistakes show
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 23, FEAT, generator=g)
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    return feats, mask


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_gates(mask_set, seed, empty=()):
    """Random log-alphas; ``empty`` lists (layer, kind) whose gates are all closed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(mask_set.gates):
            for kind, gate in layer.items():
                gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 2.5)
                if (i, kind) in empty:
                    gate.log_alpha.fill_(-1e4)


def all_states(model, feats, mask):
    with torch.no_grad():
        out = model(feats, attention_mask=mask, output_hidden_states=True)
    return torch.stack(out.hidden_states)


def test_dense_count_and_macs_match_the_model():
    for pos in ("relative_key", "relative", None):
        cfg = tiny_config(position_embeddings_type=pos, attn_implementation="eager")
        model = Wav2Vec2BertModel(cfg).eval()
        assert count_params(cfg, dense_sizes(cfg)) == numel(model)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 50, FEAT))
        assert count_macs(cfg, dense_sizes(cfg), seconds=1.0) == counter.get_total_flops() // 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_expected_params_equal_numel_after_shrinking(seed):
    model = tiny_model(seed)
    mask_set = attach_masks(model)
    empty = {(seed % 3, "heads"), ((seed + 1) % 3, "ffn1"), (2, "ffn2")}
    if seed == 3:
        empty |= {(0, "conv"), (0, "ffn1")}
    randomise_gates(mask_set, seed, empty)
    sizes = mask_set.sizes()
    for layer, kind in empty:
        assert sizes[layer][kind] == 0
    predicted = mask_set.deterministic_params()
    # saturated gates make the expectation deterministic: it must hit the same integer
    masks = mask_set.deterministic_masks()
    with torch.no_grad():
        for layer, gates in zip(masks, mask_set.gates):
            for kind, gate in gates.items():
                gate.log_alpha.copy_(torch.where(layer[kind] != 0, 1e4, -1e4))
    assert mask_set.expected_params().item() == predicted
    mask_set.detach()
    shrink_encoder(model, masks)
    assert layer_sizes(model) == sizes
    assert numel(model) == predicted == count_params(model.config, sizes)
    assert predicted < count_params(model.config, dense_sizes(model.config))


def test_expected_params_is_the_mean_count_of_sampled_masks():
    model = tiny_model(5, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6, hidden_size=8)
    mask_set = attach_masks(model, MaskConfig(head_init_keep=0.5, conv_init_keep=0.5))
    randomise_gates(mask_set, 5)
    torch.manual_seed(0)
    counts = []
    for _ in range(3000):
        mask_set.refresh(training=True)
        sizes = [dict(s) for s in mask_set._sizes]
        for layer, cur in zip(sizes, mask_set._current):
            layer.update({k: int((m != 0).sum()) for k, m in cur.items()})
        counts.append(count_params(model.config, sizes))
    mean = sum(counts) / len(counts)
    assert mean == pytest.approx(mask_set.expected_params().item(), rel=0.01)


@pytest.mark.parametrize("pos", ["relative_key", "relative"])
def test_masked_model_equals_shrunk_model(pos):
    model = tiny_model(7, position_embeddings_type=pos)
    feats, mask = padded_batch()
    dense_out = all_states(model, feats, mask)
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 11, empty={(1, "heads"), (2, "ffn2"), (0, "conv")})
    model.eval()
    masked_out = all_states(model, feats, mask)
    assert (masked_out - dense_out).abs().max() > 1e-2  # the masks do something
    masks = mask_set.deterministic_masks()
    assert any(0 < float(v) < 0.999 for layer in masks for m in layer.values() for v in m)  # soft values to fold
    prune_model(model, mask_set)
    assert isinstance(model.encoder.layers[1].self_attn, ConstantBlock)
    assert isinstance(model.encoder.layers[0].conv_module, ConstantBlock)
    shrunk_out = all_states(model, feats, mask)
    assert (shrunk_out - masked_out).abs().max().item() <= 1e-4
    # each padded utterance alone gives the same frames as in the batch
    alone = all_states(model, feats[2:, :6], mask[2:, :6])
    assert (alone[:, 0] - shrunk_out[:, 2, :6]).abs().max().item() <= 1e-4


def test_conv_channels_keep_both_glu_halves_and_layernorm_statistics():
    model = tiny_model(3, num_hidden_layers=1)
    conv = model.encoder.layers[0].conv_module
    channels = conv.depthwise_conv.out_channels
    pw1 = conv.pointwise_conv1.weight.detach().clone()
    keep = torch.tensor([1, 4, 5, 17, 30])
    mask = torch.zeros(channels)
    mask[keep] = torch.tensor([1.0, 0.5, 0.9, 0.25, 1.0])
    feats, att = padded_batch(1)

    mask_set = attach_masks(model, MaskConfig(heads=False, ffn=False))
    mask_set.gates[0]["conv"].deterministic = lambda: mask  # exact soft values for this check
    masked_out = all_states(model, feats, att)
    prune_model(model, mask_set)
    conv = model.encoder.layers[0].conv_module
    # the reference keeps the value half twice; here rows c and c + C (value and gate) are kept
    assert torch.equal(conv.pointwise_conv1.weight, torch.cat([pw1[keep], pw1[keep + channels]]))
    assert conv.depthwise_layer_norm.normalized_shape == (5,)
    assert (all_states(model, feats, att) - masked_out).abs().max().item() <= 1e-4


def test_save_load_round_trip(tmp_path):
    model = tiny_model(9)
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 9, empty={(2, "heads"), (1, "ffn1")})
    prune_model(model, mask_set)
    feats, mask = padded_batch(2)
    before = all_states(model, feats, mask)
    folder = save_pruned_encoder(model, tmp_path / "pruned")
    recorded = json.loads((folder / "config.json").read_text())["svlib_pruned_layers"]
    assert recorded == layer_sizes(model)
    assert recorded[2]["heads"] == 0 and recorded[1]["ffn1"] == 0
    loaded = load_pruned_encoder(folder)
    assert layer_sizes(loaded) == recorded
    assert numel(loaded) == numel(model) == count_params(loaded.config, recorded)
    assert torch.equal(all_states(loaded, feats, mask), before)


def test_training_masks_are_sampled_and_train_the_gates():
    model = tiny_model(4)
    model.train()
    mask_set = attach_masks(model, MaskConfig(head_init_keep=0.5, conv_init_keep=0.5))
    feats, mask = padded_batch(3)
    torch.manual_seed(0)
    out1 = model(feats, attention_mask=mask).last_hidden_state
    first = [dict(layer) for layer in mask_set._current]
    out1.pow(2).mean().backward()
    for layer in mask_set.gates:
        for kind, gate in layer.items():
            assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, kind
    model(feats, attention_mask=mask)
    assert any(not torch.equal(first[i][k], mask_set._current[i][k]) for i in range(3) for k in first[i])
    # eval: deterministic masks, the same every time
    model.eval()
    a, b = all_states(model, feats, mask), all_states(model, feats, mask)
    assert torch.equal(a, b)
    # detaching restores the dense model exactly
    mask_set.detach()
    dense = tiny_model(4)
    assert torch.equal(all_states(model, feats, mask), all_states(dense, feats, mask))


def test_target_schedule_is_a_function_of_the_step():
    sched = TargetSchedule(0.8, warmup_steps=10)
    assert [sched(s) for s in (0, 5, 10, 50)] == [0.0, 0.4, 0.8, 0.8]
    # a training loop that validates in between (any number of times) sees the same targets
    seen_train, seen_with_eval = [], []
    for step in range(12):
        seen_train.append(sched(step))
    for step in range(12):
        seen_with_eval.append(sched(step))
        for _ in range(3):  # validation reads the target for logging
            sched(step)
    assert seen_train == seen_with_eval
    assert TargetSchedule(0.5, 0)(0) == 0.5


def test_target_schedule_start_and_ease_out():
    linear = TargetSchedule(0.8, warmup_steps=10, start=0.2)
    assert [linear(s) for s in (0, 5, 10, 20)] == pytest.approx([0.2, 0.5, 0.8, 0.8])
    ease = TargetSchedule(0.8, warmup_steps=10, start=0.2, shape="ease_out")
    values = [ease(s) for s in range(12)]
    assert values[0] == pytest.approx(0.2) and values[10] == values[11] == 0.8
    assert values[5] == pytest.approx(0.2 + 0.6 * 0.75)   # 1 - (1 - 1/2)^2
    steps = [b - a for a, b in zip(values, values[1:11])]
    assert all(x > y for x, y in zip(steps, steps[1:]))    # decelerating, monotone
    assert steps[-1] < steps[0] / 5
    with pytest.raises(ValueError, match="shape"):
        TargetSchedule(0.5, 10, shape="cosine")


def test_lagrangian_initial_multipliers():
    lagrangian = Lagrangian(lambda2_init=40.0)
    assert lagrangian.lambda1.item() == 0.0 and lagrangian.lambda2.item() == 40.0
    # the spring pulls from the first step: the gradient w.r.t. s is 2 * lambda2 * (s - t)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    lagrangian(s, 0.5).backward()
    assert s.grad.item() == pytest.approx(2 * 40.0 * (0.3 - 0.5))


def test_lagrangian_gradient_signs():
    model = tiny_model(2)
    model.train()
    mask_set = attach_masks(model, MaskConfig(head_init_keep=0.5, conv_init_keep=0.5))
    lagrangian = Lagrangian()
    with torch.no_grad():
        lagrangian.lambda2.fill_(0.1)
    groups = param_groups(model.parameters(), mask_set.log_alphas(), lagrangian)
    assert [g["lr"] for g in groups] == [2e-4, 2e-2, -2e-2]
    opt = torch.optim.AdamW(groups)
    target = 0.9
    start = mask_set.expected_sparsity().item()
    assert start < target
    lam1 = []
    for _ in range(30):
        opt.zero_grad()
        reg = lagrangian(mask_set.expected_sparsity(), target)
        reg.backward()
        if not lam1:
            gap = start - target
            assert lagrangian.lambda1.grad.item() == pytest.approx(gap, rel=1e-5)
            assert lagrangian.lambda2.grad.item() == pytest.approx(gap * gap, rel=1e-5)
            # below target: the constraint pushes every gate towards closing
            assert all((p.grad > 0).all() for p in mask_set.log_alphas())
        opt.step()
        lam1.append(lagrangian.lambda1.item())
    assert lam1[0] < 0 and lam1[-1] < lam1[0]  # ascent: lambda1 follows sign(s - t)
    assert lagrangian.lambda2.item() > 0.1
    assert mask_set.expected_sparsity().item() > start + 0.05


def test_distill_loss_values_and_padding():
    torch.manual_seed(0)
    t = [torch.randn(2, 5, 8) for _ in range(3)]
    same, parts = distill_loss(t, t)
    # identical states: L1 = 0, -log(sigmoid(1)) = log(1 + e^-1) per layer
    assert parts["l1"] == 0.0
    assert same.item() == pytest.approx(3 * torch.log1p(torch.exp(torch.tensor(-1.0))).item(), rel=1e-6)
    raw, _ = distill_loss(t, t, cos_type="raw")
    assert raw.item() == pytest.approx(-3.0, rel=1e-6)
    s = [x + 0.5 for x in t]
    loss, parts = distill_loss(s, t, layers=[0, (2, 1)], cos_weight=0.0)
    expected = 0.5 + (s[2] - t[1]).abs().mean().item()  # state 0 vs 0, student 2 vs teacher 1
    assert parts["l1"] == pytest.approx(expected, rel=1e-6) and loss.item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s_pad = [x.clone() for x in s]
    for x in s_pad:
        x[0, 3:] += 100.0  # padded frames must not count
    a, _ = distill_loss(s, t, attention_mask=mask)
    b, _ = distill_loss(s_pad, t, attention_mask=mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    student = [x.clone().requires_grad_() for x in s]
    distill_loss(student, t)[0].backward()
    assert all(x.grad.abs().sum() > 0 for x in student)


def test_zeroing_channels_before_the_depthwise_layernorm_is_not_removal():
    """Why masks.py restricts the LayerNorm statistics: plain zeroing is not what removal computes."""
    model = tiny_model(6, num_hidden_layers=1)
    naive = tiny_model(6, num_hidden_layers=1)
    feats, att = padded_batch(4)
    mask_set = attach_masks(model, MaskConfig(heads=False, ffn=False))
    randomise_gates(mask_set, 6)
    z = mask_set.deterministic_masks()[0]["conv"]
    assert 0 < int((z == 0).sum()) < z.numel()
    conv = naive.encoder.layers[0].conv_module
    conv.depthwise_conv.register_forward_hook(lambda mod, args, out: out * z[:, None])
    conv.pointwise_conv2.register_forward_pre_hook(lambda mod, args: (args[0] * z[:, None],))
    masked = all_states(model, feats, att)
    zeroed = all_states(naive, feats, att)
    prune_model(model, mask_set)
    shrunk = all_states(model, feats, att)
    assert (shrunk - masked).abs().max().item() <= 1e-4
    assert (shrunk - zeroed).abs().max().item() > 1e-2
