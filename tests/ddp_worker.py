"""Tiny speaker model + deterministic loader over real sv-mini audio, for the training-engine tests.

Imported by tests/test_engine.py, and run as a script in these modes:

* ``python tests/ddp_worker.py kill OUT`` trains slowly (a sleeping log callback) so that the test can
  SIGKILL it after its first checkpoint appears;
* ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py ddp OUT`` trains with DDP on
  gloo; each rank writes its final weights and rank 0 its log to OUT.
* ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py val OUT`` evaluates the
  held-out list sharded over the ranks (``svlib.evaluate``, ``distributed=True``), then trains a few steps
  validating that way on every rank; rank 0 writes the scores and the log to OUT.
* ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py fail OUT [side]`` makes rank 1 fail in
  one process group: its loader at a batch, then its forward at a step (``RankFailure`` expected on both ranks,
  the exceptions kept alive as a sweep keeps them); then resumes the first run healthily and trains an
  uninterrupted reference; each rank writes what it saw to OUT/fail{rank}.json and its weights to OUT/fail{rank}.pt.
  With ``side`` the default group passes for an NCCL one, so the step agreements run on the engine's gloo side
  group (what a GPU job does).
* ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py zero OUT`` trains the same 6 steps
  (checkpoints every 3) with plain DDP, with ZeRO (``optim.zero``), with ZeRO stopped at 3 and resumed, and
  resumed at 3 across (a plain run's checkpoint with ZeRO, a ZeRO run's without); each rank writes what its
  optimizers held and the runs' logs to OUT/zero{rank}.json and its final weights to OUT/zero{rank}.pt.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # script mode: make svlib importable without installation

from svlib.audio import fit_length, load_audio  # noqa: E402
from svlib.losses import AAMSoftmax, MarginSchedule  # noqa: E402
from svlib.train import engine  # noqa: E402
from svlib.train.engine import OptimConfig, RankFailure, TrainConfig, setup_distributed, train  # noqa: E402
from svlib.train.schedules import ScheduleConfig  # noqa: E402

SV_MINI = REPO.parent / "shared" / "data" / "sv-mini"
SAMPLES = 4800  # 0.3 s crops: enough to test the loop's arithmetic cheaply
LEARN_SAMPLES = 8000  # 0.5 s: what the tests that must see the loss fall use

Batch = namedtuple("Batch", "waves lengths labels utts")


def load_speakers(prefix: str, num_speakers: int, root: Path = SV_MINI):
    """(waves, labels, utts) of all utterances of the first ``num_speakers`` speakers named ``prefix*``."""
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    speakers = sorted({r["speaker"] for r in rows if r["speaker"].startswith(prefix)})[:num_speakers]
    index = {s: i for i, s in enumerate(speakers)}
    waves, labels, utts = [], [], []
    for r in rows:
        if r["speaker"] in index:
            waves.append(load_audio(root / r["path"]))
            labels.append(index[r["speaker"]])
            utts.append(r["path"])
    return waves, labels, utts


class MiniLoader:
    """Endless batches; batch i is a pure function of (seed, i, rank), so ``{"step": i}`` is all the state."""

    def __init__(self, waves, labels, utts, batch_size=8, seed=0, rank=0, num_samples=SAMPLES):
        self.waves, self.labels, self.utts = waves, labels, utts
        self.batch_size, self.seed, self.rank, self.num_samples = batch_size, seed, rank, num_samples
        self.num_classes = max(labels) + 1
        self.step = 0

    def batch(self, i: int) -> Batch:
        rng = np.random.default_rng([self.seed, i, self.rank])
        idx = rng.choice(len(self.waves), size=self.batch_size, replace=False)
        lengths = rng.integers(self.num_samples * 3 // 4, self.num_samples + 1, size=self.batch_size)
        out = np.zeros((self.batch_size, self.num_samples), dtype=np.float32)
        for row, (j, n) in enumerate(zip(idx, lengths)):
            out[row, :n] = fit_length(self.waves[j], int(n), rng)
        return Batch(torch.from_numpy(out), torch.from_numpy(lengths).long(),
                     torch.tensor([self.labels[j] for j in idx]), [self.utts[j] for j in idx])

    def __iter__(self):
        while True:
            b = self.batch(self.step)
            self.step += 1
            yield b

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class CorruptShardLoader(MiniLoader):
    """A MiniLoader whose rank ``fail_rank`` cannot decode a file of its shard at batch ``fail_at`` (its iterator
    raises OSError there, as a data loader does); the other ranks' batches are a MiniLoader's."""

    def __init__(self, *args, fail_at: int, fail_rank: int = 1, bad_file: str = "utt_x.wav", **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.fail_rank, self.bad_file = fail_at, fail_rank, bad_file

    def batch(self, i: int) -> Batch:
        if self.rank == self.fail_rank and i == self.fail_at:
            raise OSError(f"{self.bad_file}: cannot decode")
        return super().batch(i)


FAIL_STEPS = 6  # the fail mode's runs: 6 steps, checkpoints every 2
ZERO_STEPS = 6  # the zero mode's runs: 6 steps, checkpoints every 3


class TinyFrontend(nn.Module):
    """Log band energies of a 25/10 ms STFT, then two convolutions: (waves, lengths) -> (B, C, T), frames valid."""

    def __init__(self, bands=40, channels=64):
        super().__init__()
        self.bands = bands
        self.register_buffer("window", torch.hann_window(400), persistent=False)
        self.conv1 = nn.Conv1d(bands, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, waves, lengths):
        spec = torch.stft(waves, 512, 160, 400, self.window, center=False, return_complex=True).abs() ** 2
        feats = torch.log(F.adaptive_avg_pool1d(spec[:, 1:].transpose(1, 2), self.bands) + 1e-6).transpose(1, 2)
        feats = feats - feats.mean(dim=2, keepdim=True)
        frames = ((lengths - 400) // 160 + 1).clamp(min=1)
        x = F.relu(self.conv1(feats))
        return F.relu(self.conv2(x)), frames


class TinyBackend(nn.Module):
    """Masked mean + std pooling over valid frames, dropout, linear embedding."""

    def __init__(self, channels=64, embed_dim=32, dropout=0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(2 * channels, embed_dim)

    def forward(self, x, frames):
        mask = (torch.arange(x.shape[2], device=x.device)[None] < frames[:, None]).to(x.dtype)[:, None]
        n = mask.sum(dim=2)
        mean = (x * mask).sum(dim=2) / n
        var = (((x - mean[..., None]) ** 2) * mask).sum(dim=2) / n
        return self.proj(self.dropout(torch.cat([mean, var.clamp(min=1e-6).sqrt()], dim=1)))


class TinySpeakerModel(nn.Module):
    """Same signature as svlib's SpeakerModel: forward(waves, lengths) -> (B, E); has .frontend / .backend."""

    def __init__(self, embed_dim=32):
        super().__init__()
        self.frontend = TinyFrontend()
        self.backend = TinyBackend(embed_dim=embed_dim)
        self.embed_dim = embed_dim

    def forward(self, waves, lengths):
        return self.backend(*self.frontend(waves, lengths))


