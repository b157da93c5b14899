"""What the user writes (configs, grid and study files, metrics), without torch or Optuna."""
