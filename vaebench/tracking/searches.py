"""The searches behind the Tracker's reads: filters the store applies, and pages read in turn
only as far as the caller reads. MLflow builds every run a search returns (its tags, params
and latest metrics: about 2 ms a run on SQLite), so a read that stops early, or that the store
filters, stays as short as what it needs however long a grid's history is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

OLDEST_FIRST = "attributes.start_time ASC"
NEWEST_FIRST = "attributes.start_time DESC"
PAGE = 200  # runs a page: about a grid's worth


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
