"""Embeddings of full utterances and their cosine scores on trial lists.

Utterances are batched by length (``iterate_by_length``) so that padding stays small, each is capped at
``max_seconds`` (60 s, as the reference), and the model runs in eval mode without gradients. This is the
one evaluation path: stages, sweeps, the CLI and the benchmarks all come through here.

Under torchrun, ``distributed=True`` splits the utterances over the ranks (rank ``r`` of ``W`` embeds the
sorted utterance list's items ``r, r + W, ...``), gathers the embeddings on rank 0, and only rank 0 scores
(the other ranks get ``None``): validation time then falls with the number of GPUs instead of holding all
but one rank at a barrier. ``EvalConfig.amp`` runs the model under autocast (training validates in the
training precision).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from svlib.audio import SAMPLE_RATE, audio_info, is_narrowband
from svlib.data.lists import DataDir, Trials
from svlib.data.sampling import iterate_by_length
from svlib.scoring.metrics import EmbeddingTable, cosine_scores, summarize
from svlib.train.engine import autocast


@dataclass
class EvalConfig:
    max_seconds: float = 60.0        # per utterance
    max_batch_seconds: float = 240.0  # padded audio per batch
    progress: bool = True
    # refuse utterances whose RMS level is below this (dB re full scale, 20 log10 rms): all-zero or near-silent
    # audio still gets an embedding, and two silent files then "match" with cosine 1.0. None: no check.
    min_rms_dbfs: float | None = None
    # record per utterance whether its audio is narrow-band (svlib.audio.is_narrowband) as the table's
    # "narrowband" flag: one header read and a 32 ms-frame spectrum per file. The CLI turns it on; training's
    # validation leaves it off (and a distributed run gathers only the embeddings).
    flag_narrowband: bool = False
    amp: Literal["off", "bf16", "fp16"] = "off"   # forward precision (svlib.train.engine.autocast)
    # speaker-level bootstrap 95 % intervals of each list's EER/minDCF (svlib.scoring.bootstrap); 0: none
    ci_replicates: int = 1000
    ci_seed: int = 0


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SilentAudioError(ValueError):
    """An utterance too quiet to carry a voice (names the file and its level)."""


class EmbeddingRunError(RuntimeError):
    """The model failed on a batch (out of memory, a device error...); names the file(s) being embedded."""


def rms_dbfs(wave: torch.Tensor) -> float:
    """``20 log10(sqrt(mean(x^2)))`` of a waveform in [-1, 1]; -inf for digital silence."""
    power = float(wave.double().pow(2).mean()) if wave.numel() else 0.0
    return 10.0 * math.log10(power) if power > 0 else -math.inf


def _check_levels(names, waves, lengths, min_dbfs: float, datadir: DataDir) -> None:
    for b, name in enumerate(names):
        level = rms_dbfs(waves[b, : int(lengths[b])])
        if not level >= min_dbfs:
            raise SilentAudioError(f"{datadir.wavs[name]}: near-silent audio (RMS {level:.1f} dBFS, below the "
                                   f"{min_dbfs:g} dBFS threshold); refusing to embed '{name}'")


def _narrowband(names, waves, lengths, datadir: DataDir) -> dict[str, bool]:
    """``is_narrowband`` of each utterance of a batch, the file's own rate read from its header."""
    return {name: is_narrowband(waves[b, : int(lengths[b])].numpy(), audio_info(datadir.wavs[name]).sample_rate)
            for b, name in enumerate(names)}


def _batch_failure(names, lengths, datadir: DataDir, err: BaseException) -> EmbeddingRunError:
    seconds = [int(n) / SAMPLE_RATE for n in lengths]
    oom = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
    what = "out of memory" if oom else type(err).__name__
    batch = f", in a batch of {len(names)} padded to {max(seconds):.1f} s" if len(names) > 1 else ""
    hint = "; lower --max-seconds or --max-batch-seconds" if oom else ""
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    return EmbeddingRunError(f"{datadir.wavs[names[0]]}: {what} while embedding '{names[0]}' ({seconds[0]:.1f} s"
                             f"{batch}){hint}" + (f" ({detail})" if detail else ""))


