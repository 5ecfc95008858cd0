"""Training loop: loss goes down, exact resume (simulated and real SIGKILL), DDP on gloo, atomic checkpoints,
schedules as pure functions of the step."""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker as w  # noqa: E402
from svlib.config import from_dict  # noqa: E402
from svlib.losses import MarginSchedule  # noqa: E402
from svlib.scoring.metrics import compute_eer  # noqa: E402
from svlib.train import checkpoint as ck  # noqa: E402
from svlib.train import engine  # noqa: E402
from svlib.train.engine import OptimConfig, TrainConfig, build_optimizer, train  # noqa: E402
from svlib.train.schedules import ScheduleConfig, apply_lr, lr_factor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOTAL = 12  # steps of the reference run


pytestmark = pytest.mark.usefixtures("one_thread")  # the SIGKILL worker uses one thread as well


@pytest.fixture(scope="module")
def train_data(sv_mini):
    return w.load_speakers("asc", 8, sv_mini)


@pytest.fixture(scope="module")
def val_data(sv_mini):
    # held-out speakers (LibriSpeech part), never seen in training
    waves, labels, _ = w.load_speakers("ls", 6, sv_mini)
    crops = torch.from_numpy(np.stack([w.fit_length(x, 16000) for x in waves]))
    return crops, np.array(labels)


@pytest.fixture(scope="module")
def validate(val_data):
    crops, labels = val_data
    i, j = np.triu_indices(len(labels), k=1)
    trial_labels = (labels[i] == labels[j]).astype(np.int8)

    def run(model):
        emb = torch.nn.functional.normalize(model(crops, torch.full((len(crops),), crops.shape[1])), dim=1)
        scores = (emb[i] * emb[j]).sum(dim=1).numpy()
        return {"eer_pct": 100.0 * compute_eer(scores, trial_labels)[0]}

    return run


def run_fresh(train_data, out, steps, validate=None, resume=False, **overrides):
    waves, labels, utts = train_data
    model, head = w.build(max(labels) + 1)
    loader = w.MiniLoader(waves, labels, utts)
    history = []
    cfg = w.make_config(steps, val_every=4, **overrides) if validate else w.make_config(steps, **overrides)
    result = train(model, head, loader, cfg, out, resume=resume, validate=validate,
                   log=lambda rec, step: history.append((step, rec)))
    return model, head, result, history


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        diff = (sa[k].double() - sb[k].double()).abs().max().item()
        assert diff <= atol, f"{k}: max |diff| {diff}"


