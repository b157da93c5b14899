"""vaebench: a benchmark suite for variational autoencoders."""

__version__ = "0.1.0"
