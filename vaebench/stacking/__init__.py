"""K runs trained as one stacked model; ``plan.py`` imports no torch (docs/architecture.md)."""