@pytest.fixture(scope="module")
def reference(train_data, validate, tmp_path_factory):
    """The uninterrupted run every resume test must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    model, head, result, history = run_fresh(train_data, out, TOTAL, validate=validate)
    return model, head, result, history


# --------------------------------------------------------------------------------------------------- loop

def test_loss_goes_down(train_data, tmp_path):
    waves, labels, utts = train_data
    model, head = w.build(max(labels) + 1, margin=0.2)
    loader = w.MiniLoader(waves, labels, utts, batch_size=16, num_samples=w.LEARN_SAMPLES)
    cfg = w.make_config(30, log_every=5, ckpt_every=100, margin=None,
                        schedule=ScheduleConfig(kind="cosine", warmup_steps=3),
                        optim=OptimConfig(lr_frontend=1e-2, lr_backend=1e-2))
    history = []
    result = train(model, head, loader, cfg, tmp_path, log=lambda rec, step: history.append((step, rec)))
    steps = [s for s, _ in history]
    losses = [r["loss"] for _, r in history]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    assert history[-1][1]["accuracy"] > history[0][1]["accuracy"] + 0.2
    # cosine schedule ends at ~0 and each group keeps its own base rate
    assert history[0][1]["lr_frontend"] == pytest.approx(1e-2 * lr_factor(cfg.schedule, 4, 30))
    assert history[-1][1]["lr_backend"] == pytest.approx(1e-2 * lr_factor(cfg.schedule, 29, 30))
    assert result.final_step == 30 and result.last_checkpoint.name == "ckpt_00000030.pt"


def test_log_records_and_schedules_are_applied(reference):
    _, head, result, history = reference
    train_logs = {s: r for s, r in history if "loss" in r}
    assert sorted(train_logs) == list(range(1, TOTAL + 1))
    cfg = w.make_config(TOTAL)
    for step, rec in train_logs.items():
        factor = lr_factor(cfg.schedule, step - 1)  # record at step s describes update s-1 (0-based)
        assert rec["lr_frontend"] == pytest.approx(2e-3 * factor)
        assert rec["lr_backend"] == pytest.approx(5e-3 * factor)
        assert rec["margin"] == pytest.approx(cfg.margin(step - 1))
        assert set(rec) >= {"loss", "accuracy", "lr_frontend", "lr_backend", "margin", "grad_norm"}
    assert train_logs[1]["lr_backend"] == pytest.approx(5e-3 / 3)   # warm-up 1/3
    assert train_logs[9]["lr_backend"] == pytest.approx(5e-3 * 0.7)  # first decay at update 8
    assert head.margin == pytest.approx(0.2)
    # validation at steps 4, 8, 12 on held-out speakers; best.pt holds the best of them
    val = {s: r["val_eer_pct"] for s, r in history if "val_eer_pct" in r}
    assert sorted(val) == [4, 8, 12]
    best_step = min(val, key=lambda s: (val[s], s))
    assert result.best_step == best_step and result.best_metric == pytest.approx(val[best_step])
    best = ck.load_checkpoint(result.best_checkpoint)
    assert best["step"] == best_step and set(best) >= {"model", "head", "metric"}


# ------------------------------------------------------------------------------------------------ resume

def test_resume_after_stop_matches_uninterrupted(reference, train_data, validate, tmp_path):
    ref_model, ref_head, ref_result, _ = reference
    run_fresh(train_data, tmp_path, 5, validate=validate)  # "killed" after 5 steps (checkpoint at 5)
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_00000005.pt"
    model, head, result, history = run_fresh(train_data, tmp_path, TOTAL, validate=validate, resume=True)
    assert_same_weights(model, ref_model)
    assert_same_weights(head, ref_head)
    assert (result.best_metric, result.best_step) == (ref_result.best_metric, ref_result.best_step)
    assert history[0][0] == 6  # continued, did not restart
    # keep_checkpoints=2: only the two newest step checkpoints survive
    assert [p.name for p in result.checkpoints] == ["ckpt_00000009.pt", "ckpt_00000012.pt"]
    # the optimizer state was restored, not rebuilt: Adam's step counter covers all updates
    state = ck.load_checkpoint(result.last_checkpoint)
    assert all(float(s["step"]) == TOTAL for s in state["optimizer"]["state"].values())
    assert state["loader"] == {"step": TOTAL}


def test_resume_after_sigkill_matches_uninterrupted(reference, train_data, tmp_path):
    ref_model, ref_head, _, _ = reference
    # the reference validated, this run does not: validation must not change the training trajectory
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "ddp_worker.py"), "kill", str(tmp_path), str(TOTAL)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    try:
        while ck.latest_checkpoint(tmp_path) is None:
            assert proc.poll() is None, f"worker exited early:\n{proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["step"]
    assert 3 <= killed_at < TOTAL
    model, head, result, history = run_fresh(train_data, tmp_path, TOTAL, resume=True)
    assert history[0][0] == killed_at + 1
    # bitwise in practice (same build, same thread count); the tolerance only covers another process's
    # kernel choices, which the in-process resume tests above do not have to allow for
    assert_same_weights(model, ref_model, atol=1e-6)
    assert_same_weights(head, ref_head, atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))


def test_amp_request_on_cpu_runs_float32(reference, train_data, tmp_path):
    # fp16 autocast (with its loss scaler) is CUDA-only: on CPU it must neither fail nor change the arithmetic
    ref_model, _, _, _ = reference
    model, _, _, _ = run_fresh(train_data, tmp_path, TOTAL, amp="fp16")
    assert_same_weights(model, ref_model)


def test_bf16_autocast_on_cpu(train_data, tmp_path):
    # amp=bf16 runs the forward in bfloat16 on CPU too (the full-size rehearsal relies on it)
    waves, labels, utts = train_data
    dtypes = []
    runs = {}
    for amp in ("off", "bf16"):
        model, head = w.build(max(labels) + 1)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda mod, args, out: dtypes.append((amp, out.dtype)))
        history = []
        train(model, head, w.MiniLoader(waves, labels, utts), w.make_config(3, amp=amp), tmp_path / amp,
              log=lambda rec, step: history.append(rec["loss"]))
        hook.remove()
        runs[amp] = (model, history)
    assert {d for a, d in dtypes if a == "bf16"} == {torch.bfloat16}
    assert {d for a, d in dtypes if a == "off"} == {torch.float32}
    (fp32, loss32), (bf16, loss16) = runs["off"], runs["bf16"]
    assert all(math.isfinite(x) for x in loss16) and loss16 != loss32  # different arithmetic ...
    assert loss16 == pytest.approx(loss32, rel=0.05)                  # ... to bfloat16 precision
    assert all(p.dtype == torch.float32 for p in bf16.parameters())   # weights and optimizer stay float32
    assert engine.autocast("fp16", "cpu").__class__.__name__ == "nullcontext"


def test_epochs_are_converted_from_the_loaders_steps_per_epoch(train_data, tmp_path, capsys):
    waves, labels, utts = train_data
    model, head = w.build(max(labels) + 1)
    loader = w.MiniLoader(waves, labels, utts)
    loader.steps_per_epoch = 4
    cfg = w.make_config(None, epochs=2.5, ckpt_every=100, ckpt_every_epochs=None,
                        schedule=ScheduleConfig(kind="step", warmup_epochs=0.5, step_size_epochs=1.0, gamma=0.5))
    history = []
    result = train(model, head, loader, cfg, tmp_path, log=lambda rec, step: history.append((step, rec)))
    assert (result.steps, result.steps_per_epoch, result.epochs, result.final_step) == (10, 4, 2.5, 10)
    assert "10 steps; 4 steps/epoch at world size 1 = 2.5 epochs; from epochs=2.5" in capsys.readouterr().out
    lrs = {step: rec["lr_backend"] / 5e-3 for step, rec in history}  # record at step s: update s-1
    assert lrs[1] == pytest.approx(0.5) and lrs[2] == lrs[6] == pytest.approx(1.0)  # warm-up: updates 0, 1
    assert lrs[7] == lrs[10] == pytest.approx(0.5)                                   # x0.5 from update 2 + 4
    assert ck.load_checkpoint(result.last_checkpoint)["config"]["steps"] == 10
    with pytest.raises(ValueError, match="steps_per_epoch is None"):
        train(*w.build(max(labels) + 1), w.MiniLoader(waves, labels, utts), cfg, tmp_path / "b")


def test_setup_distributed_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(engine.TIMEOUT_ENV, raising=False)
    assert engine.setup_distributed() == (1, 2, 0)
    monkeypatch.setenv(engine.TIMEOUT_ENV, "45")
    engine.setup_distributed()
    engine.setup_distributed(timeout_minutes=90.5)  # the argument wins over the environment
    assert calls == [{"backend": "gloo"}, {"backend": "gloo", "timeout": timedelta(minutes=45)},
                     {"backend": "gloo", "timeout": timedelta(minutes=90.5)}]
    monkeypatch.setenv(engine.TIMEOUT_ENV, "ten")
    with pytest.raises(ValueError, match="SVLIB_DIST_TIMEOUT_MINUTES='ten'"):
        engine.setup_distributed()
    with pytest.raises(ValueError, match="positive"):
        engine.setup_distributed(timeout_minutes=0)


def test_resume_takes_learning_rates_from_the_config(train_data, tmp_path):
    run_fresh(train_data, tmp_path, 3)
    run_fresh(train_data, tmp_path, 4, resume=True, optim=OptimConfig(lr_frontend=1e-4, lr_backend=2e-4))
    groups = {g["name"]: g for g in ck.load_checkpoint(tmp_path / "ckpt_00000004.pt")["optimizer"]["param_groups"]}
    assert groups["frontend"]["base_lr"] == 1e-4 and groups["backend"]["base_lr"] == 2e-4
    assert groups["backend"]["lr"] == pytest.approx(2e-4 * lr_factor(w.make_config(4).schedule, 3))


def test_resume_on_another_world_size_is_refused_where_the_ranks_decide_the_step(train_data, tmp_path, capsys):
    """A checkpoint of 2 ranks resumed on 1: refused for an epoch-sharded loader (step 3 would be another part
    of the epoch) and for lengths in epochs (another total and schedule); a speaker-balanced loader with lengths
    in steps continues (each rank's batch i is a function of (seed, i, rank) alone)."""
    run_fresh(train_data, tmp_path, 3)
    path = tmp_path / "ckpt_00000003.pt"
    state = ck.load_checkpoint(path)
    assert state["world_size"] == 1
    state["world_size"], state["rng"] = 2, state["rng"] * 2  # as 2 ranks leave it
    ck.save_checkpoint(path, state)
    waves, labels, utts = train_data

    def resume(cfg, epoch_sharded=False, steps_per_epoch=None):
        loader = w.MiniLoader(waves, labels, utts)
        loader.epoch_sharded, loader.steps_per_epoch = epoch_sharded, steps_per_epoch
        return train(*w.build(max(labels) + 1), loader, cfg, tmp_path, resume=True)

    with pytest.raises(engine.ResumeError) as sharded:
        resume(w.make_config(4), epoch_sharded=True)
    message = str(sharded.value)
    assert "\n" not in message and message.startswith(f"{path}: saved at step 3 by 2 rank(s), resumed on 1: ")
    assert "epoch-mode loader" in message and "finish the stage on 2 rank(s), or start it afresh" in message
    assert "lengths are in epochs" not in message
    with pytest.raises(engine.ResumeError, match=r"by 2 rank\(s\), resumed on 1: its lengths are in epochs"):
        resume(w.make_config(None, epochs=2, ckpt_every=100), steps_per_epoch=2)
    assert ck.list_checkpoints(tmp_path) == [tmp_path / "ckpt_00000003.pt"]  # nothing trained or written
    capsys.readouterr()
    assert resume(w.make_config(4)).final_step == 4  # speaker-balanced, lengths in steps
    assert "saved by 2 ranks, now 1: RNG streams restart per rank" in capsys.readouterr().out


def test_resume_without_checkpoint_starts_fresh(train_data, tmp_path):
    _, _, result, history = run_fresh(train_data, tmp_path, 2, resume=True)
    assert history[0][0] == 1 and result.final_step == 2


def test_failed_checkpoint_write_keeps_previous_and_resume_is_exact(reference, train_data, tmp_path, monkeypatch):
    ref_model, ref_head, _, _ = reference
    real_save = torch.save
    calls = {"n": 0}

    def save_then_crash(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # third checkpoint (step 9): write half a file, then die
            real_save(obj, f, *args, **kwargs)
            f.seek(f.tell() // 2)
            f.truncate()
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        run_fresh(train_data, tmp_path, TOTAL)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_00000003.pt", "ckpt_00000006.pt"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert ck.load_checkpoint(tmp_path / "ckpt_00000006.pt")["step"] == 6
    model, head, _, _ = run_fresh(train_data, tmp_path, TOTAL, resume=True)
    assert_same_weights(model, ref_model)
    assert_same_weights(head, ref_head)


# ---------------------------------------------------------------------------------------------------- DDP

def test_ddp_two_processes_gloo(sv_mini, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), "ddp", str(tmp_path), "24"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for part in ("model", "head"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"ranks differ in {part}.{k}"
    import json
    log = json.loads((tmp_path / "history.json").read_text())
    assert log["world"] == 2 and log["final_step"] == 24
    losses = [rec["loss"] for _, rec in log["history"] if "loss" in rec]
    assert len(losses) == 12
    assert [s for s, rec in log["history"] if "val_eer_pct" in rec] == [8, 16, 24]
    assert log["best_step"] in (8, 16, 24)
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    # only rank 0 writes checkpoints; the final one holds both ranks' RNG streams
    state = ck.load_checkpoint(tmp_path / "run" / "ckpt_00000024.pt")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


@pytest.mark.parametrize("agreement", ["default", "side"])
def test_a_failure_on_one_rank_fails_the_step_on_every_rank_and_the_group_goes_on(sv_mini, tmp_path, agreement):
    """Rank 1's loader raises at batch 3, then (next run) rank 1's forward raises at update 3: both ranks raise
    RankFailure with rank 1's reason within seconds (a hang would last the worker's 60 s process-group timeout);
    then the same process group resumes the first run to its end, on the model whose DDP step was abandoned
    after rank 0's forward: the same weights on both ranks, and bitwise those of an uninterrupted run.
    ``side``: the default group passes for NCCL's, so the agreements run on a gloo side group, created once."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), "fail", str(tmp_path)] + (["side"] if agreement == "side" else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=150)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 50, f"{seconds:.0f} s: something waited for the 60 s process-group timeout"
    reports = [json.loads((tmp_path / f"fail{rank}.json").read_text()) for rank in (0, 1)]
    expected = [("rank 1 failed at step 4 (batch): OSError: utt_x.wav: cannot decode", 4, "OSError"),
                ("rank 1 failed at step 3 (forward): RuntimeError: forward exploded: NaN in the attention logits", 3,
                 "RuntimeError")]
    for report in reports:
        assert report["world"] == 2 and len(report["failures"]) == 2
        for got, (message, step, cause) in zip(report["failures"], expected):
            assert got is not None, f"rank {report['rank']}: train() returned instead of raising RankFailure"
            assert got["message"] == message and got["step"] == step
            assert got["failures"] == {"1": message.split(": ", 1)[1]}
            # the original exception is chained on the failing rank only
            assert got["cause"] == (cause if report["rank"] == 1 else None)
            assert got["seconds"] < 10, got  # not the process group's timeout (60 s)
        assert report["resumed"]["final_step"] == report["reference"]["final_step"] == w.FAIL_STEPS
        groups = report["agreement_groups"]
        if agreement == "default":
            assert groups == [None] * 4  # the default group is gloo: no other group
        else:
            assert groups == [groups[0]] * 4 and groups[0][1] == "gloo"  # one side group for all four runs
    resumed, reference = reports[0]["resumed"]["history"], reports[0]["reference"]["history"]
    assert [s for s, _ in resumed] == [3, 4, 5, 6] and all(math.isfinite(loss) for _, loss in resumed)
    assert resumed == reference[2:]
    weights = [torch.load(tmp_path / f"fail{rank}.pt") for rank in (0, 1)]
    for rank in (0, 1):
        for part in ("model", "head"):
            for k, v in weights[rank]["resumed"][part].items():
                assert torch.equal(v, weights[0]["resumed"][part][k]), f"ranks differ in {part}.{k}"
                assert torch.equal(v, weights[rank]["reference"][part][k]), f"rank {rank}: resume not exact at {k}"


def test_zero_shards_the_adamw_moments_and_trains_exactly_like_plain_ddp(train_data, tmp_path, capsys, monkeypatch):
    """optim.zero on 2 gloo ranks: each rank's AdamW holds the moments of its half of the parameters (disjoint
    halves, balanced); the run is bitwise the plain DDP run (same AdamW arithmetic per parameter, the same losses
    and global grad norms: clipping sees all gradients), with both groups' own rates under the warm-up reaching
    each rank's AdamW; the checkpoint holds the full optimizer state dict, equal to the plain run's; stopping at 3
    and resuming with zero is bitwise the uninterrupted zero run, and so are the resumes across (a plain run's
    checkpoint with zero, a zero run's without). Then the zero checkpoint of 2 ranks resumes in one process,
    where zero is ignored (logged once)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), "zero", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"zero{rank}.json").read_text())["runs"] for rank in (0, 1)]
    weights = [torch.load(tmp_path / f"zero{rank}.pt") for rank in (0, 1)]
    numel = reports[0]["plain"]["numel"]
    total = sum(numel)

    # the partition: every parameter's moments on exactly one rank, about half of them on each
    owned = [set(reports[rank]["zero"]["local_params"]) for rank in (0, 1)]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(len(numel)))
    for rank in (0, 1):
        run = reports[rank]["zero"]
        assert run["sharded"] and not reports[rank]["plain"]["sharded"] and run["fused"] == [None, None]
        assert run["local_numel"] == 2 * sum(numel[i] for i in owned[rank])  # exp_avg + exp_avg_sq
        assert abs(run["local_numel"] - total) <= 2 * max(numel)  # half of the 2 x total a plain AdamW holds
        assert run["consolidated_left"] == 0  # the gathered copies are dropped after each save
        # every group's lr (two rates, set by the schedule on the wrapper) reached this rank's own AdamW
        assert [(g["name"], g["lr"]) for g in run["local_groups"]] == [("frontend", 2e-3), ("backend", 5e-3)]
        assert run["local_groups"] == run["groups"]

    for rank in (0, 1):
        ours = weights[rank]
        for name in ("plain", "zero", "zero_resumed", "plain_to_zero", "zero_to_plain"):
            for part in ("model", "head"):
                for k, v in ours[name][part].items():
                    assert torch.equal(v, weights[0][name][part][k]), f"ranks differ in {name} {part}.{k}"
                    # bitwise: max |diff| 0 (asserted as such; a tolerance would hide a lost lr or moment)
                    assert torch.equal(v, ours["plain"][part][k]), f"rank {rank}: {name} is not plain at {part}.{k}"
    runs = reports[0]
    assert runs["zero"]["history"] == runs["plain"]["history"]  # (step, loss, grad_norm) every step
    assert [s for s, *_ in runs["zero_resumed"]["history"]] == [4, 5, 6]
    assert runs["zero_resumed"]["history"] == runs["zero"]["history"][3:]
    for name in ("zero_resumed", "plain_to_zero", "zero_to_plain"):
        assert runs[name]["final_step"] == w.ZERO_STEPS

    # the checkpoints of the zero runs (resumed ones too) hold the full optimizer state dict: the plain run's
    plain_opt = ck.load_checkpoint(tmp_path / "plain" / "ckpt_00000006.pt")["optimizer"]
    for name in ("zero", "zero_resumed", "plain_to_zero"):
        zero_opt = ck.load_checkpoint(tmp_path / name / "ckpt_00000006.pt")["optimizer"]
        assert zero_opt["param_groups"] == plain_opt["param_groups"], name
        assert sorted(zero_opt["state"]) == sorted(plain_opt["state"]) == list(range(len(numel))), name
        for i, state in zero_opt["state"].items():
            assert state.keys() == plain_opt["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert float(state["step"]) == w.ZERO_STEPS
            for key, value in state.items():
                assert torch.equal(value, plain_opt["state"][i][key]), (name, i, key)
        moments = sum(v.numel() for state in zero_opt["state"].values() for k, v in state.items() if k != "step")
        assert moments == 2 * total
    # pruning-like groups (negative rate, 0-dim multipliers): ZeRO's state dict and weights are a plain AdamW's
    report0 = json.loads((tmp_path / "zero0.json").read_text())
    report1 = json.loads((tmp_path / "zero1.json").read_text())
    assert report0["pruning_groups_state_equal"] and report0["pruning_groups_state_entries"] == 6
    assert report0["pruning_groups_params_equal"] and report1["pruning_groups_params_equal"]
    assert report0["pruning_groups_local_params"] + report1["pruning_groups_local_params"] == 6

    # 2 zero ranks -> one process: zero ignored (logged once), the full state loads into a plain AdamW
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(tmp_path / "zero" / "ckpt_00000003.pt", one)
    waves, labels, utts = train_data
    monkeypatch.setattr(engine, "_zero_ignored_logged", False)  # whatever ran before in this process
    capsys.readouterr()
    for steps in (5, 6):
        model, head = w.build(max(labels) + 1)
        cfg = w.make_config(steps, ckpt_every=3, optim=OptimConfig(lr_frontend=2e-3, lr_backend=5e-3, zero=True))
        result = train(model, head, w.MiniLoader(waves, labels, utts, seed=3), cfg, one, resume=True)
        assert result.final_step == steps
    out = capsys.readouterr().out
    assert out.count("resumed from") == 2 and out.count("optim.zero ignored") == 1
    state = ck.load_checkpoint(one / "ckpt_00000006.pt")["optimizer"]["state"]
    assert sorted(state) == list(range(len(numel))) and all(float(s["step"]) == 6 for s in state.values())


def test_without_a_process_group_step_failures_propagate_and_close_the_loader(train_data, tmp_path, monkeypatch):
    """One process: no agreement, the loader's or the forward's own exception propagates, and the loader's
    iterator is closed on the way out (a DataLoader's workers do not linger)."""
    waves, labels, utts = train_data
    monkeypatch.setattr(engine, "_agree", lambda *a: pytest.fail("an agreement without a process group"))
    loader = w.CorruptShardLoader(waves, labels, utts, fail_at=1, fail_rank=0)
    with pytest.raises(OSError, match="utt_x.wav: cannot decode"):
        train(*w.build(max(labels) + 1), loader, w.make_config(3), tmp_path / "a")
    closed = []

    class ClosingLoader(w.MiniLoader):
        def __iter__(self):
            try:
                yield from super().__iter__()
            finally:
                closed.append(self.step)

    calls = []

    def forward_fails(module, args):  # the second forward raises
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("forward")

    model, head = w.build(max(labels) + 1)
    head.register_forward_pre_hook(forward_fails)
    with pytest.raises(ZeroDivisionError, match="forward") as raised:
        train(model, head, ClosingLoader(waves, labels, utts), w.make_config(3), tmp_path / "b")
    # closed by train() after its second batch: not at garbage collection (the traceback keeps it alive)
    assert closed == [2] and raised.tb is not None


def test_fresh_builds_of_one_config_are_identical():
    """Model, LoRA and head initialisation are seeded from train.seed: two fresh runs start from one point."""
    from experiments.train import TrainStageConfig, initial_head, initial_model
    from svlib.config import load_config

    cfg = load_config(REPO / "experiments" / "configs" / "smoke" / "s1.yaml", TrainStageConfig)

    class Classes:  # what initial_head reads of the loader
        num_classes = 12

    builds = []
    for noise in (0, 1):
        torch.manual_seed(1000 + noise)  # whatever ran before in the process
        np.random.seed(noise)
        torch.rand(noise + 3)
        model = initial_model(cfg, None)
        builds.append((model, initial_head(cfg, model, Classes, None)))
    (m1, h1), (m2, h2) = builds
    assert_same_weights(m1, m2)
    assert_same_weights(h1, h2)
    assert any("lora" in k for k in m1.state_dict())
    other = from_dict(TrainStageConfig, {**{"model": cfg.model, "lora": cfg.lora}, "train": {"seed": 25}})
    m3 = initial_model(other, None)
    s1, s3 = m1.state_dict(), m3.state_dict()
    differ = [k for k in s1 if not torch.equal(s1[k], s3[k])]
    assert len(differ) > len(s1) // 3, "another seed must give other random weights"


def test_sharded_validation_matches_single_process(sv_mini, tmp_path):
    """2 gloo ranks each embed half of the held-out list, rank 0 gathers and scores: same EER as one process;
    inside train() every rank validates (val_every), rank 0 selects."""
    from svlib.evaluate import EvalConfig, evaluate

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), "val", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    got = json.loads((tmp_path / "val.json").read_text())
    val_dir, trials = w.val_set(sv_mini)
    model, _ = w.build(2, seed=0)
    single = evaluate(model, val_dir, {"val": trials}, EvalConfig(max_seconds=w.VAL_SECONDS, progress=False))["val"]
    assert got["world"] == 2 and len(got["scores"]) == len(trials) == 435
    np.testing.assert_allclose(got["scores"], single["scores"], atol=1e-5)
    assert got["eer_pct"] == pytest.approx(single["eer_pct"], abs=1e-9)
    assert got["validate_calls"] == [2, 2] and got["val_steps"] == [1, 2] and got["best_step"] in (1, 2)


