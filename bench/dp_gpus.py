"""Data-parallel capture scaling over GPUs: `torchrun --nproc_per_node=N cos capture` for N = 1, 2, 4, 8.

The workload is Wan2.1-1.3B's architecture with random weights in bf16 (`--model random:wan2.1-1.3b`, 480x832x33,
20 steps, CFG 5), capturing frame_mean and token_norm on all 30 blocks x all steps x both branches plus x̂0 at every
step (float16), the same work items (seeds) for every N. Throughput = items / the capture phase's wall time that
the manifest records (`timing.capture_s`: from the configuration barrier to the last rank's last shard, all ranks
together; process start-up and model build are excluded and reported separately as `wall_s`). Scaling efficiency =
throughput_N / (N x throughput_1). Every N-GPU archive is compared tensor by tensor with the 1-GPU one.

    python bench/dp_gpus.py --gpus 1,2 --seeds 0:16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.archive import Archive  # noqa: E402
from cos_core.archive.schema import PROVENANCE_KEYS  # noqa: E402

# NVLink multicast stays off (the lent machines require it; only gloo barriers are used here anyway)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def capture_command(n_gpus: int, args: argparse.Namespace, runs: Path, run_id: str) -> list[str]:
    return [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={n_gpus}", "--no-python",
            sys.executable, "-m", "cos_core.cli", "capture", "--model", "random:wan2.1-1.3b", "--dtype", "bfloat16",
            "--seeds", args.seeds, "--num-inference-steps", str(args.steps), "--height", str(args.height),
            "--width", str(args.width), "--num-frames", str(args.frames), "--reductions", "frame_mean,token_norm",
            "--tensors", "x0_hat", "--store-dtype", "float16", "--runs-dir", str(runs), "--run-id", run_id]


def compare(a: Archive, b: Archive) -> dict:
    """Equal tensors, samples table and manifest (apart from provenance and timing)?"""
    worst, differing = 0.0, []
    for i in range(a.n_samples):
        if a.keys(i) != b.keys(i):
            return {"equal": False, "why": f"sample {i} keys differ"}
        for key in a.keys(i):
            x, y = a.read(i, key), b.read(i, key)
            if not np.array_equal(x, y):
                differing.append(f"{i}:{key}")
                worst = max(worst, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
    skip = PROVENANCE_KEYS
    same_manifest = ({k: v for k, v in a.manifest.items() if k not in skip}
                     == {k: v for k, v in b.manifest.items() if k not in skip})
    return {"equal": not differing and same_manifest and a.samples.equals(b.samples),
            "tensors_differing": len(differing), "first_differing": differing[:5], "max_abs_diff": worst,
            "manifest_equal": same_manifest, "samples_equal": bool(a.samples.equals(b.samples))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="GPU counts to run, comma list (default 1,2)")
    p.add_argument("--seeds", default="0:16", help="work items: seeds, as `cos capture --seeds` (default 0:16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--runs-dir", type=Path, help="keep the archives here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dp_gpus.json")
    args = p.parse_args()
    import torch

    gpus = [int(g) for g in args.gpus.split(",")]
    if 1 not in gpus:
        raise SystemExit("--gpus must include 1: efficiency is measured against one GPU")
    if max(gpus) > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    env = {**os.environ, **SAFE_ENV}
    result = {"device": torch.cuda.get_device_name(0), "gpus_present": torch.cuda.device_count(),
              "torch": torch.__version__, "config": vars(args) | {"out": str(args.out), "runs_dir": str(args.runs_dir)},
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs_dir or Path(tmp)
        for n in sorted(gpus):
            cmd = capture_command(n, args, runs, f"gpus{n}")
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            archive = Archive.open(runs / f"gpus{n}")
            timing = archive.manifest["timing"]
            items = archive.n_samples
            row = {"command": " ".join(cmd), "items": items,
                   "capture_s": timing["capture_s"], "wall_s": round(wall, 2),
                   "samples_per_s": items / timing["capture_s"], "world_size": timing["world_size"]}
            result["runs"][str(n)] = row
            print(json.dumps({"gpus": n, **row}), flush=True)
        base = result["runs"]["1"]["samples_per_s"]
        ref = Archive.open(runs / "gpus1")
        for n in sorted(gpus):
            row = result["runs"][str(n)]
            row["efficiency"] = row["samples_per_s"] / (n * base)
            row["speedup"] = row["samples_per_s"] / base
            if n != 1:
                row["vs_1_gpu"] = compare(Archive.open(runs / f"gpus{n}"), ref)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({n: {k: r[k] for k in ("samples_per_s", "efficiency")} | {"equal": r.get("vs_1_gpu", {}).get(
        "equal", True)} for n, r in result["runs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
