"""The IWAE estimate of -log p(x), K = 5000, over all 10,000 test images, for runs of the
published IWAE grid (issue 29), from each run's logged weights: the same function the run
called (scoring.evaluation.likelihood_metrics), with eval.iwae_images unset (all images).
Usage: python nll_all.py ARTIFACT_DIR [N_IMAGES]   (N_IMAGES: a timing on the first N;
AS_LOGGED=1: the run's own eval.iwae_images, which reproduces its logged test_nll)"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from vaebench.data import load_splits, resolve_root
from vaebench.scoring.evaluation import likelihood_metrics
from vaebench.tracking.served import run_config, served_model

folder = Path(sys.argv[1])
config = run_config((folder / "config.yaml").read_text())
if not os.environ.get("AS_LOGGED"):
    every_image = config.eval.model_copy(update={"iwae_images": None})
    config = config.model_copy(update={"eval": every_image})
model = served_model(config, (folder / "state_dict.pt").read_bytes()).model
splits = load_splits(config.data, resolve_root(None), torch.device("cpu"))
test = splits.test
if len(sys.argv) > 2:
    n = int(sys.argv[2])
    test = type(test)(test.images[:n], test.labels[:n])
started = time.perf_counter()
metrics = likelihood_metrics(model, test, "test", config)
images = config.eval.iwae_images or len(test)  # the estimate's images
print(json.dumps({"folder": str(folder), "images": images, "seconds": time.perf_counter() - started,
                  "samples": config.eval.iwae_samples, **metrics}))
