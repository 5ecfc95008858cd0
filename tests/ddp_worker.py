"""Tiny speaker model + deterministic loader over real sv-mini audio, for the training-engine tests.

Imported by tests/test_engine.py, and run as a script in two modes:

* ``python tests/ddp_worker.py kill OUT`` trains slowly (a sleeping log callback) so that the test can
  SIGKILL it after its first checkpoint appears;
* ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py ddp OUT`` trains with DDP on
  gloo; each rank writes its final weights and rank 0 its log to OUT.
* ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py val OUT`` evaluates the
  held-out list sharded over the ranks (``svlib.evaluate``, ``distributed=True``), then trains a few steps
  validating that way on every rank; rank 0 writes the scores and the log to OUT.
"""
from __future__ import annotations

import csv
import json
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
from svlib.train.engine import OptimConfig, TrainConfig, setup_distributed, train  # noqa: E402
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
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
