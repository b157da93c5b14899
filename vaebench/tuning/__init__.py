"""Optuna studies over the same runs as a grid."""
