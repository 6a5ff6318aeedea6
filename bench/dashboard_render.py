"""Dashboard render times and memory, with Streamlit's AppTest (the app's own script runs, no browser).

1. Runs: every run under --runs-dir (default cached_runs/). For each page: the first render in a process that has
   not drawn it yet ("cold"), then after a warm-up pass over all pages, the first render of each page in a NEW
   session ("warm": what a new visitor of a running app waits for), median of --repeat sessions. Times are the
   script run as app.py measures it (sidebar + page, what the server spends); AppTest's wall time, which adds
   its harness (it rescans installed packages for components in every new session), is recorded beside them.
2. Size: a synthetic Wan2.1-480p-sized archive (--big-samples x ~5.6 GB: 50 steps of VAE-decoded x̂0 frames
   81x480x832, latent x̂0, frame_mean and token_norm of 30 blocks), streamed to disk in small chunks. It measures
   what opening it reads (the manifest only) and the process's resident memory (RSS) while the Overview, Steps and
   Layers pages render it, for its first sample and then for a second one (imports and figure types warm by then):
   the growth must follow the thumbnails on screen, not the archive. Its pixel values are synthetic; only sizes and
   layout matter here.

Writes bench/results/dashboard_render.json.  python bench/dashboard_render.py [--runs-dir D] [--big-samples 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cos_core.archive import Archive, list_runs  # noqa: E402
from cos_core.archive.runs import RUNS_ENV, dir_size  # noqa: E402
from cos_core.archive.schema import SCHEMA_VERSION  # noqa: E402
from cos_core.archive.writer import RunWriter  # noqa: E402
from views.shared import RENDER_SECONDS  # noqa: E402

PAGES = ["overview", "steps", "layers", "probes", "self_correction", "working_memory", "interventions", "ensemble",
         "compare", "live"]
APP = REPO / "app.py"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def render(page: str, run: str, timeout: float = 120, sample: int = 0) -> tuple[float, float, list[str]]:
    """One fresh session's first run of `page` on `run`: (script seconds as app.py measures its own run, AppTest
    wall seconds including the test harness, exception and error texts)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.query_params["run"] = run
    at.query_params["sample"] = str(sample)
    at.switch_page(f"views/{page}.py")
    start = time.perf_counter()
    at.run()
    wall = time.perf_counter() - start
    problems = [e.value for e in at.exception] + [e.value for e in at.error]
    return float(at.session_state[RENDER_SECONDS]), wall, problems


def page_times(runs: list[str], repeat: int) -> dict:
    cold, warm, wall, problems = {}, {}, {}, {}
    for page in PAGES:  # cold: the first time this process draws the page (first run's data not cached yet)
        cold[page], _, errs = render(page, runs[0])
        problems.update({f"{page}@{runs[0]}": errs} if errs else {})
    for run in runs:  # warm-up: every page on every run once
        for page in PAGES:
            render(page, run)
    for run in runs:
        warm[run], wall[run] = {}, {}
        for page in PAGES:
            times = [render(page, run) for _ in range(repeat)]
            warm[run][page] = statistics.median(t[0] for t in times)
            wall[run][page] = statistics.median(t[1] for t in times)
            problems.update({f"{page}@{run}": times[-1][2]} if times[-1][2] else {})
    worst = max((t, run, page) for run, pages in warm.items() for page, t in pages.items())
    return {"cold_first_run_s": cold, "warm_new_session_s": warm, "warm_new_session_apptest_wall_s": wall,
            "warm_worst": {"seconds": worst[0], "run": worst[1], "page": worst[2]}, "problems": problems}


# ---- a synthetic Wan-480p-sized archive, streamed --------------------------------------------------------------
def _write_shard(path: Path, tensors: list[tuple[str, str, list[int], object]], meta: dict) -> int:
    """safetensors by hand, one chunk at a time: `tensors` are (name, dtype, shape, chunks()) with chunks() yielding
    the tensor's bytes in order. Returns the file size."""
    sizes = {"U8": 1, "F32": 4}
    header, offset = {"__metadata__": meta}, 0
    for name, dtype, shape, _ in tensors:
        n = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, _, _, chunks in tensors:
            for chunk in chunks():
                f.write(np.ascontiguousarray(chunk).tobytes())
    os.replace(tmp, path)
    return path.stat().st_size


