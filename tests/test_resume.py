"""Unit tests of resume: training states, checkpoint files, leases and the plan of a rerun."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vaebench.data import load_splits
from vaebench.lifecycle.claims import (
    EXPIRES_TAG,
    OWNER_TAG,
    abandoned,
    lease_tags,
    owner,
    plan,
    this_host,
)
from vaebench.models import build_model, place_model
from vaebench.spec.config import RunConfig
from vaebench.spec.grid import RunSpec, run_key
from vaebench.tracking.tracker import RUN_KEY_TAG, RunRecord
from vaebench.training.checkpoint import CheckpointStore
from vaebench.training.loop import fit
from vaebench.training.trainer import (
    EpochMetrics,
    build_optimizer,
    restore_training_state,
    training_state,
)

DEVICE = torch.device("cpu")


def tiny_config(arch: str, **train) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"subset": 600, "validation": 300, "binarize": "dynamic"},
        "model": {"arch": arch, "hidden": [32], "z_dim": 3, "tau": [1.0, 0.5]},
        "train": {"epochs": 3, "batch_size": 64, "eval_batch_size": 600, "device": "cpu",
                  **train},
        "seed": 3,
    })


@pytest.mark.parametrize("arch", ["mlp", "gumbel"])
def test_a_run_continued_from_any_epoch_ends_with_the_uninterrupted_numbers(arch, mnist_root):
    """Dynamic binarization, reparameterized z, Gumbel draws, an annealed temperature and
    Adam's moments: every random and optimizer state comes back."""
    config = tiny_config(arch)
    splits = load_splits(config.data, mnist_root, DEVICE)
    states: list[dict] = []
    # a state refers to the live weights (the caller writes it out at once): copy it
    straight = fit(config, splits, DEVICE, save_state=lambda s: states.append(copy.deepcopy(s)))
    assert [s["epoch"] for s in states] == [1, 2, 3]
    for state in states:
        continued = fit(config, splits, DEVICE, resume=state)
        assert continued.summary.keys() == straight.summary.keys()
        for name, value in straight.summary.items():
            if "seconds" not in name and "per_second" not in name:
                assert continued.summary[name] == value, (state["epoch"], name)
        assert [m.values for m in continued.history] == [m.values for m in straight.history]


def test_checkpoint_every_and_off(mnist_root):
    config = tiny_config("mlp", epochs=5, checkpoint_every=2)
    splits = load_splits(config.data, mnist_root, DEVICE)
    saved: list[int] = []
    fit(config, splits, DEVICE, save_state=lambda s: saved.append(s["epoch"]))
    assert saved == [2, 4, 5]  # and always after the last epoch
    off = tiny_config("mlp", checkpoint_every=0)
    fit(off, splits, DEVICE, save_state=lambda s: saved.append(-1))
    assert -1 not in saved
    assert run_key(config) == run_key(tiny_config("mlp", epochs=5))  # not part of the key