@torch.no_grad()
def extract_embeddings(model: nn.Module, datadir: DataDir, utts=None, cfg: EvalConfig | None = None,
                       device: str | torch.device | None = None, *, distributed: bool = False) -> EmbeddingTable | None:
    """``{utt: embedding}`` for ``utts`` (default: every utterance of ``datadir``).

    ``distributed`` (a collective: every rank must call it): each rank embeds its shard and rank 0 returns
    the whole table; the other ranks return ``None``. Without a process group it is the plain call.
    """
    cfg = cfg or EvalConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    utts = sorted(datadir.wavs) if utts is None else sorted(set(utts))
    rank, world = _world() if distributed else (0, 1)
    if world > 1:
        shard = _embed(model, datadir, utts[rank::world], cfg, device)
        parts: list | None = [None] * world if rank == 0 else None
        # (utts, matrix) per rank: one pickled array each, not a dict of 90k small arrays
        dist.gather_object((shard.utts, shard.matrix) if len(shard) else ([], None), parts, dst=0)
        if rank != 0:
            return None
        parts = [(names, matrix) for names, matrix in parts if names]
        if not parts:
            return EmbeddingTable()
        return EmbeddingTable([u for names, _ in parts for u in names], np.concatenate([m for _, m in parts]))
    return _embed(model, datadir, utts, cfg, device)


def _embed(model: nn.Module, datadir: DataDir, utts: list[str], cfg: EvalConfig, device) -> EmbeddingTable:
    was_training = model.training
    model.eval()
    table = EmbeddingTable()
    bar = tqdm(total=len(utts), desc="embed", disable=not cfg.progress, dynamic_ncols=True, leave=False)
    for names, waves, lengths in iterate_by_length(datadir, utts, cfg.max_seconds, cfg.max_batch_seconds):
        if cfg.min_rms_dbfs is not None:
            _check_levels(names, waves, lengths, cfg.min_rms_dbfs, datadir)
        if cfg.flag_narrowband:
            table.set_flags("narrowband", _narrowband(names, waves, lengths, datadir))
        try:
            with autocast(cfg.amp, device):
                emb = model(waves.to(device), lengths.to(device)).float().cpu().numpy()
        except (RuntimeError, MemoryError) as err:  # OOM on a long file must say which file
            raise _batch_failure(names, lengths, datadir, err) from err
        for name, vector in zip(names, emb):
            table[name] = vector
        bar.update(len(names))
    bar.close()
    model.train(was_training)
    return table


def score_trials(embeddings: Mapping[str, np.ndarray], trials: Mapping[str, Trials], *,
                 utt2spk: Mapping[str, str] | None = None, ci_replicates: int = 0, ci_seed: int = 0) -> dict[str, dict]:
    """Per trial list: ``summarize`` (eer_pct, minDCFs) plus the raw ``scores`` and ``labels``; with
    ``ci_replicates`` also the speaker-level bootstrap intervals (``bootstrap.ci_fields``: ``eer_ci_pct``,
    ``mindcf_0.01_ci``, ...), speakers from ``utt2spk`` (default: the utterance ids' prefixes)."""
    out = {}
    for name, trial in trials.items():
        scores = cosine_scores(embeddings, trial)
        out[name] = summarize(scores, trial.labels)
        if ci_replicates:
            from svlib.scoring.bootstrap import bootstrap_ci, ci_fields, trial_speakers

            speakers = trial_speakers(trial.enroll, trial.test, trial.labels, utt2spk, source=f"trial list {name!r}")
            out[name] |= ci_fields(bootstrap_ci(scores, trial.labels, speakers, ci_replicates, ci_seed))
        out[name] |= {"scores": scores, "labels": trial.labels}
    return out


def evaluate(model: nn.Module, datadir: DataDir, trials: Mapping[str, Trials], cfg: EvalConfig | None = None,
             device=None, *, distributed: bool = False) -> dict[str, dict] | None:
    """Embed every utterance the trial lists use, then score each list.

    ``distributed``: every rank embeds its shard (``extract_embeddings``); rank 0 scores and returns the
    results, the other ranks return ``None``.
    """
    needed = set()
    for name, trial in trials.items():
        missing = sorted(trial.utterances - set(datadir.wavs))
        if missing:
            raise KeyError(f"trial list {name!r} uses {len(missing)} utterance(s) not in the data dir, "
                           f"e.g. {missing[:3]}")
        needed |= trial.utterances
    embeddings = extract_embeddings(model, datadir, needed, cfg, device, distributed=distributed)
    cfg = cfg or EvalConfig()
    return None if embeddings is None else score_trials(embeddings, trials, utt2spk=datadir.utt2spk,
                                                        ci_replicates=cfg.ci_replicates, ci_seed=cfg.ci_seed)
