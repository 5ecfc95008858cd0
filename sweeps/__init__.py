"""Optuna sweeps over svlib pipelines (storage, workers, MLflow join); see ``sweeps.study``."""
