"""Who owns a RUNNING run, and what a rerun does with the runs a grid already has.

A run in progress carries a lease: the tags ``vaebench.lease_owner`` (host, pid and
the process's start time, so a reused pid is not mistaken for the owner) and
``vaebench.lease_expires`` (unix seconds), refreshed with every epoch's metrics.
A RUNNING run is *abandoned* when its owner is on this host and that process is
gone, or, for an owner on another host, when its lease expired. A rerun marks
abandoned runs KILLED and continues them from their checkpoint.

Claims (exactly once across processes and machines): before a run trains, its
claimant creates a RUNNING MLflow run carrying the run key and its lease, waits
:func:`settle_seconds`, then reads every run of the key; the claim stands unless a
FINISHED run of the key exists or another live RUNNING one was created earlier
(ordered by start time, then run id); a claim that loses deletes its run. Two
claimants of one key: the later-created one sees the earlier (the store reads back
what was written before), so at most the earliest trains. A run continued from its
checkpoint is claimed the same way, with a claim run tagged :data:`CLAIM_TAG` that
the winner deletes once the stopped run is RUNNING again under its lease.

This module reads tags and the process table, and writes through the Tracker.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from vaebench.grid import RunSpec
from vaebench.tracking import RUN_KEY_TAG, RunRecord, Tracker, sqlite_path

OWNER_TAG = "vaebench.lease_owner"
EXPIRES_TAG = "vaebench.lease_expires"
LEASE_SECONDS = 900.0  # at least; a lease covers three of the run's longest epochs
LEASE_EPOCHS = 3
CLAIM_TAG = "vaebench.claim_for"  # on a claim run: the id of the stopped run it continues
SETTLE_ENV = "VAEBENCH_CLAIM_SETTLE"
# between creating a claim and reading the others: longer than the clocks of two machines
# may differ (NTP keeps them within milliseconds); on one machine, past the millisecond of
# the start time, so that a later claimant's start time is later
REMOTE_SETTLE_SECONDS = 0.5
LOCAL_SETTLE_SECONDS = 0.01


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19]  # field 22 of stat; the first two fields are before the split


def owner() -> str:
    """This process as a lease owner: ``host:pid:start``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or '?'}"


def lease_tags(longest_epoch_seconds: float = 0.0) -> dict[str, str]:
    """The lease to write now: this process, for the next few epochs."""
    seconds = max(LEASE_SECONDS, LEASE_EPOCHS * longest_epoch_seconds)
    return {OWNER_TAG: owner(), EXPIRES_TAG: f"{time.time() + seconds:.0f}"}


