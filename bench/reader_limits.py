"""What the reader's limits and checks cost and save (issue 19), each against the old code path in the same run:

- memory of reading a 60 M-row parquet bomb (a few hundred KB) the old way (`pd.read_parquet`) vs `Archive.derived`;
- memory of a 57 MB manifest parsed the old way (`json.loads`, accepted up to 64 MiB) vs `read_manifest` (8 MiB limit),
  and of the largest manifest the new limit accepts;
- labels saved by two Streamlit sessions (threads of one process) at the same moment, 100 trials, the old way (one
  temp file per pid, no lock) vs `add_label`; and by 4 processes x 25 saves;
- the time of checking a shard's content checksum (first read) against a read without it, and of reading a derived
  table through the checks vs `pd.read_parquet`.

Memory: the peak RSS of a fresh child process during the read, above its RSS after the imports (Linux clear_refs).
`python bench/reader_limits.py` (about 2 minutes on a 2-core machine); writes bench/results/reader_limits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cos_core.archive import Archive  # noqa: E402
from cos_core.archive.labels import add_label  # noqa: E402

CHILD = """
import sys, json
mode, path = sys.argv[1], sys.argv[2]
import pandas as pd
from cos_core.archive import Archive, ArchiveError
from cos_core.archive.manifest import read_manifest

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
before = status("VmRSS:")
ok = True
try:
    if mode == "old-table":
        pd.read_parquet(path)
    elif mode == "new-table":
        Archive.open(path).derived("step_answers")
    elif mode == "old-manifest":
        json.loads(open(path, encoding="utf-8").read())
    elif mode == "new-manifest":
        read_manifest(path)
except (ArchiveError, ValueError) as err:
    ok = str(err)[:200]
print(json.dumps({"extra_mb": round(status("VmHWM:") - before, 1), "result": ok}))
"""


def child(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    if out.returncode != 0:
        return {"extra_mb": None, "result": f"crashed: {out.stderr[-300:]}"}
    return json.loads(out.stdout)


def memory(root: Path) -> dict:
    run = root / "runs" / "organism-fork"
    import shutil

    shutil.copytree(REPO / "cached_runs" / "organism-fork", run)
    shutil.rmtree(run / "derived")
    (run / "derived").mkdir()
    bomb = run / "derived" / "step_answers.parquet"
    pq.write_table(pa.table({"sample": pa.array(np.zeros(60_000_000, np.int64)), "step": pa.array(
        np.zeros(60_000_000, np.int64)), "correct": pa.array(np.ones(60_000_000, bool))}), bomb, compression="zstd")
    big = root / "big" / "manifest.json"
    big.parent.mkdir()
    big.write_text("[" + ",".join(["{}"] * (57_000_000 // 3)) + "]")
    at_limit = root / "limit" / "manifest.json"
    at_limit.parent.mkdir()
    at_limit.write_text("[" + ",".join(["{}"] * (8 * 2**20 // 3 - 1)) + "]")
    rows = {}
    for name, mode, path in (("bomb, old reader (pd.read_parquet)", "old-table", bomb),
                             ("bomb, Archive.derived", "new-table", run),
                             ("57 MB manifest, old reader (json.loads)", "old-manifest", big),
                             ("57 MB manifest, read_manifest", "new-manifest", big.parent),
                             ("8 MiB manifest (the limit), json.loads", "old-manifest", at_limit)):
        got = child(mode, path)
        size = (path if path.is_file() else bomb if mode == "new-table" else path / "manifest.json").stat().st_size
        rows[name] = {"file_bytes": size, **got}
        print(f"{name}: {rows[name]}", flush=True)
    return rows


# ---- labels --------------------------------------------------------------------------------------------------------
def old_save(run: Path, label: dict) -> None:
    """The labels save before issue 19: read, append, write through `.annotations.json.tmp-<pid>`, no lock."""
    path = run / "annotations.json"
    labels = json.loads(path.read_text()) if path.exists() else []
    labels.append(label)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(labels, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def two_sessions(save, trials: int, root: Path) -> dict:
    """`trials` times: two threads save one label each at the same moment; count lost labels and invalid JSON."""
    lost = torn = errors = 0
    for trial in range(trials):
        run = root / f"t{trial}"
        run.mkdir()
        barrier = threading.Barrier(2)

        def one(who: str) -> None:
            nonlocal errors
            barrier.wait()
            try:
                save(run, {"sample": 0, "sample_id": "s", "category": "Memory", "step": None, "note": who,
                           "created": ""})
            except Exception:  # noqa: BLE001 - the old save fails in several ways (a temp renamed by the other)
                errors += 1

        threads = [threading.Thread(target=one, args=(w,)) for w in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            saved = json.loads((run / "annotations.json").read_text())
            lost += len(saved) < 2
        except (ValueError, OSError):
            torn += 1
    return {"trials": trials, "trials_with_a_lost_label": lost, "trials_with_invalid_json": torn,
            "saves_that_raised": errors}


def checks(root: Path) -> dict:
    run = root / "runs" / "organism-fork"
    shard = run / "shards" / "sample_000000.safetensors"
    out = {"shard_bytes": shard.stat().st_size}
    reps = 30
    timings = {}
    for name, verify in (("read without checksum", False), ("first read, checksum checked", True)):
        start = time.perf_counter()
        for _ in range(reps):
            Archive(run, Archive.open(run).manifest, verify=verify).read(0, "final")
        timings[name] = (time.perf_counter() - start) / reps
    out["shard_first_read_s"] = timings
    out["checksum_overhead_ratio"] = round(timings["first read, checksum checked"] /
                                           timings["read without checksum"], 2)
    from cos_core.archive.shards import file_digest

    blob = root / "big.bin"
    arr = np.random.default_rng(0).integers(0, 255, 256 * 2**20, dtype=np.uint8)
    from safetensors.numpy import save_file

    save_file({"x": arr}, str(blob))
    start = time.perf_counter()
    with open(blob, "rb") as f:
        file_digest(f)
    out["checksum_mb_per_s_256mb_shard_file"] = round(256 / (time.perf_counter() - start), 1)
    from cos_core.archive.shards import array_digest

    start = time.perf_counter()
    array_digest({"x": arr})
    out["checksum_mb_per_s_256mb_arrays_at_write"] = round(256 / (time.perf_counter() - start), 1)
    table = REPO / "cached_runs" / "organism-fork" / "derived" / "probe_grid.parquet"
    tset = {}
    for name, read in (("pd.read_parquet", lambda: pd.read_parquet(table)),
                       ("Archive.derived (size, footer, kinds, checksum)",
                        lambda: Archive.open(REPO / "cached_runs" / "organism-fork").derived("probe_grid"))):
        start = time.perf_counter()
        for _ in range(reps):
            read()
        tset[name] = (time.perf_counter() - start) / reps
    out["derived_read_s"] = tset
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reader_limits.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
                  "memory": memory(root)}
        (root / "old").mkdir()
        (root / "new").mkdir()
        result["labels_two_sessions"] = {"old save": two_sessions(old_save, args.trials, root / "old"),
                                         "add_label": two_sessions(add_label, args.trials, root / "new")}
        print(result["labels_two_sessions"], flush=True)
        result["checks"] = checks(root)
        print(result["checks"], flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
