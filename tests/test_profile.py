"""``run --profile``: where an invocation's seconds go, as a Chrome trace and a table (issue 30).
A real run, timed by the real clock: the test checks what is recorded, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

from vaebench.timeline import Timeline

GRID = """
name: profiled
base:
  data: {subset: 256, validation: 128}
  model: {hidden: [16], z_dim: 2}
  train: {epochs: 2, batch_size: 64, device: cpu}
seeds: [0, 1]
"""


def test_phases_add_up_and_the_rest_is_other():
    timeline = Timeline()
    timeline.start()
    with timeline.phase("store", "a write"):
        time.sleep(0.05)
    timeline.add("epoch", "epoch 1", time.perf_counter() - 0.2, 0.2)
    timeline.group = "s0"
    with timeline.phase("pictures"):
        pass
    lines: list[str] = []
    timeline.table(type("Lines", (), {"write": lambda _, text: lines.append(text)})())
    table = "".join(lines)
    assert [p.category for p in timeline.phases] == ["imports", "store", "epoch", "pictures"]
    assert timeline.phases[1].seconds >= 0.05 and timeline.phases[3].group == "s0"
    assert "  s0: pictures" in table and "other" in table
    assert "fixed work (wall less epochs and validation)" in table
    off = Timeline()
    with off.phase("store"):
        pass
    assert off.phases == []  # off, nothing is kept


def test_a_profiled_run_writes_a_chrome_trace_of_its_phases(tmp_path: Path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID)
    trace = tmp_path / "trace.json"
    done = subprocess.run(
        [sys.executable, "-m", "vaebench", "run", "grid.yaml", "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-root", str(mnist_root),
         "--profile", str(trace), "--no-register"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["ph"] for e in events} == {"X"}
    categories = {e["cat"] for e in events}
    assert {"imports", "data and store", "epoch", "validation", "test", "clustering",
            "pictures", "artifacts", "report"} <= categories
    epochs = [e for e in events if e["cat"] == "epoch"]
    assert [e["name"] for e in epochs] == ["epoch 1", "epoch 2"]  # the stack of two's epochs
    assert all(e["args"]["run"] == "stack of 2 (s0, s1)" for e in epochs)
    assert f"profile: {trace}" in done.stderr and "fixed work" in done.stderr
