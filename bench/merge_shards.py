"""CPU-side publish ("merge") time of a many-shard archive: the work rank 0 does after every rank has finished.

Writes N small shards (a few KB each, like a reductions-only capture of a small model) with `RunWriter`, then
times `finalize` (reads every shard's metadata, writes samples.parquet and the manifest, renames) and a full
`Archive.open` + samples read. Baseline in the same run: the time to write the shards. Writes
bench/results/merge_shards.json.

    python bench/merge_shards.py --shards 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.archive import Archive  # noqa: E402
from cos_core.archive.writer import RunWriter  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "merge_shards.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    layout = {"steps": [{"step": s, "t": 1000.0 - 50 * s, "sigma": 1 - s / 20, "expert": "transformer"}
                        for s in range(20)], "n_steps": 20, "latent": {"channels": 3, "frames": 8, "height": 24,
                                                                       "width": 24},
              "token_grid": {"frames": 8, "rows": 12, "cols": 12, "patch": [1, 2, 2]}, "tensors": {},
              "sites": {"block_out": {"n_layers": 8, "layers": list(range(8)), "steps": list(range(20)),
                                      "branches": ["cond"], "dim": 64, "dtype": "float32",
                                      "reductions": {"frame_mean": {"shape": [8, 64]}}, "tokens": []}},
              "decoded": None}
    tensor = rng.standard_normal((20, 8, 8, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        writer = RunWriter(tmp, "bench", {"n": args.shards})
        t0 = time.perf_counter()
        for i in range(args.shards):
            writer.write_sample(i, {"acts/block_out/frame_mean/cond": tensor, "final": tensor[0, 0]},
                                {"sample_id": f"s{i}", "seed": i}, layout)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = writer.finalize(args.shards, {"created": "bench", "command": ["bench"]})
        finalize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = Archive.open(path)
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_rows = len(run.samples)
        samples_s = time.perf_counter() - t0
    result = {"shards": args.shards, "shard_bytes": int(tensor.nbytes), "write_all_s": write_s,
              "finalize_s": finalize_s, "finalize_per_shard_ms": 1000 * finalize_s / args.shards,
              "finalize_vs_write": finalize_s / write_s, "open_manifest_s": open_s, "read_samples_s": samples_s,
              "rows": n_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
