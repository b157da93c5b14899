"""What the user writes, described without torch, models, MLflow or Optuna: run configs,
grid and study files, the search space and the metric catalogue."""
