"""Training one run, without MLflow or Optuna: the epoch loop and its step (trainer.py), checkpoint
files (checkpoint.py), the Pyro backend (pyro_backend.py) and progress display (progress.py).
"""
