"""Who owns a RUNNING run, and what a rerun does with a grid's runs (docs/resume.md#abandoned-runs);
a claim made to continue a stopped run is a run of its own, tagged :data:`CLAIM_TAG`."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from vaebench.spec.grid import RunSpec
from vaebench.tracking.tracker import RunRecord, Tracker

OWNER_TAG = "vaebench.lease_owner"
EXPIRES_TAG = "vaebench.lease_expires"
LEASE_SECONDS = 900.0  # at least; a lease covers three of the run's longest epochs
LEASE_EPOCHS = 3
CLAIM_TAG = "vaebench.claim_for"  # on a claim run: the id of the stopped run it continues


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19]  # field 22 of stat; the first two fields are before the split


_task: list[str] = []  # the unit of work this process runs now, if an executor names one


def set_task(task: str | None) -> None:
    """Name the unit of work (a Ray task's id) that this process's leases belong to; an
    executor that runs a unit again after its process died sets the same name, and the
    runs left RUNNING by the dead attempt are abandoned at once, on any host."""
    _task[:] = [task] if task else []


def owner() -> str:
    """This process as a lease owner: ``host:pid:start``, then ``:task`` if one is set."""
    pid = os.getpid()
    base = f"{socket.gethostname()}:{pid}:{_process_start(pid) or '?'}"
    return ":".join([base, *_task])


def lease_tags(longest_epoch_seconds: float = 0.0, runs_at_once: int = 1) -> dict[str, str]:
    """The lease to write now: this process, for the next few epochs; before an epoch is
    timed, :data:`LEASE_SECONDS` per run trained at once (a stack of K on the CPU takes up to
    K times one run's epoch)."""
    seconds = max(LEASE_SECONDS * runs_at_once, LEASE_EPOCHS * longest_epoch_seconds)
    return {OWNER_TAG: owner(), EXPIRES_TAG: f"{time.time() + seconds:.0f}"}


def abandoned(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags has no live owner, or None if it may still have one."""
    held_by = tags.get(OWNER_TAG)
    if held_by is None:
        return "no lease (left by an earlier vaebench)"
    host, pid_text, started, task = [*held_by.split(":", 3), "", "", ""][:4]  # see owner()
    if task and _task == [task] and held_by.rsplit(":", 1)[0] != owner().rsplit(":", 1)[0]:
        return f"an earlier attempt of task {task} ({host}:{pid_text}) ended"
    if host == socket.gethostname() and pid_text.isdigit():
        alive = _process_start(int(pid_text))
        if alive is None or (started != "?" and alive != started):
            return f"its process {pid_text} on {host} is gone"
        return None  # alive on this host: its own (a lease renewed per epoch may be late)
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
        if reason is not None:  # read again: another process may have taken it since
            record = tracker.run_record(record.run_id)
            if record is None:  # deleted meanwhile
                continue
            reason = abandoned(record.tags) if record.status == "RUNNING" else None
        if reason is not None and CLAIM_TAG in record.tags:  # a claim its process left
            tracker.delete_run(record.run_id)
            continue
        if reason is not None:
            tracker.end_run(record.run_id, "KILLED", f"abandoned: {reason}")
            line = f"run {record.name} ({record.run_id}) was left RUNNING ({reason}): marked KILLED"
            print(line, file=stream)
            record = replace(record, status="KILLED")
        now.append(record)
    return now


@dataclass(frozen=True)
class Planned:
    run: RunSpec
    # "train", "continue" (a KILLED run of this key), "skip" (FINISHED), "elsewhere" (RUNNING
    # in another process), "failed" (FAILED during this invocation: not trained again by it)
    action: str
    previous: RunRecord | None = None  # the run skipped or continued


def plan(
    runs: Sequence[RunSpec], records: Sequence[RunRecord], rerun: bool, since_ms: int | None = None
) -> list[Planned]:
    """What to do with each run, given the grid's runs in the store (after
    :func:`recover_abandoned`), oldest first. ``since_ms``: when the invocation began (None:
    it is being planned now). ``rerun`` counts only runs begun since then (none, when planned
    now): every run trains again as a new sample, once."""
    by_key: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.key is None or (CLAIM_TAG in record.tags and record.status == "KILLED"):
            continue  # a claim counts while it runs, and when it FAILED (its run could not
            # be continued: planned again, it is not tried again by the same invocation)
        if rerun and (since_ms is None or record.start_time < since_ms):
            continue
        by_key.setdefault(record.key, []).append(record)
    failed_since = math.inf if since_ms is None else since_ms
    planned = []
    for run in runs:
        latest = {  # each status's latest record; a FAILED one only if it failed since then
            r.status: r
            for r in by_key.get(run.key, [])
            if r.status != "FAILED" or (r.end_time or r.start_time) >= failed_since
        }
        status = next((status for status in ACTIONS if status in latest), None)
        planned.append(Planned(run, ACTIONS.get(status, "train"), latest.get(status)))
    return planned


# what a run's latest record of a status makes of it, in this order of precedence
ACTIONS = {"FINISHED": "skip", "RUNNING": "elsewhere", "FAILED": "failed", "KILLED": "continue"}
