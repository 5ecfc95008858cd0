"""Two reference points every demo EER is read against, on the same test trials.

* ``random_init``: the stage-1 architecture before any training (what the trained numbers must beat by far).
* ``fbank``: cosine between per-utterance mean and standard deviation of the raw log-mel filterbank
  (80 + 80 dims), a no-learning baseline that already captures channel and vocal-tract colour.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.common import DataConfig
from svlib.evaluate import EvalConfig, evaluate, extract_embeddings, score_trials
from svlib.features import W2VBertFbank
from svlib.model.speaker import build_speaker_model


class FbankStats(nn.Module):
    """waves -> [mean, std] of the unnormalised log-mel frames, as an 'embedding'."""

    def __init__(self) -> None:
        super().__init__()
        self.fbank = W2VBertFbank()
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # gives the module a device

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logmel, frames = self.fbank.log_mel(waves, lengths)
        valid = (torch.arange(logmel.shape[1])[None, :] < frames[:, None]).unsqueeze(-1)
        count = frames.view(-1, 1).to(logmel.dtype)
        mean = torch.where(valid, logmel, 0.0).sum(1) / count
        var = torch.where(valid, (logmel - mean[:, None]) ** 2, 0.0).sum(1) / (count - 1).clamp_min(1)
        return torch.cat([mean, var.sqrt()], dim=1)


def _summaries(results: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k not in ("scores", "labels")} for name, r in results.items()}


def fbank_baseline(data: DataConfig, cfg: EvalConfig | None = None, scores_dir=None) -> dict:
    """The baseline on every test list; with ``scores_dir`` its ``scores/<list>.txt`` (and DET plot) are kept
    there, for the paired comparison with the trained model on the same trials."""
    test_dir, trials = data.tests()
    needed = set().union(*(t.utterances for t in trials.values()))
    cfg = cfg or EvalConfig(progress=False)
    embeddings = extract_embeddings(FbankStats(), test_dir, needed, cfg)
    # Centre on the test population: the raw means share a large common offset that swamps the cosine.
    centre = np.mean(np.stack(list(embeddings.values())), axis=0)
    embeddings = {utt: vector - centre for utt, vector in embeddings.items()}
    results = score_trials(embeddings, trials, utt2spk=test_dir.utt2spk, ci_replicates=cfg.ci_replicates,
                           ci_seed=cfg.ci_seed)
    if scores_dir is not None:
        from experiments.evaluate import save_scores

        save_scores(Path(scores_dir), trials, results, "DET: mean/std log-mel cosine")
    return _summaries(results)


def random_init_baseline(stage_cfg, data: DataConfig, seed: int = 0, cfg: EvalConfig | None = None) -> dict:
    torch.manual_seed(seed)
    model = build_speaker_model(stage_cfg.model)
    test_dir, trials = data.tests()
    return _summaries(evaluate(model, test_dir, trials, cfg or EvalConfig(progress=False)))
