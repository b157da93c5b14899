"""A grid invocation and its executors: the runner (runner.py), the loop any process
runs over a grid's runs (grid_work.py), local worker processes (worker_processes.py,
planned by worker_plan.py without torch), Ray tasks (ray_executor.py), and run --dry-run
(dry_run.py).
"""