def test_evaluation_in_bf16_on_cpu(sv_mini):
    from svlib.evaluate import EvalConfig, extract_embeddings

    val_dir, _ = w.val_set(sv_mini)
    utts = sorted(val_dir.wavs)[:6]
    model, _ = w.build(2, seed=0)
    fp32 = extract_embeddings(model, val_dir, utts, EvalConfig(max_seconds=1.0, progress=False))
    bf16 = extract_embeddings(model, val_dir, utts, EvalConfig(max_seconds=1.0, progress=False, amp="bf16"))
    a, b = fp32.matrix, bf16.matrix
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert bf16.matrix.dtype == np.float32 and not np.array_equal(a, b) and cos.min() > 0.99


# -------------------------------------------------------------------------------------- checkpoint files

def test_atomic_save_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_00000001.pt"
    ck.save_checkpoint(path, {"step": 1, "w": torch.arange(5.0)})
    real_save = torch.save

    def partial_then_raise(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", partial_then_raise)
    with pytest.raises(RuntimeError, match="mid-write"):
        ck.save_checkpoint(path, {"step": 2, "w": torch.zeros(5)})
    monkeypatch.setattr(torch, "save", real_save)
    state = ck.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


# a writer killed in the middle of a checkpoint save: torch.save never returns
KILLED_WRITER = """
import sys, time, torch
from svlib.train.checkpoint import save_checkpoint

def hangs(obj, f, *args, **kwargs):
    print("writing", flush=True)
    time.sleep(600)

torch.save = hangs
save_checkpoint(sys.argv[1], {"step": 3})
"""


def test_temp_files_of_killed_writers_are_removed_at_the_next_save(tmp_path):
    """kill -9 during a save leaves the temporary file (nothing runs its cleanup); the next save removes it,
    since its name says which PID on which host wrote it and that PID is gone, or a zombie nobody reaps (a
    torchrun rank orphaned in a container without an init). A live writer's, another host's and a pre-PID
    name's are kept: their writers may still be at it."""
    writers = [subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / f"ckpt_0000000{k}.pt")],
                                cwd=REPO, stdout=subprocess.PIPE, text=True) for k in (1, 2)]
    reaped, zombie = writers
    try:
        # both mid-write before either dies: a save starting later would already clean up after the first
        assert [writer.stdout.readline() for writer in writers] == ["writing\n"] * 2
        for writer in writers:
            writer.kill()
        reaped.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed writer did not become a zombie"
            time.sleep(0.05)
        left = sorted(p.name for p in tmp_path.glob(".ckpt_*.tmp"))
        assert [name.split(".")[3].split("@")[0] for name in left] == [str(reaped.pid), str(zombie.pid)], left
        host = left[0].split("@")[1].split(".")[0]
        kept = [f".ckpt_00000001.pt.{reaped.pid}@other-{host}.a1b2c3d4.tmp",  # another host: its PIDs mean nothing
                f".ckpt_00000001.pt.{os.getpid()}@{host}.e5f6g7h8.tmp",       # this process: alive
                ".ckpt_00000002.pt.x1y2z3w4.tmp"]                             # no writer recorded
        for name in kept:
            (tmp_path / name).touch()
        ck.save_checkpoint(tmp_path / "ckpt_00000004.pt", {"step": 4})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["ckpt_00000004.pt"])
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="ckpt_00000007.pt: checkpoint not found"):
        ck.load_checkpoint(tmp_path / "ckpt_00000007.pt")
    bad = tmp_path / "ckpt_00000008.pt"
    ck.save_checkpoint(bad, {"step": 8, "w": torch.ones(1000)})
    bad.write_bytes(bad.read_bytes()[:300])  # truncated, as by a non-atomic writer
    with pytest.raises(ck.CheckpointError, match=r"ckpt_00000008\.pt: not a readable checkpoint"):
        ck.load_checkpoint(bad)