def abandoned(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags has no live owner, or None if it may still have one."""
    held_by = tags.get(OWNER_TAG)
    if held_by is None:
        return "no lease (left by an earlier vaebench)"
    host, _, rest = held_by.partition(":")
    pid_text, _, started = rest.partition(":")
    if host == socket.gethostname() and pid_text.isdigit():
        alive = _process_start(int(pid_text))
        if alive is None or (started != "?" and alive != started):
            return f"its process {pid_text} on {host} is gone"
        return None
    expires = float(tags.get(EXPIRES_TAG, "0") or 0)
    if (now or time.time()) > expires:
        return f"its lease from {host} expired"
    return None


def recover_abandoned(
    tracker: Tracker, records: Sequence[RunRecord], stream: TextIO
) -> list[RunRecord]:
    """Mark the abandoned RUNNING runs among ``records`` (children and parents) KILLED, with
    the reason, one line each on ``stream``; returns the records as they are now."""
    now: list[RunRecord] = []
    for record in records:
        reason = abandoned(record.tags) if record.status == "RUNNING" else None
        if reason is not None and CLAIM_TAG in record.tags:  # a claim its process left
            tracker.delete_run(record.run_id)
            continue
        if reason is not None:
            tracker.end_run(record.run_id, "KILLED", f"abandoned: {reason}")
            print(
                f"run {record.name} ({record.run_id}) was left RUNNING ({reason}): "
                "marked KILLED",
                file=stream,
            )
            record = replace(record, status="KILLED")
        now.append(record)
    return now


@dataclass(frozen=True)
class Planned:
    """What this invocation does with one run of the grid."""

    run: RunSpec
    action: str  # "train", "continue" (a KILLED run of this key), "skip", "elsewhere"
    previous: RunRecord | None = None  # the run skipped or continued


def plan(runs: Sequence[RunSpec], records: Sequence[RunRecord], rerun: bool) -> list[Planned]:
    """What to do with each run, given the grid's runs in the store (after
    :func:`recover_abandoned`), oldest first.

    A FINISHED run of the key is skipped (``rerun`` trains a new sample instead); a
    RUNNING one (its owner is alive) is left to its owner; a KILLED one is continued
    (from its checkpoint, if it has one).
    """
    by_key: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.key is not None and (CLAIM_TAG not in record.tags or record.status == "RUNNING"):
            by_key.setdefault(record.key, []).append(record)
    planned = []
    for run in runs:
        mine = by_key.get(run.key, [])
        latest = {status: [r for r in mine if r.status == status] for status in STATUSES}
        if rerun:
            planned.append(Planned(run, "train"))
        elif latest["FINISHED"]:
            planned.append(Planned(run, "skip", latest["FINISHED"][-1]))
        elif latest["RUNNING"]:
            planned.append(Planned(run, "elsewhere", latest["RUNNING"][-1]))
        elif latest["KILLED"]:
            planned.append(Planned(run, "continue", latest["KILLED"][-1]))
        else:
            planned.append(Planned(run, "train"))
    return planned


STATUSES = ("FINISHED", "RUNNING", "KILLED")


def settle_seconds(tracking_uri: str) -> float:
    """How long a claimant waits between writing its claim and reading the others
    (``$VAEBENCH_CLAIM_SETTLE`` overrides): a local SQLite store shares this machine's clock."""
    if os.environ.get(SETTLE_ENV):
        return float(os.environ[SETTLE_ENV])
    return LOCAL_SETTLE_SECONDS if sqlite_path(tracking_uri) else REMOTE_SETTLE_SECONDS


def _precedes(record: RunRecord, mine: RunRecord) -> bool:
    return (record.start_time, record.run_id) < (mine.start_time, mine.run_id)


def claim_holds(
    tracker: Tracker, experiment: str, key: str, claim_id: str, settle: float, since_ms: int = 0
) -> bool:
    """Whether the claim ``claim_id`` (a RUNNING run of ``key`` this process created) wins.

    It loses to a FINISHED run of the key that started at ``since_ms`` or later (0: any; a
    ``--rerun`` invocation passes its own start) and to a live RUNNING run created earlier.
    """
    time.sleep(settle)
    records = tracker.previous_runs(experiment, RUN_KEY_TAG, key)
    mine = next((r for r in records if r.run_id == claim_id), None)
    if mine is None:
        raise RuntimeError(f"claim {claim_id} of {key} is not in the store it was written to")
    for record in records:
        if record.run_id == claim_id:
            continue
        if record.status == "FINISHED" and record.start_time >= since_ms:
            return False
        if record.status == "RUNNING" and abandoned(record.tags) is None and _precedes(
            record, mine
        ):
            return False
    return True


def claim_run(
    tracker: Tracker,
    experiment: str,
    run: RunSpec,
    tags: Mapping[str, str],
    settle: float,
    since_ms: int = 0,
    continues: str | None = None,
) -> str | None:
    """Claim ``run``: the id of the RUNNING run created for it, or None if another claimant
    holds it (the claim run is then deleted). ``continues``: the stopped run this claim is
    for (the claim run is only a claim; the caller deletes it once that run is reopened).
    """
    claim_tags = {**tags, RUN_KEY_TAG: run.key, **lease_tags()}
    if continues is None:
        claim_id = tracker.start_run(run.name, run.params, claim_tags)
    else:
        claim_id = tracker.start_run(run.name, {}, {**claim_tags, CLAIM_TAG: continues})
    if claim_holds(tracker, experiment, run.key, claim_id, settle, since_ms):
        return claim_id
    tracker.delete_run(claim_id)
    return None
