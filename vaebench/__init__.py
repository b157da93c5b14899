"""vaebench: a benchmark suite for variational autoencoders."""

# first, so that its atexit handler runs after every other one (see fast_exit's docstring)
from vaebench import fast_exit as _fast_exit  # noqa: F401

__version__ = "0.1.0"
