"""Who owns a RUNNING run, and what a rerun does with a grid's runs (docs/resume.md#abandoned-runs);
a claim made to continue a stopped run is a run of its own, tagged :data:`CLAIM_TAG`."""

from __future__ import annotations

import functools
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TextIO

import psutil

from vaebench.spec.grid import RunSpec
from vaebench.tracking.tracker import RunRecord, Tracker

OWNER_TAG = "vaebench.lease_owner"
EXPIRES_TAG = "vaebench.lease_expires"
# at least; a lease covers three of the run's longest epochs ($VAEBENCH_LEASE_SECONDS: tests)
LEASE_SECONDS = float(os.environ.get("VAEBENCH_LEASE_SECONDS", 900))
LEASE_EPOCHS = 3
CLAIM_TAG = "vaebench.claim_for"  # on a claim run: the id of the stopped run it continues


UNKNOWN_START = "?"  # a process that runs, on a platform that does not say since when


@functools.cache
def this_host() -> str:
    """This host in an owner: its name, and its pid namespace where shown (containers that
    share a host name but not a process table are different hosts)."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid').strip('pid:[]')}"
    except OSError:  # no /proc (macOS), or /proc hidden
        return socket.gethostname()


@functools.cache
def _process_table_readable() -> bool:
    return psutil.pid_exists(os.getpid())  # psutil reads /proc on Linux: it can see processes


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (psutil's creation time), None if no such process runs."""
    if _process_table_readable():
        try:
            process = psutil.Process(pid)
            gone = process.status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped
            return None if gone else f"{process.create_time():.2f}"
        except psutil.NoSuchProcess:
            return None
        except psutil.Error:  # it runs, and we may not look
            return UNKNOWN_START
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return UNKNOWN_START


_task: list[str] = []  # the unit of work this process runs now, if an executor names one


def set_task(task: str | None) -> None:
    """Name the unit of work (a Ray task's id) that this process's leases belong to; an
    executor that runs a unit again after its process died sets the same name, and the
    runs left RUNNING by the dead attempt are abandoned at once, on any host."""
    _task[:] = [task] if task else []


def owner() -> str:
    """This process as a lease owner: ``host:pid:start``, then ``:task`` if one is set."""
    pid = os.getpid()
    base = f"{this_host()}:{pid}:{_process_start(pid) or UNKNOWN_START}"
    return ":".join([base, *_task])


def lease_tags(longest_epoch_seconds: float = 0.0, runs_at_once: int = 1) -> dict[str, str]:
    """The lease to write now: this process, for the next few epochs; before an epoch is
    timed, :data:`LEASE_SECONDS` per run trained at once (a stack of K on the CPU takes up to
    K times one run's epoch)."""
    seconds = lease_seconds(longest_epoch_seconds, runs_at_once)
    return {OWNER_TAG: owner(), EXPIRES_TAG: f"{time.time() + seconds:.0f}"}


def lease_seconds(longest_epoch_seconds: float = 0.0, runs_at_once: int = 1) -> float:
    return max(LEASE_SECONDS * runs_at_once, LEASE_EPOCHS * longest_epoch_seconds)


@dataclass
class RunLease:
    """A run's lease as :data:`KEEPER` renews it, until the run is no longer RUNNING."""

    tracker: Tracker
    run_id: str
    longest_epoch_seconds: float = 0.0
    runs_at_once: int = 1

    @property
    def key(self) -> str:
        return self.run_id

    def tags(self) -> dict[str, str]:
        return lease_tags(self.longest_epoch_seconds, self.runs_at_once)

    def period(self) -> float:
        return lease_seconds(self.longest_epoch_seconds, self.runs_at_once) / 3

    def renew(self) -> bool:
        record = self.tracker.run_record(self.run_id)
        if record is None or record.status != "RUNNING":
            return False
        self.tracker.set_tags(self.run_id, self.tags())
        return True


class Lease(Protocol):
    """What :data:`KEEPER` renews: a run's lease, an Optuna trial's heartbeat."""

    @property
    def key(self) -> str: ...

    def tags(self) -> dict[str, str]: ...  # the lease to write now

    def period(self) -> float: ...  # seconds between renewals

    def renew(self) -> bool: ...  # False: the run or trial ended, let go


class LeaseKeeper:
    """Renews, from one daemon thread, every lease this process holds, each every third of its
    length. Leases written only with an epoch's metrics ran out while a claimed run waited
    behind its group, during a slow first epoch or the final scoring (IWAE): another host then
    took the live run for abandoned."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[Lease, float]] = {}  # key -> (lease, when it is due)
        self.lock, self.changed = threading.Lock(), threading.Event()
        self.thread: threading.Thread | None = None

    def hold(self, lease: Lease) -> dict[str, str]:
        """The lease to write now; renewed from now on (holding a run again replaces its
        lease, e.g. a longer one once an epoch is timed)."""
        tags = lease.tags()
        with self.lock:
            self.held[lease.key] = (lease, time.monotonic() + lease.period())
            if self.thread is None:
                self.thread = threading.Thread(target=self._keep, name="leases", daemon=True)
                self.thread.start()
        self.changed.set()
        return tags

    def let_go(self, *keys: str | None) -> None:
        with self.lock:
            for key in keys:
                self.held.pop(key, None)

    def _keep(self) -> None:
        while True:
            self.changed.clear()
            with self.lock:
                now, leases = time.monotonic(), list(self.held.values())
            due = [lease for lease, when in leases if when <= now]
            if not due:
                next_due = min((when for _, when in leases), default=None)
                self.changed.wait(None if next_due is None else next_due - now)
                continue
            for lease in due:
                try:
                    held = lease.renew()
                except Exception as exc:  # noqa: BLE001 - the other leases are still renewed
                    print(f"vaebench: lease {lease.key} not renewed: {exc}", file=sys.stderr)
                    held = True
                again = time.monotonic() + lease.period()
                with self.lock:
                    if self.held.get(lease.key, (None,))[0] is not lease:
                        continue  # let go or replaced meanwhile
                    if held:
                        self.held[lease.key] = (lease, again)
                    else:
                        del self.held[lease.key]


KEEPER = LeaseKeeper()
os.register_at_fork(after_in_child=KEEPER.__init__)  # a forked child holds none of these


def abandoned(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags has no live owner, or None if it may still have one."""
    held_by = tags.get(OWNER_TAG)
    if held_by is None:
        return "no lease (left by an earlier vaebench)"
    host, pid_text, started, task = [*held_by.split(":", 3), "", "", ""][:4]  # see owner()
    if task and _task == [task] and held_by.rsplit(":", 1)[0] != owner().rsplit(":", 1)[0]:
        return f"an earlier attempt of task {task} ({host}:{pid_text}) ended"
    if host == this_host() and pid_text.isdigit():
        alive = _process_start(int(pid_text))
        if alive is None or UNKNOWN_START not in (alive, started) and alive != started:
            return f"its process {pid_text} on {host} is gone"
        if UNKNOWN_START not in (alive, started):
            return None  # its own process runs (a lease renewed per epoch may be late)
    if EXPIRES_TAG not in tags:  # an owner without a lease: a heartbeat decides (Optuna's)
        return None
    expires = float(tags[EXPIRES_TAG] or 0)
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
