"""A trained GMVAE's training epochs with subnormal floats kept and flushed, alternating, in one
process on one thread (x86's FTZ/DAZ modes are a thread's own: torch.set_flush_denormal
switches this thread's, and one thread computes everything).

Usage: python subnormals.py ARTIFACT_DIR [IMAGES] [REPEATS]
ARTIFACT_DIR: a gmvae run's MLflow artifacts (config.yaml, state_dict.pt); the model is
continued from its trained weights with a fresh Adam, on the first IMAGES training images
(default 5,000), REPEATS times each way (default 3)."""
import json
import sys
import time
from pathlib import Path

import torch

from vaebench.data import load_splits, resolve_root
from vaebench.tracking.served import run_config
from vaebench.training.trainer import ModelTrainee

torch.set_num_threads(1)
folder = Path(sys.argv[1])
images = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
config = run_config((folder / "config.yaml").read_text())
splits = load_splits(config.data, resolve_root(None), torch.device("cpu"))
splits.train = type(splits.train)(splits.train.images[:images], splits.train.labels[:images])
trainee = ModelTrainee(config, splits, torch.device("cpu"))
trainee.model.load_state_dict(torch.load(folder / "state_dict.pt"))
seconds: dict[str, list[float]] = {"kept": [], "flushed": []}
for _ in range(repeats):
    for mode in seconds:
        torch.set_flush_denormal(mode == "flushed")
        started = time.perf_counter()
        trainee.epoch(0)
        seconds[mode].append(round(time.perf_counter() - started, 2))
print(json.dumps({"folder": str(folder), "images": images, "seconds per epoch": seconds}))
