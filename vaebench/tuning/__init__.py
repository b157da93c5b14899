"""Optuna studies over the same runs: the study's invocation (tune.py), one trial
(trial.py), trials trained as stacks (trial_stack.py), the study's storage (storage.py) and
its outputs (outputs.py).
"""
