"""The searches behind the Tracker's reads: filters the store applies, and pages read in turn
only as far as the caller reads. MLflow builds every run a search returns (its tags, params
and latest metrics: about 2 ms a run on SQLite), so a read that stops early, or that the store
filters, stays as short as what it needs however long a grid's history is."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

RUN_KEY_TAG = "vaebench.run_key"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's, on a child run: its invocation's parent run
OLDEST_FIRST = "attributes.start_time ASC"  # MLflow then orders by run id
NEWEST_FIRST = "attributes.start_time DESC"
PAGE = 200  # runs a page: about a grid's worth


@dataclass(frozen=True)
class RunRecord:
    """A run already in the store: what a rerun needs to skip, recover or continue it."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED, SCHEDULED
    tags: dict[str, str]
    start_time: int  # ms since the epoch
    metrics: dict[str, float]  # each metric's latest value
    end_time: int | None = None  # ms since the epoch; None while it runs

    @property
    def key(self) -> str | None:
        return self.tags.get(RUN_KEY_TAG)

    @property
    def order(self) -> tuple[int, str]:
        """Where it stands among runs read oldest first (its start, then its id)."""
        return self.start_time, self.run_id


def record_of(run: Any) -> RunRecord:
    info = run.info
    return RunRecord(
        info.run_id, info.run_name, info.status, dict(run.data.tags), info.start_time,
        dict(run.data.metrics), info.end_time,
    )


def tagged(
    tag: str, value: str, *, begun_since_ms: int = 0, status: str | None = None,
    unfinished_only: bool = False,
) -> str:
    """The filter of runs whose tag ``tag`` is ``value``: begun at ``begun_since_ms`` or later
    (0: whenever), of ``status`` (None: any), not FINISHED (``unfinished_only``)."""
    conditions = [f"tags.`{tag}` = '{value}'"]
    if begun_since_ms:
        conditions.append(f"attributes.start_time >= {int(begun_since_ms)}")
    if status is not None:
        conditions.append(f"attributes.status = '{status}'")
    if unfinished_only:
        conditions.append("attributes.status != 'FINISHED'")
    return " and ".join(conditions)


def runs_found(
    client: Any, experiment_id: str, condition: str, order: str, page: int = PAGE
) -> Iterator[Any]:
    """MLflow's runs of the experiment that meet ``condition`` in ``order`` (start time, then
    run id), ``page`` at a time, each page read when the one before is used up."""
    token = None
    while True:
        found = client.search_runs([experiment_id], filter_string=condition, max_results=page,
                                   order_by=[order], page_token=token)
        yield from found
        token = found.token
        if not token:
            return


def latest_of_each(records: Iterable[RunRecord], keys: Collection[str]) -> dict[str, RunRecord]:
    """Each key's latest record (the last read oldest first: latest start, then greatest run
    id) among ``records`` read newest first; read until one begun before every key's latest
    (runs begun in the same millisecond come in run id order, the greatest last)."""
    latest: dict[str, RunRecord] = {}
    for record in records:
        if len(latest) == len(keys) and record.start_time < min(
            kept.start_time for kept in latest.values()
        ):
            break
        if record.key not in keys:
            continue
        kept = latest.get(record.key)
        if kept is None or record.order > kept.order:
            latest[record.key] = record
    return latest


def latest_finished(
    client: Any, experiment_id: str, tag: str, value: str, keys: Collection[str]
) -> list[RunRecord]:
    """Each of ``keys``' latest FINISHED run among the runs whose tag ``tag`` is ``value``;
    none for a key never finished. One page newest first, twice as many runs as keys (a
    grid's latest invocation, mostly); a key it leaves open (never finished, finished long
    ago, or its latest begun as the page ends) is looked up alone, as long as runs it needs."""
    wanted = set(keys)
    if not wanted:
        return []
    page = 2 * len(wanted)
    newest = runs_found(client, experiment_id, tagged(tag, value, status="FINISHED"),
                        NEWEST_FIRST, page)
    first = [record_of(run) for run in islice(newest, page)]
    latest = latest_of_each(first, wanted)
    if len(first) < page:  # every FINISHED run read
        return list(latest.values())
    open_keys = [key for key in wanted
                 if key not in latest or latest[key].start_time == first[-1].start_time]
    for key in open_keys:
        alone = runs_found(client, experiment_id, tagged(RUN_KEY_TAG, key, status="FINISHED"),
                           NEWEST_FIRST, 2)
        latest.update(latest_of_each((record_of(run) for run in alone), {key}))
    return list(latest.values())
