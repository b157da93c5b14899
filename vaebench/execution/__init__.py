"""A grid invocation (runner.py) and its executors, each running the loop of grid_work.py."""
