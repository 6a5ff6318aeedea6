"""Concurrency with real processes (issue 19): labels saved at the same moment by several processes and threads are all
kept and never torn; derived tables published again and again, by two publishers at once, while readers read them,
are always read as one whole set; a publisher SIGKILLed at a random moment or at either fault point leaves the old
set or the new one, and the next publish removes what it left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from cos_core.archive import ArchiveError, publish_derived
from cos_core.archive.derived import read_derived_set, read_set
from cos_core.archive.labels import add_label, read_labels

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
PREAMBLE = """
import json, os, sys, time
from pathlib import Path
import pandas as pd
run, who, n, go, stop = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
while not go.exists():  # every process starts at the same moment
    time.sleep(0.001)
"""
LABELS = PREAMBLE + """
from cos_core.archive.labels import add_label
for k in range(n):
    add_label(run, {"sample": 0, "sample_id": "s0", "category": "Memory", "step": k, "note": f"{who}-{k}",
                    "created": ""})
"""
LABEL_READER = PREAMBLE + """
from cos_core.archive import ArchiveError
from cos_core.archive.labels import read_labels
reads, torn, last, shrank = 0, [], 0, 0
while not stop.exists():
    try:
        count = len(read_labels(run))
        shrank += count < last
        last = count
    except ArchiveError as err:
        torn.append(str(err))
    reads += 1
print(json.dumps({"reads": reads, "torn": torn[:3], "n_torn": len(torn), "shrank": shrank}))
"""
PUBLISH = PREAMBLE + """
from cos_core.archive import publish_derived
def tables(who, g):
    grid = pd.DataFrame({"label": ["goal"] * 6, "layer": [0, 0, 0, 1, 1, 1], "step": [0, 1, 2] * 2,
                         "accuracy": [g / 1000] * 6, "chance": [0.5] * 6, "n": [g] * 6})
    if who == "b":  # the second publisher owns another table
        return {"ensemble": pd.DataFrame({"method": ["mean_x_t"] * 3, "k": [0, 1, 2], "n": [g] * 3,
                                          "accuracy": [0.5] * 3})}
    return {"probe_grid": grid, "events": pd.DataFrame({"sample": [0, 1], "kind": ["switch"] * 2, "step": [g] * 2})}
for g in range(1, n + 1):
    publish_derived(run, tables(who, g), producer=f"publisher {who}")
    print(g, flush=True)
"""
SET_READER = PREAMBLE + """
from cos_core.archive import ArchiveError
from cos_core.archive.derived import MissingTable, read_derived_set
reads, mixed, errors, seen = 0, [], [], set()
while not stop.exists():
    try:
        t = read_derived_set(run, ["probe_grid", "events"])
        gens = set(t["probe_grid"]["n"]) | set(t["events"]["step"])
        if len(gens) != 1:
            mixed.append(sorted(gens))
        seen |= gens
        reads += 1
    except MissingTable:
        pass  # before the first publish
    except ArchiveError as err:
        errors.append(str(err))
print(json.dumps({"reads": reads, "mixed": mixed[:3], "errors": errors[:3], "n_errors": len(errors),
                  "generations": len(seen)}))
