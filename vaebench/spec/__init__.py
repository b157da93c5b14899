"""What the user writes, described without torch, models, MLflow or Optuna: the run
config (config.py), grid files (grid.py), study files (study.py) and their search space
(space.py), the metric catalogue (catalogue.py), and what grid and study files share
(yaml_file.py). Every problem in a file is one line naming the file and the dotted key.
"""
