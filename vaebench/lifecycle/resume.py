"""Continuing a stopped run in its own MLflow run: what makes this process let go of it (the
rest of continuing one is :mod:`vaebench.lifecycle.execute`'s)."""


class ClaimLost(Exception):
    """The stopped run this process claimed to continue is no longer its to continue (another
    process continued it, or the claim was taken away as abandoned): it lets go, writing
    nothing to that run."""