def build_model() -> nn.Module:
    """svlib's SpeakerModel with the ``tiny`` encoder preset; the stand-in above if svlib.model is absent."""
    try:
        from svlib.model.backends import BackendConfig
        from svlib.model.frontend import FrontendConfig
        from svlib.model.speaker import SpeakerModelConfig, build_speaker_model
    except ImportError:
        return TinySpeakerModel()
    return build_speaker_model(SpeakerModelConfig(frontend=FrontendConfig(preset="tiny"),
                                                  backend=BackendConfig(type="mfa", adapter_dim=16, embed_dim=32)))


def build(num_classes: int, seed: int = 0, margin: float = 0.2) -> tuple[nn.Module, AAMSoftmax]:
    torch.manual_seed(seed)
    model = build_model()
    head = AAMSoftmax(model.embed_dim, num_classes, scale=16.0, margin=margin)
    return model, head


def make_config(steps: int, **overrides) -> TrainConfig:
    cfg = dict(
        steps=steps, log_every=1, ckpt_every=3, keep_checkpoints=2, grad_clip=3.0, seed=7, progress=False,
        optim=OptimConfig(lr_frontend=2e-3, lr_backend=5e-3, weight_decay=1e-4),
        # step decay keeps lr independent of cfg.steps, so runs with different stop points share one schedule
        schedule=ScheduleConfig(kind="step", warmup_steps=3, step_size=5, gamma=0.7),
        margin=MarginSchedule(final_margin=0.2, start_step=2, end_step=8, kind="linear"),
    )
    cfg.update(overrides)
    return TrainConfig(**cfg)


