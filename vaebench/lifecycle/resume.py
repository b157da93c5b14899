"""What makes a process let go of a stopped run it claimed (execute.py continues it)."""


class ClaimLost(Exception):
    """The stopped run this process claimed to continue is no longer its to continue (another
    process continued it, or the claim was taken away as abandoned): it lets go, writing
    nothing to that run."""
