"""Speed benchmarks: vaebench's trainer against the conventional loop (timing.py), stacks
(stack.py), memory layouts (layout.py), whole processes (process.py) against pytorch/examples'
VAE script (conventional_script.py); the bench command's arguments (cli.py)."""
