"""Claims: every run of a grid trains once, however many processes and machines share it (the
protocol and its rules: docs/scaling.md#exactly-once-claims).

Why at most one claimant wins: the stamp is taken after the claim run is in the store, and
the reading after the stamp plus ``settle``. Of two claimants A and B, if A's reading did
not show B's run, B's run reached the store after A read, so B's stamp is later than A's
(given clocks that differ by less than ``settle``), and B, whose reading shows A's run and
stamp, loses; if A's reading shows B's run, both compare the same two stamps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vaebench.lifecycle.claims import (
    CLAIM_TAG,
    KEEPER,
    OWNER_TAG,
    RunLease,
    abandoned,
    lease_tags,
    owner,
)
from vaebench.signals import deferred_signals
from vaebench.spec.grid import RunSpec
from vaebench.tracking.store import sqlite_path
from vaebench.tracking.tracker import RUN_KEY_TAG, RunRecord, Tracker

CLAIMED_AT_TAG = "vaebench.claimed_at"
SETTLE_ENV = "VAEBENCH_CLAIM_SETTLE"
# between stamping a claim and reading the others: more than the clocks of two machines
# that share a grid may differ (NTP keeps them within milliseconds); on one machine, a
# clock step between two stamps
REMOTE_SETTLE_SECONDS = 0.5
LOCAL_SETTLE_SECONDS = 0.01
UNSTAMPED_SECONDS = 60.0  # a claim run stays unstamped for milliseconds; older: not a claim
POLL_SECONDS = 0.05
# a rerun's claims read only the runs begun since the invocation, less this margin for the
# clocks of other machines that share the grid (the settle time assumes far closer clocks)
CLOCK_MARGIN_MS = 60_000


def settle_seconds(tracking_uri: str) -> float:
    """How long a claimant waits between stamping its claim and reading the others
    (``$VAEBENCH_CLAIM_SETTLE`` overrides): a local SQLite store shares this machine's clock."""
    if os.environ.get(SETTLE_ENV):
        return float(os.environ[SETTLE_ENV])
    return LOCAL_SETTLE_SECONDS if sqlite_path(tracking_uri) else REMOTE_SETTLE_SECONDS


def counted_since(since_ms: int, rerun: bool) -> int:
    """The earliest start of the runs a claim's decision counts (0: all of them): a rerun
    counts only those begun since the invocation (:func:`_verdict`,
    :func:`~vaebench.lifecycle.claims.plan`), so that its reads stay as short as the
    invocation however many runs of the grid the store holds."""
    return max(0, since_ms - CLOCK_MARGIN_MS) if rerun and since_ms > 0 else 0


def stamp() -> dict[str, str]:
    """The claim stamp to write once a claim (or a reopened run) is in the store."""
    return {CLAIMED_AT_TAG: str(time.time_ns() // 1000)}


def _order(record: RunRecord) -> tuple[int, str]:
    text = record.tags[CLAIMED_AT_TAG]
    return (int(text) if text.isdigit() else 0), record.run_id  # a malformed stamp: first


def _verdict(records: list[RunRecord], mine: RunRecord, since_ms: int, rerun: bool) -> str:
    """"wins", "loses" or "wait" (an unstamped live claim may turn out earlier)."""
    waiting = False
    for record in records:
        if record.run_id == mine.run_id or (rerun and record.start_time < since_ms):
            continue  # a rerun counts only what was begun during the invocation
        ended = record.end_time or record.start_time
        if record.status == "FINISHED" or (record.status == "FAILED" and ended >= since_ms > 0):
            return "loses"
        if record.status != "RUNNING" or abandoned(record.tags) is not None:
            continue
        young = time.time() * 1000 - record.start_time < UNSTAMPED_SECONDS * 1000
        if CLAIMED_AT_TAG not in record.tags and young:
            waiting = True
        elif CLAIMED_AT_TAG not in record.tags or _order(record) < _order(mine):
            return "loses"
    return "wait" if waiting else "wins"


def claim_holds(
    tracker: Tracker, experiment: str, key: str, claim_id: str, settle: float,
    since_ms: int = 0, rerun: bool = False,
) -> bool:
    """Whether the stamped claim ``claim_id`` (a RUNNING run of ``key`` this process
    created) wins; ``since_ms``: when the invocation began (0: unknown)."""
    time.sleep(settle)
    deadline = time.monotonic() + UNSTAMPED_SECONDS
    while True:
        records = tracker.previous_runs(
            experiment, RUN_KEY_TAG, key, begun_since_ms=counted_since(since_ms, rerun)
        )
        # a clock behind the invocation's by more than the margin leaves it out of the read
        mine = next((r for r in records if r.run_id == claim_id), None) or tracker.run_record(
            claim_id
        )
        if mine is None or CLAIMED_AT_TAG not in mine.tags:
            raise RuntimeError(f"claim {claim_id} of {key} is not in the store it was written to")
        verdict = _verdict(records, mine, since_ms, rerun)
        if verdict != "wait":
            return verdict == "wins"
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)


@dataclass(frozen=True)
class Claim:
    """A claim that won: its run, and its stamp (which a continued run takes over)."""

    run_id: str
    stamp: dict[str, str]


def claim_run(
    tracker: Tracker, experiment: str, run: RunSpec, tags: Mapping[str, str], settle: float,
    since_ms: int = 0, rerun: bool = False, continues: str | None = None,
    on_created: Callable[[str], None] | None = None,
) -> Claim | None:
    """None if another claimant holds ``run``. ``continues``: the stopped run this claim is for
    (the caller deletes the claim run once that run is reopened). ``on_created`` learns the
    claim run's id before a signal can stop this process, so that the caller can release it
    if the claim is never decided."""
    claim_tags = {**tags, RUN_KEY_TAG: run.key, **lease_tags()}
    if continues is not None:
        claim_tags[CLAIM_TAG] = continues
    with deferred_signals():  # the id is known to the caller before a signal acts
        claim_id = tracker.start_run(run.name, {} if continues else run.params, claim_tags)
        if on_created is not None:
            on_created(claim_id)
    stamped = stamp()
    tracker.set_tags(claim_id, stamped)
    if claim_holds(tracker, experiment, run.key, claim_id, settle, since_ms, rerun):
        KEEPER.hold(RunLease(tracker, claim_id))  # while it waits for its turn
        return Claim(claim_id, stamped)
    tracker.delete_run(claim_id)
    return None


class ClaimLost(Exception):
    """The stopped run this process claimed to continue is no longer its to continue (another
    process continued it, or the claim was taken away as abandoned): it lets go, writing
    nothing to that run."""


def check_continuation(tracker: Tracker, run_id: str | None, claim_id: str | None) -> None:
    """:class:`ClaimLost` unless the stopped run is still KILLED and this process's claim to it
    RUNNING under its lease, read just before the run is reopened."""
    if run_id is None or claim_id is None:
        return
    run = tracker.run_record(run_id)
    if run is None or run.status != "KILLED":
        status = "deleted" if run is None else run.status
        raise ClaimLost(f"run {run_id} is {status} (another process continued it)")
    claim = tracker.run_record(claim_id)
    if claim is None or claim.status != "RUNNING" or claim.tags.get(OWNER_TAG) != owner():
        raise ClaimLost(f"its claim {claim_id} was taken away (recovered as abandoned)")
