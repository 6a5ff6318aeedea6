"""Data-parallel capture throughput: 1 process vs N processes sharing one GPU (`torchrun`), same work items.

Runs the real `cos capture` (the shipped organism on the maze task, full default capture) under
`torchrun --standalone --nproc_per_node=N --device cuda`. Start-up (imports, model load, process group) is
measured with a 2-item job for each N and subtracted, so samples/s is the steady capture rate. Also checks that
the N-process archive equals the 1-process one. Writes bench/results/dp_share_gpu.json (or --out).

    python bench/dp_share_gpu.py --items 200 --procs 1,2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.archive import Archive  # noqa: E402


def job(procs: int, items: int, runs: Path, run_id: str) -> float:
    cmd = [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={procs}", "--no-python",
           sys.executable, "-m", "cos_core.cli", "capture", "--task", "maze", "--instances", str(items),
           "--device", "cuda", "--runs-dir", str(runs), "--run-id", run_id]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dp_share_gpu.json")
    args = p.parse_args()
    procs = [int(x) for x in args.procs.split(",")]
    result = {"items": args.items, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for n in procs:
            startup = job(n, 2, runs, f"startup{n}")
            wall = job(n, args.items, runs, f"p{n}")
            rate = (args.items - 2) / (wall - startup)
            result["runs"][n] = {"wall_s": wall, "startup_s": startup, "samples_per_s": rate,
                                 "per_rank_samples_per_s": rate / n}
            print(n, result["runs"][n], flush=True)
        ref = Archive.open(runs / f"p{procs[0]}")
        for n in procs[1:]:
            other = Archive.open(runs / f"p{n}")
            same = all(np.array_equal(ref.read(i, k), other.read(i, k))
                       for i in range(ref.n_samples) for k in ref.keys(i))
            result["runs"][n]["archive_equal_to_1_process"] = bool(same and ref.samples.equals(other.samples))
    base = result["runs"][procs[0]]["samples_per_s"]
    for n in procs:
        result["runs"][n]["speedup_vs_1"] = result["runs"][n]["samples_per_s"] / base
    try:
        import torch

        result["device"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - informational only
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
