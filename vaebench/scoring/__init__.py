"""Scores of a trained model, without MLflow or Optuna (docs/metrics.md)."""
