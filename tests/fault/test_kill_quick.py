"""The kill harness's quick subset (`bench/kill_points.py` runs >= 100 points): five SIGKILLs of a real `cos capture`
(mid shard write with the temp file cut short, mid finalize, at a random moment, just before and just after the final
rename), each checked and resumed; and COS_FAULT_POINT arming the hook in a fresh process (the bench also kills plain
`python -m cos_core.cli` processes that way).

Every kill must leave nothing a reader takes for complete unless it equals the uninterrupted run, never rewrite a
finished shard, and a rerun must end in the uninterrupted run's archive.
"""

from __future__ import annotations

import pytest

from .harness import KillHarness, KillPoint


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> KillHarness:
    h = KillHarness(tmp_path_factory.mktemp("kills"), n_seeds=4)
    h.reference()
    return h


@pytest.mark.parametrize("run_id, kills, modes", [
    ("mid-shard", [KillPoint("shard.tmp", nth=2, truncate=0.4), KillPoint("samples.tmp")], None),
    ("timed", [0.5, KillPoint("publish.before_rename")], None),  # half a sample's time after the 2nd shard
    ("renamed", [KillPoint("publish.done")], None),
])
def test_killed_captures_resume_to_the_uninterrupted_archive(harness, run_id, kills, modes):
    kills = [KillPoint(nth=2, delay=k * harness.shard_seconds) if isinstance(k, float) else k for k in kills]
    outcomes = harness.chain(run_id, kills, modes)
    problems = [f"{o.kill} ({o.mode}): {p}" for o in outcomes for p in o.problems]
    assert not problems, "\n".join(problems)
    named = [o for o in outcomes[:-1] if not o.kill.startswith("timed")]
    assert all(o.killed for o in named), [(o.kill, o.exitcode) for o in named]
    assert outcomes[-1].state["published"] and not outcomes[-1].state["partial"]


def test_cos_fault_point_kills_a_fresh_process_at_the_nth_arrival(tmp_path):
    """The environment variable path, without torch: a writer in a new interpreter dies at its 2nd finished shard."""
    import os
    import signal
    import subprocess
    import sys

    from .harness import REPO

    code = f"""
import numpy as np
from cos_core.archive.writer import RunWriter
w = RunWriter({str(tmp_path)!r}, "env", {{}})
for i in range(3):
    w.write_sample(i, {{"final": np.zeros((1, 1, 1, 1), np.float32)}}, {{"sample_id": str(i)}}, {{}})
print("not killed")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COS_FAULT_POINT": "shard.done@2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "env.partial" / "shards").iterdir()) == \
        ["sample_000000.safetensors", "sample_000001.safetensors"]


def test_the_harness_catches_a_torn_archive(harness):
    """The checks can fail: a published run whose shard was cut short is reported (as the bench would count it)."""
    import os
    import shutil

    from cos_core.archive.schema import shard_name

    shutil.copytree(harness.ref.path, harness.runs / "torn")
    shard = harness.runs / "torn" / shard_name(1)
    os.truncate(shard, shard.stat().st_size // 2)
    out = harness.run_once("torn", None)
    assert any("torn" in p for p in out.problems), out.problems
    shutil.rmtree(harness.runs / "torn")