def test_latest_and_prune(tmp_path):
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 1, 30):
        ck.save_checkpoint(tmp_path / ck.checkpoint_name(step), {"step": step})
    ck.save_checkpoint(tmp_path / "best.pt", {"step": 2})
    (tmp_path / "ckpt_notes.txt").write_text("not a checkpoint")
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_00000030.pt"  # numeric, not lexicographic by luck
    removed = ck.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt_00000010.pt", "ckpt_00000030.pt",
                                                          "ckpt_notes.txt"]


# ----------------------------------------------------------------------------------------------- schedules

def test_step_decay_schedule():
    cfg = ScheduleConfig(kind="step", warmup_steps=4, step_size=10, gamma=0.5)
    got = [lr_factor(cfg, s) for s in (0, 1, 3, 4, 13, 14, 23, 24, 44)]
    assert got == [0.25, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.0625]


def test_cosine_schedule():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 4, 110) == pytest.approx(0.5)
    assert lr_factor(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 85, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert lr_factor(cfg, 110, 110) == pytest.approx(0.1) == lr_factor(cfg, 500, 110)
    # an explicit decay length wins over the run length (so stop points do not change the schedule)
    fixed = ScheduleConfig(kind="cosine", decay_steps=100)
    assert lr_factor(fixed, 50, 7) == pytest.approx(0.5)
    assert lr_factor(ScheduleConfig(kind="constant", warmup_steps=2), 0) == 0.5
    assert lr_factor(ScheduleConfig(kind="constant"), 10**6) == 1.0


def test_param_groups_and_apply_lr():
    model, head = w.build(4)
    frozen = next(model.frontend.parameters())
    frozen.requires_grad_(False)
    opt = build_optimizer(model, head, OptimConfig(lr_frontend=1e-4, lr_backend=1e-2))
    groups = {g["name"]: g for g in opt.param_groups}
    front = {id(p) for p in model.frontend.parameters() if p.requires_grad}
    assert {id(p) for p in groups["frontend"]["params"]} == front
    assert id(head.weight) in {id(p) for p in groups["backend"]["params"]}
    assert id(frozen) not in {id(p) for g in opt.param_groups for p in g["params"]}
    n_trainable = sum(1 for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    assert apply_lr(opt, 0.5) == {"frontend": 5e-5, "backend": 5e-3}


def test_adamw_is_the_default_implementation_and_resume_takes_it_from_the_code(train_data, tmp_path):
    """AdamW is torch's default implementation (``engine.ADAMW_IMPL``: the committed numbers were trained with it),
    negative group rates included; a checkpoint written by another implementation (fused) resumes with the code's,
    bitwise like an uninterrupted run: moments and step counts are state, the implementation is not."""
    model, head = w.build(4)
    opt = build_optimizer(model, head, OptimConfig())
    assert type(opt) is torch.optim.AdamW and [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, None)] * 2
    up, down = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(model, head, OptimConfig(), param_groups=[
        {"name": "weights", "params": [down], "lr": 0.1}, {"name": "lagrangian", "params": [up], "lr": -0.1}])
    up.grad, down.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert (up > 0.09).all() and (down < -0.09).all()  # ascent at a negative rate, descent at a positive one

    ref_model, ref_head, _, _ = run_fresh(train_data, tmp_path / "ref", 6)
    run_fresh(train_data, tmp_path / "old", 3)
    path = tmp_path / "old" / "ckpt_00000003.pt"
    state = ck.load_checkpoint(path)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None)
    ck.save_checkpoint(path, state)
    model, head, _, _ = run_fresh(train_data, tmp_path / "old", 6, resume=True)
    groups = ck.load_checkpoint(tmp_path / "old" / "ckpt_00000006.pt")["optimizer"]["param_groups"]
    assert [(g["fused"], g["foreach"]) for g in groups] == [(None, None), (None, None)]
    assert_same_weights(model, ref_model)
    assert_same_weights(head, ref_head)


def test_train_config_from_yaml_mapping():
    cfg = from_dict(TrainConfig, {"steps": 50, "amp": "bf16", "optim": {"lr_frontend": "2e-5"},
                                  "schedule": {"kind": "step", "step_size": 10},
                                  "margin": {"final_margin": 0.3, "start_step": 5, "end_step": 20}})
    assert cfg.optim.lr_frontend == 2e-5 and cfg.schedule.kind == "step"
    assert cfg.margin == MarginSchedule(final_margin=0.3, start_step=5, end_step=20)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