def val_set(root: Path = SV_MINI, prefix: str = "ls"):
    """(DataDir, Trials): the held-out speakers ``prefix*`` of sv-mini, all pairs of their utterances."""
    from svlib.data.lists import DataDir, Trials

    rows = [r for r in csv.DictReader(open(root / "manifest.csv")) if r["speaker"].startswith(prefix)]
    wavs = {Path(r["path"]).with_suffix("").as_posix().replace("/", "-"): str(root / r["path"]) for r in rows}
    utt2spk = {Path(r["path"]).with_suffix("").as_posix().replace("/", "-"): r["speaker"] for r in rows}
    utts = sorted(wavs)
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:]]
    trials = Trials([a for a, _ in pairs], [b for _, b in pairs],
                    np.array([utt2spk[a] == utt2spk[b] for a, b in pairs], dtype=np.int8))
    return DataDir(wavs=wavs, utt2spk=utt2spk), trials


VAL_SECONDS = 1.0  # evaluation crops in the val mode: the arithmetic is what is tested, not the model


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    if mode == "kill":
        torch.set_num_threads(1)  # same as the pytest process it is compared with (test_engine.one_thread)
        waves, labels, utts = load_speakers("asc", 8)
        model, head = build(max(labels) + 1)
        loader = MiniLoader(waves, labels, utts)
        # A slow step gives the parent time to see the first checkpoint and kill us mid-run.
        train(model, head, loader, make_config(int(argv[2])), out, log=lambda rec, step: time.sleep(0.3))
    elif mode == "ddp":
        torch.set_num_threads(1)  # two ranks on two cores
        rank, world, _ = setup_distributed()
        waves, labels, utts = load_speakers("asc", 8)
        model, head = build(max(labels) + 1, seed=100 + rank)  # different init: DDP must broadcast rank 0's
        loader = MiniLoader(waves, labels, utts, seed=3, rank=rank, num_samples=LEARN_SAMPLES)
        history = []
        # fixed margin: a margin warm-up raises the loss early on, which would hide whether training works
        cfg = make_config(int(argv[2]), log_every=2, ckpt_every=100, margin=None, val_every=8,
                          schedule=ScheduleConfig(kind="cosine", warmup_steps=3),
                          optim=OptimConfig(lr_frontend=1e-2, lr_backend=1e-2))
        probe = loader.batch(10**6)

        def validate(m):  # a stand-in metric; given on rank 0 only, as a launcher script may well do
            return {"eer_pct": float(m(probe.waves, probe.lengths).norm(dim=1).std())}

        result = train(model, head, loader, cfg, out / "run", validate=validate if rank == 0 else None,
                       log=lambda rec, step: history.append((step, rec)))
        torch.save({"model": model.state_dict(), "head": head.state_dict()}, out / f"rank{rank}.pt")
        if rank == 0:
            (out / "history.json").write_text(json.dumps({"history": history, "final_step": result.final_step,
                                                          "world": world, "best_step": result.best_step}))
        torch.distributed.barrier()  # every rank done before any tears its gloo group down
        torch.distributed.destroy_process_group()
    elif mode == "val":
        from svlib.evaluate import EvalConfig, evaluate

        torch.set_num_threads(1)
        rank, world, _ = setup_distributed(timeout_minutes=5)
        val_dir, trials = val_set()
        eval_cfg = EvalConfig(max_seconds=VAL_SECONDS, progress=False)
        model, _ = build(2, seed=0)  # the same weights on every rank
        sharded = evaluate(model, val_dir, {"val": trials}, eval_cfg, distributed=True)
        assert (sharded is None) == (rank != 0)

        waves, labels, utts = load_speakers("asc", 8)
        model, head = build(max(labels) + 1, seed=1)
        loader = MiniLoader(waves, labels, utts, seed=3, rank=rank)
        calls = []

        def validate(m):  # on every rank: each embeds its shard, rank 0 scores
            calls.append(rank)
            out = evaluate(m, val_dir, {"val": trials}, eval_cfg, distributed=True)
            return None if out is None else {"eer_pct": out["val"]["eer_pct"]}

        history = []
        cfg = make_config(2, val_every=1, ckpt_every=100, margin=None)
        result = train(model, head, loader, cfg, out / "run", validate=validate,
                       log=lambda rec, step: history.append((step, rec)))
        counts = [None] * world
        torch.distributed.all_gather_object(counts, len(calls))
        if rank == 0:
            (out / "val.json").write_text(json.dumps({
                "world": world, "eer_pct": sharded["val"]["eer_pct"], "scores": sharded["val"]["scores"].tolist(),
                "validate_calls": counts, "best_step": result.best_step,
                "val_steps": [s for s, rec in history if "val_eer_pct" in rec]}))
        torch.distributed.barrier()  # every rank done before any tears its gloo group down
        torch.distributed.destroy_process_group()
    elif mode == "fail":
        torch.set_num_threads(1)
        # a hang would end in the process group's timeout (60 s) instead of RankFailure within seconds
        rank, world, _ = setup_distributed(timeout_minutes=1)
        if argv[2:] == ["side"]:
            real_get_backend = torch.distributed.get_backend

            def get_backend(group=None):  # the default group passes for NCCL's; the others are what they are
                return "nccl" if group is None else real_get_backend(group)

            torch.distributed.get_backend = get_backend
        waves, labels, utts = load_speakers("asc", 8)
        cfg = make_config(FAIL_STEPS, ckpt_every=2)
        report: dict = {"rank": rank, "world": world, "failures": [], "agreement_groups": []}
        kept = []  # the exceptions stay alive (with their tracebacks, and the DDP wrappers in them)

        def agreement_group() -> None:  # the group the last train()'s step agreements ran on
            group = engine._agreement[1]
            report["agreement_groups"].append(None if group is None else
                                              [id(group), torch.distributed.get_backend(group)])

        def expect_failure(run_dir: str, loader, fail_forward_at: int | None = None):
            model, head = build(max(labels) + 1, seed=100 + rank)
            calls = []

            def forward_fails(module, args):  # rank 1's forward raises at its fail_forward_at-th call
                calls.append(1)
                if rank == 1 and len(calls) == fail_forward_at:
                    raise RuntimeError("forward exploded: NaN in the attention logits")

            hook = model.register_forward_pre_hook(forward_fails) if fail_forward_at else None
            t0 = time.perf_counter()
            try:
                train(model, head, loader, cfg, out / run_dir)
            except RankFailure as err:
                kept.append(err)
                report["failures"].append({
                    "message": str(err), "step": err.step, "failures": {str(k): v for k, v in err.failures.items()},
                    "cause": type(err.__cause__).__name__ if err.__cause__ is not None else None,
                    "cause_message": str(err.__cause__) if err.__cause__ is not None else None,
                    "seconds": time.perf_counter() - t0})
            else:
                report["failures"].append(None)
            agreement_group()
            if hook is not None:
                hook.remove()
            return model, head

        # 1. rank 1's loader fails at batch 3 (update 4; the checkpoint at step 2 is written)
        expect_failure("run", CorruptShardLoader(waves, labels, utts, seed=3, rank=rank, fail_at=3))
        # 2. rank 1's forward fails at update 3: rank 0 finished its forward, its DDP reducer awaits a backward
        abandoned = expect_failure("run2", MiniLoader(waves, labels, utts, seed=3, rank=rank), fail_forward_at=3)
        # 3. the same process group goes on: resume run 1 from its checkpoint, healthy, to the end, on the model
        # of run 2 (its parameters were under the abandoned DDP); then an uninterrupted run on a fresh model
        weights = {}
        for name, resume in (("resumed", True), ("reference", False)):
            model, head = abandoned if resume else build(max(labels) + 1, seed=100 + rank)
            history = []
            t0 = time.perf_counter()
            result = train(model, head, MiniLoader(waves, labels, utts, seed=3, rank=rank), cfg,
                           out / ("run" if resume else "reference"), resume=resume,
                           log=lambda rec, step: history.append((step, rec["loss"])))
            report[name] = {"final_step": result.final_step, "history": history,
                            "seconds": time.perf_counter() - t0}
            agreement_group()
            weights[name] = {"model": model.state_dict(), "head": head.state_dict()}
        torch.save(weights, out / f"fail{rank}.pt")
        (out / f"fail{rank}.json").write_text(json.dumps(report))
        torch.distributed.barrier()  # every rank done before any tears its gloo group down
        torch.distributed.destroy_process_group()
    elif mode == "zero":
        torch.set_num_threads(1)
        rank, world, _ = setup_distributed(timeout_minutes=2)
        waves, labels, utts = load_speakers("asc", 8)
        built = []  # the optimizer of each train() call
        real_build = engine.build_optimizer

        def build_optimizer(*args, **kwargs):
            built.append(real_build(*args, **kwargs))
            return built[-1]

        engine.build_optimizer = build_optimizer
        report: dict = {"rank": rank, "world": world, "runs": {}}
        weights = {}

        def run(name: str, steps: int, zero: bool, resume: bool = False, run_dir: str | None = None) -> None:
            model, head = build(max(labels) + 1, seed=100 + rank)  # different init: DDP broadcasts rank 0's
            history = []
            # two groups at their own rates (2e-3, 5e-3) under a warm-up: each rank's AdamW must get every change
            cfg = make_config(steps, ckpt_every=3, optim=OptimConfig(lr_frontend=2e-3, lr_backend=5e-3,
                                                                    weight_decay=1e-4, zero=zero))
            t0 = time.perf_counter()
            result = train(model, head, MiniLoader(waves, labels, utts, seed=3, rank=rank), cfg,
                           out / (run_dir or name), resume=resume,
                           log=lambda rec, step: history.append((step, rec["loss"], rec["grad_norm"])))
            opt = built[-1]
            params = [p for g in opt.param_groups for p in g["params"]]
            entry = {"final_step": result.final_step, "history": history, "seconds": time.perf_counter() - t0,
                     "sharded": isinstance(opt, engine.ZeroAdamW), "numel": [p.numel() for p in params],
                     "fused": [g["fused"] for g in opt.param_groups]}
            if entry["sharded"]:
                local = opt.optim  # this rank's AdamW
                position = {id(p): i for i, p in enumerate(params)}
                entry.update(local_params=sorted(position[id(p)] for p in local.state),
                             local_numel=opt.local_state_numel(),
                             local_groups=[{k: v for k, v in g.items() if k != "params"} for g in local.param_groups],
                             groups=[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                             consolidated_left=len(opt._all_state_dicts))
            report["runs"][name] = entry
            weights[name] = {"model": model.state_dict(), "head": head.state_dict()}

        def copy_checkpoint(src: str, dst: str) -> None:  # rank 0 writes checkpoints, so rank 0 copies one
            if rank == 0:
                (out / dst).mkdir()
                shutil.copy(out / src / "ckpt_00000003.pt", out / dst)
            torch.distributed.barrier()

        # pruning-like groups (a negative rate, 0-dim multipliers, no decay) straight on the optimizers: ZeRO's
        # state dict after two steps (the 0-dim moments travel with the small part) against a plain AdamW's
        optimizers = {}
        for zero in (False, True):
            torch.manual_seed(5)  # the same parameters and gradients on both ranks, as after DDP's all-reduce
            weights_, gates, multipliers = [torch.nn.Parameter(torch.randn(n, 3)) for n in (7, 5, 2)], \
                [torch.nn.Parameter(torch.randn(6))], [torch.nn.Parameter(torch.tensor(v)) for v in (0.0, 0.5)]
            groups = [{"name": "weights", "params": weights_, "lr": 1e-2, "weight_decay": 0.0},
                      {"name": "log_alpha", "params": gates, "lr": 5e-2, "weight_decay": 0.0},
                      {"name": "lagrangian", "params": multipliers, "lr": -2e-2, "weight_decay": 0.0}]
            opt = engine.build_optimizer(None, None, OptimConfig(zero=zero), param_groups=groups)
            params = [p for g in opt.param_groups for p in g["params"]]
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)
                engine.apply_lr(opt, 0.5)
                opt.step()
            if zero:
                opt.consolidate_state_dict(to=0)
            optimizers[zero] = (opt.state_dict() if rank == 0 else None, [p.detach().clone() for p in params])
            if zero:
                report["pruning_groups_local_params"] = sum(1 for _ in opt.optim.state)
                opt.release_consolidated()
        (plain_state, plain_params), (zero_state, zero_params) = optimizers[False], optimizers[True]
        report["pruning_groups_params_equal"] = all(torch.equal(a, b) for a, b in zip(plain_params, zero_params))
        if rank == 0:
            report["pruning_groups_state_equal"] = (
                zero_state["param_groups"] == plain_state["param_groups"]
                and zero_state["state"].keys() == plain_state["state"].keys()
                and all(zero_state["state"][i].keys() == entry.keys()
                        and all(torch.equal(zero_state["state"][i][k], v) for k, v in entry.items())
                        for i, entry in plain_state["state"].items()))
            report["pruning_groups_state_entries"] = len(zero_state["state"])

        run("plain", ZERO_STEPS, zero=False)
        run("zero", ZERO_STEPS, zero=True)
        run("zero_stopped", 3, zero=True, run_dir="zero_resumed")
        run("zero_resumed", ZERO_STEPS, zero=True, resume=True)
        copy_checkpoint("plain", "plain_to_zero")
        run("plain_to_zero", ZERO_STEPS, zero=True, resume=True)
        copy_checkpoint("zero", "zero_to_plain")
        run("zero_to_plain", ZERO_STEPS, zero=False, resume=True)
        torch.save(weights, out / f"zero{rank}.pt")
        (out / f"zero{rank}.json").write_text(json.dumps(report))
        torch.distributed.barrier()  # every rank done before any tears its gloo group down
        torch.distributed.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