"""


class Crowd:
    """Worker processes that start together (a "go" file) and readers that run until a "stop" file appears."""

    def __init__(self, tmp: Path, run: Path):
        self.tmp, self.run, self.procs = tmp, run, []
        self.go, self.stop = tmp / "go", tmp / "stop"

    def start(self, script: str, who: str, n: int = 0, **kw) -> subprocess.Popen:
        path = self.tmp / f"{who}.py"
        path.write_text(script)
        proc = subprocess.Popen([sys.executable, str(path), str(self.run), who, str(n), str(self.go), str(self.stop)],
                                env={**ENV, **kw.get("env", {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> str:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def crowd(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    c = Crowd(tmp_path, run)
    yield c
    c.close()


def test_labels_saved_at_once_by_processes_and_threads_are_all_kept_and_never_torn(crowd):
    n, writers, threads = 25, 4, 3
    procs = [crowd.start(LABELS, f"p{i}", n) for i in range(writers)]
    reader = crowd.start(LABEL_READER, "reader")
    time.sleep(1.0)  # let the interpreters import before the start signal (they wait for it)

    def save(who: str) -> None:
        for k in range(n):
            add_label(crowd.run, {"sample": 1, "sample_id": "s1", "category": "Memory", "step": k, "note": f"{who}-{k}",
                                  "created": ""})

    pool = [threading.Thread(target=save, args=(f"t{i}",)) for i in range(threads)]
    crowd.go.touch()
    for t in pool:
        t.start()
    for proc in procs:
        crowd.finish(proc)
    for t in pool:
        t.join(300)
    crowd.stop.touch()
    seen = json.loads(crowd.finish(reader))
    notes = [label["note"] for label in read_labels(crowd.run)]
    want = {f"{who}-{k}" for who in [*(f"p{i}" for i in range(writers)), *(f"t{i}" for i in range(threads))]
            for k in range(n)}
    assert len(notes) == len(want) and set(notes) == want, f"{len(want) - len(set(notes))} labels lost"
    assert seen["reads"] > 20 and seen["n_torn"] == 0 and seen["shrank"] == 0, seen
    assert not [p.name for p in crowd.run.iterdir() if ".tmp-" in p.name]


def test_derived_sets_published_by_two_publishers_are_read_whole_and_none_is_lost(crowd):
    n = 30
    a, b = crowd.start(PUBLISH, "a", n), crowd.start(PUBLISH, "b", n)
    readers = [crowd.start(SET_READER, f"r{i}") for i in range(2)]
    time.sleep(1.0)
    crowd.go.touch()
    crowd.finish(a)
    crowd.finish(b)
    crowd.stop.touch()
    for reader in readers:
        seen = json.loads(crowd.finish(reader))
        assert seen["reads"] > 10 and not seen["mixed"] and seen["n_errors"] == 0, seen
        assert seen["generations"] > 3, seen  # the readers did read while the sets changed
    body = read_set(crowd.run)
    assert sorted(body["tables"]) == ["ensemble", "events", "probe_grid"], "a concurrent publish lost a table"
    final = read_derived_set(crowd.run, ["probe_grid", "events", "ensemble"])
    assert set(final["probe_grid"]["n"]) == set(final["events"]["step"]) == set(final["ensemble"]["n"]) == {n}
    assert body["tables"]["ensemble"]["producer"] == "publisher b"
    assert not [p.name for p in crowd.run.iterdir() if p.name.startswith(".derived.") and p.name != ".derived.lock"]


def whole_set(run: Path) -> int:
    """The generation of the set in derived/ (checked whole: every listed table there, matching its checksum, all
    of one generation, nothing else in the folder)."""
    body = read_set(run)
    tables = read_derived_set(run, sorted(body["tables"]))
    gens = set(tables["probe_grid"]["n"]) | set(tables["events"]["step"])
    assert len(gens) == 1, gens
    assert sorted(os.listdir(run / "derived")) == sorted([*(f"{t}.parquet" for t in body["tables"]), "manifest.json"])
    return gens.pop()


@pytest.mark.parametrize("point, expect", [("derived.written", 1), ("derived.swapped", 2)])
def test_a_publisher_killed_at_a_fault_point_leaves_the_old_or_the_new_set(crowd, point, expect):
    crowd.go.touch()
    crowd.finish(crowd.start(PUBLISH, "a", 1))
    killed = crowd.start(PUBLISH, "a", 2, env={"COS_FAULT_POINT": f"{point}@2"})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert whole_set(crowd.run) == expect
    left = [p for p in crowd.run.iterdir() if p.name.startswith(".derived.tmp-")]
    assert len(left) == 1  # the new set not swapped in (written), or the old one not yet removed (swapped)
    publish_derived(crowd.run, {"events": pd.DataFrame({"sample": [0, 1], "kind": ["x"] * 2, "step": [expect] * 2})},
                    producer="next")
    assert not any(p.exists() for p in left) and whole_set(crowd.run) == expect


def test_a_publisher_killed_at_random_moments_always_leaves_one_whole_set(crowd):
    rng = random.Random(19)
    crowd.go.touch()
    crowd.finish(crowd.start(PUBLISH, "a", 1))
    kills, generations = 0, set()
    for _ in range(8):
        proc = crowd.start(PUBLISH, "a", 1000)
        proc.stdout.readline()  # it has published once: it is inside its loop now
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += proc.returncode == -signal.SIGKILL
        generations.add(whole_set(crowd.run))
    assert kills == 8 and len(generations) > 1
    publish_derived(crowd.run, {"events": pd.DataFrame({"sample": [0], "kind": ["x"], "step": [1]})}, producer="next")
    assert not [p.name for p in crowd.run.iterdir() if p.name.startswith(".derived.t")]


def test_a_reader_of_a_set_never_sees_a_table_the_manifest_does_not_record(tmp_path, monkeypatch):
    """A publish that swaps the set between a reader's manifest read and its table read: the reader reads again."""
    from cos_core.archive import derived, tables

    run = tmp_path / "run"
    run.mkdir()
    grid = pd.DataFrame({"label": ["g"], "layer": [0], "step": [0], "accuracy": [0.5], "chance": [0.5], "n": [1]})
    publish_derived(run, {"probe_grid": grid}, producer="one")
    original, swapped = tables.read_parquet, []

    def read_then_publish(*args, **kwargs):
        if not swapped:  # the first table read: another publisher swaps the set under it
            swapped.append(True)
            publish_derived(run, {"probe_grid": grid.assign(n=2)}, producer="two")
        return original(*args, **kwargs)

    monkeypatch.setattr(derived, "read_parquet", read_then_publish)
    assert read_derived_set(run, ["probe_grid"])["probe_grid"]["n"].tolist() == [2] and swapped
    monkeypatch.undo()
    grid.assign(n=3).to_parquet(run / "derived" / "probe_grid.parquet", index=False)  # changed by hand: no new set
    with pytest.raises(ArchiveError, match="is not the table derived/manifest.json records"):
        read_derived_set(run, ["probe_grid"])
