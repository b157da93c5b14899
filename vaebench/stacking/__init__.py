"""What only stacks need: K runs trained as one stacked model. Which runs stack
(plan.py, without torch), a stack's training (fit.py), the stacked model and layers
(model.py, layers.py), per-member optimizers (optim.py), the fused step (step.py) and the
members' evaluation in one pass (evaluation.py). No MLflow, no Optuna.
"""
