"""Where models registered before vaebench's packages pickled their class: an alias.

A model logged by vaebench before the move to packages holds a pickled
``vaebench.served.ServedVAE``; unpickling it looks the class up here, and finds
:class:`vaebench.tracking.served.ServedVAE`. Keep this module while such models may
still be loaded (tests/test_served.py loads one registered before the move).
"""

from vaebench.tracking.served import ServedVAE

__all__ = ["ServedVAE"]
