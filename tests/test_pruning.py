import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

from svlib.model import structure as shrink_module
from svlib.pruning import (
    ConstantBlock,
    DistillPair,
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
REPO = Path(__file__).resolve().parents[1]
# Every way Python code turns a tensor into a host value; on a GPU each one waits for the device.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def host_reads(*folders: str):
    """Records (method, file:line) for every tensor-to-host conversion called from code under ``folders``
    (repo-relative). CPU tensors make ``torch.cuda.set_sync_debug_mode`` useless here, so the methods are
    wrapped instead."""
    prefixes = tuple(str(REPO / f) for f in folders)
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(prefixes):
                calls.append((name, f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"))
            return method(self, *args, **kwargs)
        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


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
    # the on-device count a training step uses is the same integer
    assert mask_set.param_counts()[1].item() == predicted
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


@pytest.mark.parametrize("pos", ["relative_key", "relative", "rotary"])
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


def test_target_schedule_of_a_tensor_step_equals_the_float_one():
    for sched in (TargetSchedule(0.8, warmup_steps=10), TargetSchedule(0.8, 10, start=0.2, shape="ease_out"),
                  TargetSchedule(0.5, 0)):
        floats = [sched(s) for s in range(13)]
        tensors = [sched(torch.tensor(s)) for s in range(13)]
        assert all(t.dtype == torch.float64 and t.ndim == 0 for t in tensors)
        assert [t.item() for t in tensors] == pytest.approx(floats, abs=1e-15)
        assert tensors[-1].item() == floats[-1] == sched.target   # exactly the target after the warm-up
    assert [TargetSchedule(0.8, warmup_steps=10)(s) for s in (0, 5, 10, 50)] == [0.0, 0.4, 0.8, 0.8]


def distill_objective(mask_set, constrain="expected", warmup_steps=10):
    from svlib.config import from_dict
    from svlib.pruning import DistillConfig, DistillObjective, PruneConfig

    prune = from_dict(PruneConfig, {"target_sparsity": 0.5, "warmup_steps": warmup_steps, "lambda2_init": 1.0,
                                    "constrain": constrain})
    return DistillObjective(DistillConfig(), mask_set.config.num_hidden_layers + 1, prune, mask_set)


def student_and_teacher(model, teacher, feats, mask):
    student = model(feats, attention_mask=mask, output_hidden_states=True).hidden_states
    with torch.no_grad():
        reference = teacher(feats, attention_mask=mask, output_hidden_states=True).hidden_states
    return student, reference, mask


def test_distill_objective_advances_its_step_in_training_only():
    """The target is a function of the training step; evaluating (any number of times) must not move it."""
    model, teacher = tiny_model(1), tiny_model(2)
    mask_set = attach_masks(model)
    objective = distill_objective(mask_set)
    feats, mask = padded_batch()
    outputs = student_and_teacher(model.eval(), teacher, feats, mask)
    objective.eval()
    evaluated = [objective(outputs, None)[2]["target_sparsity"].item() for _ in range(3)]
    assert int(objective.step) == 0 and evaluated == [0.0, 0.0, 0.0]
    objective.train()
    trained = [objective(outputs, None)[2]["target_sparsity"].item() for _ in range(3)]
    assert int(objective.step) == 3 and trained == pytest.approx([0.0, 0.05, 0.1])
    objective.eval()
    assert objective(outputs, None)[2]["target_sparsity"].item() == pytest.approx(0.15)
    assert int(objective.step) == 3
    # the step is a buffer: saved with the objective (the engine checkpoints it) and restored
    fresh = distill_objective(mask_set)
    fresh.load_state_dict(objective.state_dict())
    assert int(fresh.step) == 3


@pytest.mark.parametrize("constrain", ["expected", "deterministic"])
def test_distill_training_step_reads_nothing_back_to_the_host(constrain):
    """A pruning step (masked forward + objective + backward) must not wait for the device: it used to read
    the deterministic parameter count (two host reads per gate group) and whether every conv channel was
    kept (per layer) on every step, ~190 syncs at full size."""
    model, teacher = tiny_model(1), tiny_model(2)
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 3, empty={(0, "ffn1")})
    objective = distill_objective(mask_set, constrain).train()
    feats, mask = padded_batch()
    model.train()
    with host_reads("svlib", "experiments") as calls:
        for _ in range(2):
            loss, _, extras = objective(student_and_teacher(model, teacher, feats, mask), None)
            loss.backward()
    assert calls == []
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in extras.values())
    # and the on-device values are the host ones
    assert extras["deterministic_sparsity"].item() == pytest.approx(
        1 - mask_set.deterministic_params() / mask_set.dense_params, abs=1e-12)
    assert extras["expected_params"].item() == pytest.approx(mask_set.expected_params().item())


class _Batches:
    """An endless in-memory loader for the engine: fixed waves, lengths and (unused) labels."""

    def __init__(self, n=2, samples=8000):
        g = torch.Generator().manual_seed(0)
        self.waves = torch.randn(n, samples, generator=g) * 0.1
        self.lengths = torch.tensor([samples, samples * 3 // 4])[:n]

    def __iter__(self):
        from types import SimpleNamespace

        while True:
            yield SimpleNamespace(waves=self.waves, lengths=self.lengths, labels=torch.zeros(len(self.waves),
                                                                                           dtype=torch.long))


def test_engine_reads_pruning_metrics_only_on_log_steps(tmp_path):
    """Through the engine (prune1's loop): the extras stay on the device between log steps."""
    from svlib.config import from_dict
    from svlib.features import W2VBertFbank
    from svlib.model.frontend import Frontend
    from svlib.model.speaker import SpeakerModelConfig, build_speaker_model
    from svlib.train.engine import TrainConfig, train

    def tiny_frontend():
        return build_speaker_model(from_dict(SpeakerModelConfig, {
            "frontend": {"preset": "tiny"}, "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 32}})).frontend

    torch.manual_seed(0)
    student, teacher = tiny_frontend(), tiny_frontend()
    mask_set = attach_masks(student.encoder)
    pair = DistillPair(Frontend(student.encoder), teacher, mask_set, features=W2VBertFbank())
    objective = distill_objective(mask_set)
    per_step = []
    forward = objective.forward

    def recording_forward(*args):
        per_step.append(len(calls))
        return forward(*args)

    objective.forward = recording_forward
    cfg = from_dict(TrainConfig, {"steps": 5, "log_every": 2, "ckpt_every": 5, "progress": False,
                                  "schedule": {"kind": "constant"}})
    logged = []
    with host_reads("svlib/pruning", "svlib/train/engine.py", "experiments/prune.py") as calls:
        train(pair, objective, _Batches(), cfg, tmp_path, log=lambda record, step: logged.append(step))
    per_step.append(len(calls))
    reads = [b - a for a, b in zip(per_step, per_step[1:])]   # steps 1..5: forward, backward, update, log
    assert [step for step in (1, 2, 3, 4, 5) if reads[step - 1]] == logged == [2, 4, 5]
    assert reads[0] == reads[2] == 0 and reads[1] > 0


def test_distill_pair_feeds_both_encoders_the_teacher_models_features():
    """A teacher trained on un-normalised log-mel is distilled on the same features, never silently on the
    per-utterance normalised default (run_distill's wiring: tests/test_prune_stages.py)."""
    from svlib.config import from_dict
    from svlib.features import W2VBertFbank
    from svlib.model.speaker import SpeakerModelConfig, build_speaker_model

    torch.manual_seed(0)
    teacher = build_speaker_model(from_dict(SpeakerModelConfig, {
        "frontend": {"preset": "tiny"}, "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 32},
        "features": {"normalise": "none"}})).eval()
    student = build_speaker_model(from_dict(SpeakerModelConfig, {
        "frontend": {"preset": "tiny"}, "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 32}})).frontend
    with pytest.raises(TypeError, match="features"):
        DistillPair(student, teacher.frontend)  # no silent default
    pair = DistillPair(student, teacher.frontend, None, features=teacher.features).eval()
    g = torch.Generator().manual_seed(1)
    waves, lengths = 0.1 * torch.randn(2, 16000, generator=g), torch.tensor([16000, 12000])
    with torch.no_grad():
        student_states, teacher_states, mask = pair(waves, lengths)
        feats, expected_mask = W2VBertFbank(normalise="none")(waves, lengths)
        expected = teacher.frontend(feats, expected_mask)
    assert torch.equal(mask, expected_mask)
    assert all(torch.equal(a, b) for a, b in zip(teacher_states, expected))


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
    assert torch.is_tensor(parts["l1"]) and parts["l1"].item() == 0.0
    assert same.item() == pytest.approx(3 * torch.log1p(torch.exp(torch.tensor(-1.0))).item(), rel=1e-6)
    raw, _ = distill_loss(t, t, cos_type="raw")
    assert raw.item() == pytest.approx(-3.0, rel=1e-6)
    s = [x + 0.5 for x in t]
    loss, parts = distill_loss(s, t, layers=[0, (2, 1)], cos_weight=0.0)
    expected = 0.5 + (s[2] - t[1]).abs().mean().item()  # state 0 vs 0, student 2 vs teacher 1
    assert parts["l1"].item() == pytest.approx(expected, rel=1e-6) and loss.item() == pytest.approx(expected, rel=1e-6)
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


def shrunk_tiny_model(pos="relative_key", seed=7, empty=((1, "heads"), (2, "ffn2"), (0, "conv"))):
    """A tiny encoder pruned to uneven widths per layer (random gates) with some blocks removed entirely."""
    model = tiny_model(seed, position_embeddings_type=pos, attn_implementation="eager")
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 11, empty=set(empty))
    prune_model(model.eval(), mask_set)
    return model


def test_removed_blocks_return_fresh_tensors_flop_counter_runs():
    """ConstantBlock returned a zero-stride view of its bias; FlopCounterMode (and anything that needs a
    tensor with its own storage) failed on it."""
    model = shrunk_tiny_model()
    assert isinstance(model.encoder.layers[1].self_attn, ConstantBlock)
    feats = torch.randn(2, 20, FEAT)
    out, _ = model.encoder.layers[1].self_attn(feats.new_zeros(2, 20, 32))
    assert out.stride() == (640, 32, 1) and out.data_ptr() != model.encoder.layers[1].self_attn.bias.data_ptr()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(feats)
    assert counter.get_total_flops() > 0
    # the bias still trains (prune2 fine-tunes the shrunk encoder)
    model.train()
    model(feats).last_hidden_state.sum().backward()
    assert model.encoder.layers[1].self_attn.bias.grad.abs().sum() > 0


def macs_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU flash SDPA kernel (torch registers only the GPU ones; the
    lean attention calls SDPA): 4 * B * H * Tq * Tk * d flops, q k^T and the weighted sum of v."""
    from torch.utils.flop_counter import sdpa_flop_count

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={
        cpu_sdpa: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)})


def _attention_of(model) -> str:
    try:
        from svlib.model.attention import attention_implementation
    except ImportError:  # no lean attention in this tree: HF's forward everywhere
        return "stock"
    return attention_implementation(model) or "stock"


@pytest.mark.parametrize("pos", ["relative_key", "relative", "rotary", None])
def test_count_macs_of_pruned_structures_matches_the_flop_counter(pos):
    """Uneven per-layer heads / FFN units / conv channels (and removed blocks) with whichever relative_key
    attention the front-end installs: count_macs equals torch's FLOP counter / 2."""
    from svlib.model.frontend import encoder_from_config

    torch.manual_seed(3)
    model = encoder_from_config(tiny_config(position_embeddings_type=pos, attn_implementation="eager")).eval()
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 5, empty={(0, "heads"), (1, "ffn1"), (2, "conv")})
    prune_model(model, mask_set)
    sizes = layer_sizes(model)
    assert len({s["heads"] for s in sizes}) > 1 and len({s["ffn2"] for s in sizes}) > 1
    assert len({s["conv"] for s in sizes}) > 1 and sizes[0]["heads"] == 0
    attention = _attention_of(model)
    for frames in (50, 7):   # 7 frames: fewer than the relative distances (the lean term does not shrink)
        with macs_counter() as counter, torch.no_grad():
            model(torch.randn(1, frames, FEAT))
        macs = count_macs(model.config, sizes, seconds=frames / 50, attention=attention)
        assert macs == counter.get_total_flops() // 2, (frames, attention)
    assert macs < count_macs(model.config, dense_sizes(model.config), seconds=frames / 50, attention=attention)


def test_rotary_head_shrinking_refused_on_transformers_4(monkeypatch):
    """transformers 4.x reshapes q/k/v with the layer's num_heads, which rotary shrinking keeps at its
    original value: refuse with a clear error (before any weight changes) rather than compute garbage."""
    model = tiny_model(7, position_embeddings_type="rotary")
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 11)
    masks = mask_set.deterministic_masks()
    assert any(0 < int((m["heads"] != 0).sum()) < 4 for m in masks)
    mask_set.detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(shrink_module, "TRANSFORMERS_VERSION", "4.46.3")
    with pytest.raises(RuntimeError, match=r"rotary attention heads needs transformers >= 5 \(installed: 4.46.3\)"):
        shrink_encoder(model, masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # heads untouched (conv/ffn only) is fine on 4.x; so is everything on 5.x
    shrink_encoder(model, [{k: m for k, m in layer.items() if k != "heads"} for layer in masks])
    monkeypatch.setattr(shrink_module, "TRANSFORMERS_VERSION", "5.0.0")
    shrink_encoder(model, [{"heads": layer["heads"]} for layer in masks])
    assert [s["heads"] for s in layer_sizes(model)] == [int((m["heads"] != 0).sum()) for m in masks]


def test_a_pruned_folder_loads_through_the_model_layer_alone(tmp_path):
    """``load_encoder`` rebuilds a shrunk folder at its recorded widths without importing ``svlib.pruning``
    (the model layer never imports it: tests/test_import_cycles.py)."""
    import subprocess

    model = tiny_model(5)
    mask_set = attach_masks(model)
    randomise_gates(mask_set, 5, empty={(0, "conv")})
    prune_model(model, mask_set)
    folder = save_pruned_encoder(model, tmp_path / "pruned")
    code = ("import json, sys; from svlib.model.frontend import load_encoder; "
            "from svlib.model.structure import layer_sizes; "
            f"encoder = load_encoder({str(folder)!r}); "
            "print(json.dumps([layer_sizes(encoder), sorted(m for m in sys.modules if m.startswith('svlib.pruning'))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    sizes, pruning_modules = json.loads(out.stdout)
    assert sizes == layer_sizes(model) and sizes[0]["conv"] == 0
    assert pruning_modules == []
