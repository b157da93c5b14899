"""An alias: models registered before vaebench's packages pickled ``vaebench.served.ServedVAE``;
keep it while they may be loaded (docs/tracking.md#registered-models, tests/test_served.py)."""

from vaebench.tracking.served import ServedVAE

__all__ = ["ServedVAE"]
