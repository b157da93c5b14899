"""The fixed digit classifier that judges a conditional VAE's samples: trained once,
deterministically, and cached with its sha256 (docs/metrics.md#evaluation)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaebench.atomic import atomic_file, write_text
from vaebench.data import Split, load_splits
from vaebench.eager import optimizer_step, optimizers_without_dynamo
from vaebench.spec.config import DataConfig

CACHE_ENV = "VAEBENCH_CACHE"
CLASSIFIER_SEED = 0
EPOCHS = 3
VERSION = 2  # bump when the architecture or recipe changes


def build_classifier() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))


def cache_folder(data_root: Path) -> Path:
    if chosen := os.environ.get(CACHE_ENV):
        return Path(chosen).expanduser()
    if os.access(data_root, os.W_OK):
        return data_root / "vaebench-cache"
    return Path.home() / ".cache" / "vaebench"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_classifier(train: Split, epochs: int = EPOCHS) -> nn.Module:
    """Deterministic on CPU."""
    torch.manual_seed(CLASSIFIER_SEED)
    generator = torch.Generator().manual_seed(CLASSIFIER_SEED)
    model = build_classifier().to(train.images.device)
    optimizers_without_dynamo()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).to(train.images.device)
        for start in range(0, len(train), 128):
            index = order[start : start + 128]
            loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step(optimizer)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    chunks = range(0, len(split), 2000)
    predictions = torch.cat([model(split.images[i : i + 2000]).argmax(1) for i in chunks])
    return (predictions == split.labels).float().mean().item()


def load_classifier(dataset: str, data_root: Path, device: torch.device) -> nn.Module:
    folder = cache_folder(data_root)
    weights = folder / f"{dataset}-classifier-v{VERSION}.pt"
    meta = weights.with_suffix(".json")
    model = build_classifier()
    if weights.is_file() and meta.is_file():
        recorded = json.loads(meta.read_text())
        if recorded.get("sha256") == _sha256(weights):
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model.to(device).eval()
    splits = load_splits(DataConfig(dataset=dataset), data_root, torch.device("cpu"))
    model = train_classifier(splits.train)
    test_accuracy = accuracy(model, splits.test)
    with atomic_file(weights) as handle:  # a concurrent reader sees whole files only
        torch.save(model.state_dict(), handle)
    write_text(meta, json.dumps({"sha256": _sha256(weights), "test_accuracy": test_accuracy}))
    return model.to(device).eval()


class ClassifierCache:

    def __init__(self, data_root: Path):
        self.data_root = data_root
        self._loaded: dict[tuple[str, str], nn.Module] = {}

    def get(self, dataset: str, device: torch.device) -> nn.Module:
        key = (dataset, str(device))
        if key not in self._loaded:
            self._loaded[key] = load_classifier(dataset, self.data_root, device)
        return self._loaded[key]
