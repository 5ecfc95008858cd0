"""Embeddings of full utterances and their cosine scores on trial lists.

Utterances are batched by length (``iterate_by_length``) so that padding stays small, each is capped at
``max_seconds`` (60 s, as the reference), and the model runs in eval mode without gradients. This is the
one evaluation path: stages, sweeps, the CLI and the benchmarks all come through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from svlib.data.lists import DataDir, Trials
from svlib.data.sampling import iterate_by_length
from svlib.scoring.metrics import EmbeddingTable, cosine_scores, summarize


@dataclass
class EvalConfig:
    max_seconds: float = 60.0        # per utterance
    max_batch_seconds: float = 240.0  # padded audio per batch
    progress: bool = True


@torch.no_grad()
def extract_embeddings(model: nn.Module, datadir: DataDir, utts=None, cfg: EvalConfig | None = None,
                       device: str | torch.device | None = None) -> EmbeddingTable:
    """``{utt: embedding}`` for ``utts`` (default: every utterance of ``datadir``)."""
    cfg = cfg or EvalConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    utts = sorted(datadir.wavs) if utts is None else sorted(set(utts))
    table = EmbeddingTable()
    bar = tqdm(total=len(utts), desc="embed", disable=not cfg.progress, dynamic_ncols=True, leave=False)
    for names, waves, lengths in iterate_by_length(datadir, utts, cfg.max_seconds, cfg.max_batch_seconds):
        emb = model(waves.to(device), lengths.to(device)).float().cpu().numpy()
        for name, vector in zip(names, emb):
            table[name] = vector
        bar.update(len(names))
    bar.close()
    model.train(was_training)
    return table


def score_trials(embeddings: Mapping[str, np.ndarray], trials: Mapping[str, Trials]) -> dict[str, dict]:
    """Per trial list: ``summarize`` (eer_pct, minDCFs) plus the raw ``scores`` and ``labels``."""
    out = {}
    for name, trial in trials.items():
        scores = cosine_scores(embeddings, trial)
        out[name] = summarize(scores, trial.labels) | {"scores": scores, "labels": trial.labels}
    return out


def evaluate(model: nn.Module, datadir: DataDir, trials: Mapping[str, Trials], cfg: EvalConfig | None = None,
             device=None) -> dict[str, dict]:
    """Embed every utterance the trial lists use, then score each list."""
    needed = set()
    for name, trial in trials.items():
        missing = sorted(trial.utterances - set(datadir.wavs))
        if missing:
            raise KeyError(f"trial list {name!r} uses {len(missing)} utterance(s) not in the data dir, "
                           f"e.g. {missing[:3]}")
        needed |= trial.utterances
    embeddings = extract_embeddings(model, datadir, needed, cfg, device)
    return score_trials(embeddings, trials)
