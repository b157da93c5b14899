"""The helper process that makes clustering scores and figures beside this process's
work: the same scores and bytes as this process's, and a helper that dies or is signalled costs
no run its scores."""

from __future__ import annotations

import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from vaebench.lifecycle.finishing_helper import FinishingHelper, Pending, draw_here
from vaebench.lifecycle.run_figures import KL_PICTURE, LATENT_PICTURE, run_figures
from vaebench.plots import Curve, save_curves
from vaebench.reporting.figures import Drawings
from vaebench.scoring.clustering import ClusterInput, scored_clusters


def _inputs(seed: int = 0) -> list[ClusterInput]:
    """Two splits of points around ten centres, their labels the centres (k-means' case), and
    a split with categories (argmax q(c|x): no k-means)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(10, 6))
    made = []
    for prefix in ("test", "val"):
        labels = rng.integers(0, 10, size=800)
        means = (centres[labels] + rng.normal(size=(800, 6))).astype(np.float32)
        made.append(ClusterInput(prefix, labels, means, None))
    labels = rng.integers(0, 10, size=300)
    made.append(ClusterInput("other", labels, None, (labels + 1) % 10))
    return made


def _expected(inputs: list[ClusterInput]) -> dict[str, float]:
    return {name: value for one in inputs for name, value in scored_clusters(one).items()}


@pytest.fixture
def helper():
    made = FinishingHelper()
    yield made
    made.close()


def test_the_helper_process_scores_and_draws_what_this_process_does(helper):
    inputs = _inputs()
    drawn = (inputs[0].means[:500], inputs[0].labels[:500], "a run", (0.0, 1.5, 2.25), "val")
    pending = Pending(helper.submit_scores(inputs), helper.draw(run_figures, *drawn))
    scores = pending.scores_of(inputs)
    assert scores == _expected(inputs)
    pending.figures.future.result()  # drawn there, not taken back
    figures = pending.figures.result()
    assert set(figures) == {LATENT_PICTURE, KL_PICTURE}
    assert figures == run_figures(*drawn)  # the same files, byte for byte
    assert scores["other_accuracy"] == 1.0 and scores["other_nmi"] == pytest.approx(1.0)
    assert scores["test_nmi"] > 0.8  # well-separated centres: k-means finds them
    assert helper.pid != os.getpid()


def test_a_helper_process_that_died_leaves_the_scores_to_this_process(helper):
    inputs = _inputs(1)
    os.kill(helper.pid, signal.SIGKILL)
    latent = (inputs[0].means, inputs[0].labels, "")
    pending = Pending(helper.submit_scores(inputs), helper.draw(run_figures, *latent))
    if pending.scores is not None:  # submitted before the pool knew: the futures fail
        assert all(isinstance(f.exception(timeout=30), BrokenProcessPool) for f in pending.scores)
    assert pending.scores_of(inputs) == _expected(inputs)  # scored here instead
    assert pending.figures.result() == run_figures(*latent)  # drawn here instead


def test_ctrl_c_and_sigterm_are_the_invocations_to_act_on_not_the_helpers(helper):
    """A terminal's Ctrl-C reaches the process group: the helper has its own, and ignores
    SIGINT and SIGTERM sent to it (the invocation closes it)."""
    assert os.getpgid(helper.pid) != os.getpgid(0)
    os.kill(helper.pid, signal.SIGINT)
    os.kill(helper.pid, signal.SIGTERM)
    inputs = _inputs(2)
    assert Pending(helper.submit_scores(inputs)).scores_of(inputs) == _expected(inputs)
    helper.close()
    assert helper.submit_scores(inputs) is None
    assert helper.draw(run_figures, inputs[0].means, inputs[0].labels, "").future is None
    helper.close()  # again: nothing more


def test_the_helper_is_started_where_runs_are_finished_here_on_more_than_one_core():
    many = len(os.sched_getaffinity(0)) > 1
    assert FinishingHelper.worth_starting("local", 1, "auto") is many
    assert FinishingHelper.worth_starting("local", 1, "inline") is many
    assert not FinishingHelper.worth_starting("local", 1, "background")
    assert not FinishingHelper.worth_starting("local", 2, "auto")
    assert not FinishingHelper.worth_starting("local", "auto", "auto")
    assert not FinishingHelper.worth_starting("ray", 1, "auto")


def test_figures_the_helper_has_not_started_are_drawn_here(helper):
    """Behind a queue of k-means, the last figures asked for are taken back (cancelled) and
    left to this process; scores are waited for, and the same as this process's."""
    inputs = _inputs(3)
    queue = [helper.submit_scores(inputs) for _ in range(4)]
    latent = (inputs[0].means[:300], inputs[0].labels[:300], "queued")
    waiting = Pending(None, helper.draw(run_figures, *latent))
    assert waiting.figures.result() == run_figures(*latent)  # drawn here
    assert waiting.figures.future.cancelled()  # taken back from the helper
    for futures in queue:
        assert Pending(futures).scores_of(inputs) == _expected(inputs)


def test_report_figures_drawn_by_the_helper_are_the_files_drawn_here(helper, tmp_path):
    """A report's figures (plots.save_* functions, their file first) handed to the helper:
    the path at once, the file written by the helper, byte for byte this process's."""
    panels = {"panel": [Curve("a", [1, 2, 3], [0.5, 0.7, 0.6], [0.4, 0.6, 0.5], [0.6, 0.8, 0.7])]}
    arguments = (panels, "epoch", "validation ELBO", None, True)
    drawings = Drawings(helper.draw)
    there = drawings(save_curves, tmp_path / "there.png", *arguments)
    assert there == tmp_path / "there.png"
    drawings.wait()
    here = save_curves(tmp_path / "here.png", *arguments)
    assert there.read_bytes() == here.read_bytes()
    os.kill(helper.pid, signal.SIGKILL)  # gone: drawn here when waited for
    gone = Drawings(helper.draw)
    late = gone(save_curves, tmp_path / "late.png", *arguments)
    assert not late.exists()
    gone.wait()
    assert late.read_bytes() == here.read_bytes()


def _cannot_draw(path):
    raise ValueError(f"cannot draw {path.name}")


def test_a_drawing_is_made_once_and_the_helpers_error_reaches_the_caller(helper, tmp_path):
    calls: list[int] = []
    here = draw_here(calls.append, 1)
    assert here.result() is None and here.result() is None
    assert calls == [1]  # asked twice, made once
    failing = Drawings(helper.draw)
    failing(_cannot_draw, tmp_path / "x.png")
    with pytest.raises(ValueError, match="cannot draw x.png"):
        failing.wait()


def test_a_relative_path_is_this_processs_not_the_helpers(helper, tmp_path, monkeypatch):
    """The helper keeps the working folder it started in: a relative path is made absolute
    here before it is handed over."""
    assert helper.pid != os.getpid()  # started, in the test's first folder
    monkeypatch.chdir(tmp_path)
    panels = {"panel": [Curve("a", [1, 2], [0.5, 0.7])]}
    drawings = Drawings(helper.draw)
    relative = drawings(save_curves, Path("figure.png"), panels, "epoch", "value")
    helper.draw(os.getpid).future.result()  # in turn: the figure was drawn there, not here
    drawings.wait()
    assert relative == Path("figure.png") and (tmp_path / "figure.png").stat().st_size > 1000
