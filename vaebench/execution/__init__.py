"""A grid invocation (runner.py) and its executors: this process, local worker processes
or Ray tasks, each running the loop of grid_work.py."""