def make_big(runs_dir: Path, n_samples: int) -> tuple[Path, float]:
    steps, layers, frames, height, width = 50, 30, 81, 480, 832
    lat = (16, 21, 60, 104)  # Wan VAE: 4x temporal, 8x spatial; 2x2 patches -> 21 x 30 x 52 tokens per frame
    grid = (21, 30, 52)
    dim = 1536
    sigma = np.linspace(1.0, 0.02, steps)
    layout = {"steps": [{"step": s, "t": float(1000 * sigma[s]), "sigma": float(sigma[s]), "expert": "transformer"}
                        for s in range(steps)], "n_steps": steps, "family": "wan", "x0_rule": "flow",
              "latent": dict(zip(("channels", "frames", "height", "width"), lat)),
              "token_grid": {"frames": grid[0], "rows": grid[1], "cols": grid[2], "patch": [1, 2, 2]},
              "tensors": {"x0_hat": {"dtype": "float32", "shape": list(lat), "steps": list(range(steps))}},
              "sites": {"block_out": {"n_layers": layers, "layers": list(range(layers)), "steps": list(range(steps)),
                                      "branches": ["cond"], "dim": dim, "dtype": "float32", "token_dtype": None,
                                      "reductions": {"frame_mean": {"shape": [grid[0], dim]},
                                                     "token_norm": {"shape": list(grid)}}, "tokens": []}},
              "decoded": {"steps": list(range(steps)), "shape": [frames, height, width, 3]}}
    writer = RunWriter(runs_dir, "synthetic-wan480p", {"bench": "dashboard_render"})
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for sample in range(n_samples):
        def decoded(final: bool = False):
            for s in ([steps - 1] if final else range(steps)):
                img = (ramp * (1 - sigma[s]) + 128 * sigma[s]).astype(np.uint8)  # (1, W, 1)
                yield np.broadcast_to(img[None], (frames, height, width, 3))

        tensors = [
            ("decoded/x0_hat", "U8", [steps, frames, height, width, 3], decoded),
            ("decoded/final", "U8", [frames, height, width, 3], lambda: decoded(final=True)),
            ("x0_hat", "F32", [steps, *lat], lambda: (rng.standard_normal(lat, np.float32) for _ in range(steps))),
            ("final", "F32", list(lat), lambda: [rng.standard_normal(lat, np.float32)]),
            ("acts/block_out/frame_mean/cond", "F32", [steps, layers, grid[0], dim],
             lambda: (rng.standard_normal((layers, grid[0], dim), np.float32) for _ in range(steps))),
            ("acts/block_out/token_norm/cond", "F32", [steps, layers, *grid],
             lambda: (rng.random((layers, *grid), np.float32) for _ in range(steps))),
        ]
        meta = {"cos_schema_version": str(SCHEMA_VERSION), "layout": json.dumps(layout, sort_keys=True),
                "row": json.dumps({"sample_id": f"synthetic-{sample}", "seed": sample, "task": "", "instance": "0",
                                   "prompt": ""}, sort_keys=True)}
        _write_shard(writer.shard_path(sample), tensors, meta)
    path = writer.finalize(n_samples, {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": [
        "python", "bench/dashboard_render.py"], "config": {"synthetic": True}, "versions": {},
        "model": {"source": "synthetic (bench)", "pipeline_class": "none", "family": "wan"}})
    return path, time.perf_counter() - start


def big_archive(n_samples: int, keep: Path | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="cos-bench-big-", dir=keep))
    try:
        path, write_s = make_big(root, n_samples)
        size = dir_size(path)
        start = time.perf_counter()
        archive = Archive.open(path)
        open_s = time.perf_counter() - start
        os.environ[RUNS_ENV] = str(root)
        out = {"bytes": size, "gb": round(size / 1e9, 2), "samples": n_samples, "write_s": round(write_s, 1),
               "open_s": open_s, "open_reads_bytes": (path / "manifest.json").stat().st_size, "pages": {}}
        assert archive.n_samples == n_samples
        for page in ("overview", "steps", "layers"):
            reset_peak()
            before, _ = rss_mb()
            seconds, _, errs = render(page, path.name, timeout=600)
            after, peak = rss_mb()
            warm, _, _ = render(page, path.name, timeout=600)
            out["pages"][page] = {"cold_s": seconds, "warm_new_session_s": warm, "rss_before_mb": before,
                                  "rss_after_mb": after, "peak_rss_growth_mb": peak - before, "problems": errs}
            if page != "overview" and n_samples > 1:  # modules and figure types warm now: what one more sample adds
                reset_peak()
                before, _ = rss_mb()
                seconds, _, errs = render(page, path.name, timeout=600, sample=1)
                after, peak = rss_mb()
                out["pages"][page]["second_sample"] = {"cold_s": seconds, "rss_growth_mb": after - before,
                                                       "peak_rss_growth_mb": peak - before, "problems": errs}
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", type=Path, default=REPO / "cached_runs")
    p.add_argument("--repeat", type=int, default=3, help="new sessions per page and run for the warm median")
    p.add_argument("--big-samples", type=int, default=2, help="samples of ~5.6 GB in the synthetic archive (0: skip)")
    p.add_argument("--big-dir", type=Path, help="where to write the synthetic archive (default: the temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dashboard_render.json")
    args = p.parse_args()
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    good, bad = list_runs(args.runs_dir)
    if not good:
        print(f"no readable runs in {args.runs_dir}: make some with `cos capture`, or pass --runs-dir", file=sys.stderr)
        return 2
    os.environ[RUNS_ENV] = str(args.runs_dir.resolve())
    runs = [a.path.name for a in good]
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "loadavg_at_start": os.getloadavg()},
              "runs_dir": str(args.runs_dir), "runs": runs, "unreadable_runs": sorted(bad)}
    result["rss_mb_at_start"] = rss_mb()[0]
    result["pages"] = page_times(runs, args.repeat)
    result["rss_mb_after_pages"], result["peak_rss_mb_pages"] = rss_mb()
    if args.big_samples:
        result["big_archive"] = big_archive(args.big_samples, args.big_dir)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    warm = result["pages"]["warm_worst"]
    print(f"warm first render, worst page: {warm['seconds']:.3f} s ({warm['page']} on {warm['run']}); "
          f"written {args.out}")
    if "big_archive" in result:
        big = result["big_archive"]
        print(f"{big['gb']} GB archive: open {big['open_s'] * 1e3:.1f} ms; peak RSS growth per page (MB): " +
              ", ".join(f"{k} {v['peak_rss_growth_mb']:.0f}" for k, v in big["pages"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
