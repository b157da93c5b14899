"""Training one run, without MLflow or Optuna (docs/architecture.md)."""
