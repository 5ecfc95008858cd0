"""Scoring back-end. ``metrics`` (EER, minDCF, DET, cosine scores, embeddings files) is re-exported here;
``norm`` (AS-norm) and ``calibration`` (QMF logistic regression, Cllr, PAV) are imported from their modules
so that importing the metrics does not pull in scipy.optimize."""
from svlib.scoring.metrics import (
    EmbeddingFileError,
    EmbeddingTable,
    MissingEmbeddingError,
    ScoringError,
    compute_eer,
    compute_min_dcf,
    cosine_scores,
    det_curve,
    load_embeddings,
    draw_det,
    plot_det,
    save_embeddings,
    summarize,
)

__all__ = [
    "EmbeddingFileError",
    "EmbeddingTable",
    "MissingEmbeddingError",
    "ScoringError",
    "compute_eer",
    "compute_min_dcf",
    "cosine_scores",
    "det_curve",
    "load_embeddings",
    "draw_det",
    "plot_det",
    "save_embeddings",
    "summarize",
]