def test_checkpoint_store_replaces_atomically_and_removes(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save("abc", {"epoch": 1, "weights": torch.ones(3)})
    store.save("abc", {"epoch": 2, "weights": torch.zeros(3)})
    assert store.load("abc")["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["abc.pt"]
    store.path("abc").write_bytes(store.path("abc").read_bytes()[:20])  # a torn file
    assert store.load("abc") is None
    store.remove("abc")
    assert store.load("abc") is None and not store.path("abc").exists()


def test_checkpoint_that_cannot_be_written_is_one_warning(tmp_path, capsys):
    """A file where the checkpoint folder should be: the run goes on, warned once."""
    (tmp_path / "taken").write_text("not a folder")
    store = CheckpointStore(tmp_path / "taken" / "checkpoints")
    store.save("abc", {"epoch": 1})
    store.save("abc", {"epoch": 2})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not written" in err[0] and "cannot be continued" in err[0]
    assert store.load("abc") is None


# ---------------------------------------------------------------------------
# leases


def test_this_process_holds_its_lease():
    tags = lease_tags()
    assert tags[OWNER_TAG] == owner() and abandoned(tags) is None
    assert float(tags[EXPIRES_TAG]) >= time.time() + 899


def test_a_stack_of_k_runs_is_leased_k_times_as_long_until_its_first_epoch_is_timed():
    stacked = float(lease_tags(runs_at_once=4)[EXPIRES_TAG]) - time.time()
    assert 4 * 900 - 5 <= stacked <= 4 * 900 + 5  # a CPU stack's epoch: up to K runs' epochs
    timed = float(lease_tags(2000.0, runs_at_once=4)[EXPIRES_TAG]) - time.time()
    assert 3 * 2000 - 5 <= timed <= 3 * 2000 + 5  # then three of its longest epochs


def test_a_finished_process_has_abandoned_its_lease():
    child = subprocess.run(
        [sys.executable, "-c", "from vaebench.lifecycle.claims import owner; print(owner())"],
        capture_output=True, text=True, check=True,
    )
    tags = {OWNER_TAG: child.stdout.strip(), EXPIRES_TAG: f"{time.time() + 1e6:.0f}"}
    assert "is gone" in abandoned(tags)


def test_a_reused_pid_is_not_the_owner():
    tags = {OWNER_TAG: f"{this_host()}:{os.getpid()}:1", EXPIRES_TAG: f"{time.time() + 1e6:.0f}"}
    assert "is gone" in abandoned(tags)


@given(st.floats(min_value=-1e6, max_value=1e6))
def test_another_hosts_lease_holds_until_it_expires(offset):
    now = 1.8e9
    tags = {OWNER_TAG: "elsewhere.example:123:456", EXPIRES_TAG: f"{now + offset:.3f}"}
    reason = abandoned(tags, now=now)
    assert (reason is None) == (float(f"{now + offset:.3f}") >= now)
    if reason is not None:
        assert "expired" in reason


def test_a_run_without_a_lease_is_abandoned():
    assert "no lease" in abandoned({})


# ---------------------------------------------------------------------------
# the plan of a rerun


def spec(seed: int) -> RunSpec:
    config = RunConfig(seed=seed)
    return RunSpec(f"run-s{seed}", run_key(config), config, ())


def record(run: RunSpec, status: str, run_id: str) -> RunRecord:
    return RunRecord(run_id, run.name, status, {RUN_KEY_TAG: run.key}, 0, {})


def test_plan_skips_finished_leaves_running_continues_killed():
    runs = [spec(seed) for seed in range(5)]
    records = [
        record(runs[0], "FINISHED", "a"),
        record(runs[1], "RUNNING", "b"),
        record(runs[2], "KILLED", "c"),
        record(runs[3], "FAILED", "d"),
        record(runs[0], "KILLED", "e"),  # an older stop does not undo a finish
    ]
    planned = plan(runs, records, rerun=False)
    assert [(p.action, p.previous.run_id if p.previous else None) for p in planned] == [
        ("skip", "a"), ("elsewhere", "b"), ("continue", "c"), ("train", None), ("train", None)
    ]
    assert [p.action for p in plan(runs, records, rerun=True)] == ["train"] * 5


def test_bench_times_the_checkpoint_write_beside_the_epoch(mnist_root, capsys):
    from vaebench.bench.timing import main as bench_main

    assert bench_main(str(mnist_root), epochs=2, subset=512) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("checkpoint write"))
    assert re.search(r"median \d+\.\d ms = \d+\.\d% of a shipped epoch \(\S+, \S+ ms\)", line)
    assert "vaebench, checkpoint after every epoch" in out


def test_a_contiguous_optimizer_state_continues_a_channels_last_model_exactly():
    """A state saved contiguous (by a stack, or before models were placed channels-last)
    restores into a conv model placed channels-last on the CPU and steps as the live one."""
    config = RunConfig.model_validate({"model": {"arch": "conv", "channels": [8, 16]}})

    def fresh():
        torch.manual_seed(0)
        model = place_model(build_model(config.model, (1, 28, 28)), DEVICE)
        return model, build_optimizer(config.optim, model.parameters())

    def step(model, optimizer, x):
        torch.manual_seed(2)  # the same draw of z for both
        optimizer.zero_grad()
        model(x).logits.sub(x).pow(2).sum().backward()
        optimizer.step()

    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    live, live_optimizer = fresh()
    assert live.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    step(live, live_optimizer, x)
    history = [EpochMetrics(epoch=1, train_loss=0.0, epoch_seconds=1.0, eval_seconds=0.0,
                            images_per_second=1.0)]
    state = copy.deepcopy(training_state(live, live_optimizer, torch.Generator(), history, 1.0))
    for values in state["optimizer"]["state"].values():  # as a stack saves it
        for name, value in values.items():
            if value.dim() == 4:
                values[name] = value.contiguous()
    restored, restored_optimizer = fresh()
    restore_training_state(state, restored, restored_optimizer, torch.Generator())
    step(live, live_optimizer, x)
    step(restored, restored_optimizer, x)
    for (name, a), b in zip(live.named_parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b), name
