"""`cos intervene` throughput before and after batching every condition on the device (issue 16).

One organism fork run (captured here with the current code), swept with the default kinds the old code had (noise at
every step and every frame, λ = 1; the propagation map; the layer swap at step 0) by two implementations, each in its
own process on the same machine and run: the baseline, cos_core as of --baseline-rev extracted with `git archive`
(per-row CPU noise generators called inside the step callback, one extractor call per video in the loop, layer-swap
sources copied to the host), and the current tree (noise from a keyed hash drawn per sample in one tensor per call
on the device, extraction in worker processes overlapping the device, distances on the device). Reported: seconds,
sample-runs per second (one sample under one condition, the clean run included: n x (1 + 2 steps + frames +
layers)) and the ratio. The two draw different noise, so
their tables are compared by shape and clean accuracy, not value. Writes --out (JSON).

CPU (small, tiny random organism):  python bench/intervene_throughput.py --tiny --instances 6 --steps 4 --threads 1
GPU (the issue's sweep: shipped organism, fork, 100 instances x 2 seeds, 16 steps, every condition):
    python bench/intervene_throughput.py --device cuda --instances 100 --steps 16 --batch-size 512 \\
        --new-batch-size 4096 --out bench/results/intervene_throughput_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNIPPET = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from cos_core.experiments.replay import load_replay
from cos_core.experiments.interventions import InterventionConfig, run_interventions
run, model, device, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
workers, variant = int(sys.argv[6]), sys.argv[7]
replay = load_replay(run, device=device, model_dir=model)
which = ("noise_step", "noise_frame", "propagation", "layer_swap")
if variant == "baseline":
    config = InterventionConfig(which=which, strength=1.0, batch_size=batch)
else:
    config = InterventionConfig(which=which, strengths=(1.0,), batch_size=batch, workers=workers)
extra = {} if variant == "baseline" else {"workers": workers}
warm = InterventionConfig(which=("noise_step",), steps=(0,), batch_size=batch, **extra)
run_interventions(replay, warm)  # warm-up: kernels, caches, worker start-up
if device.startswith("cuda"):
    torch.cuda.synchronize()
start = time.perf_counter()
tables = run_interventions(replay, config)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
samples = tables["interventions_samples"]
n, s = len(replay.items), replay.n_steps
conditions = n * (1 + 2 * s + replay.pipe.config.video_shape[1] + len(replay.pipe.transformer.blocks))
print(json.dumps({"seconds": seconds, "rows": {k: len(v) for k, v in tables.items()},
                  "clean_accuracy": float(samples[samples["kind"] == "clean"]["correct"].mean()),
                  "n_samples": n, "n_steps": s, "sample_runs": conditions, "sample_runs_per_s": conditions / seconds}))
"""


def baseline_tree(rev: str, into: Path) -> Path:
    """cos_core as of `rev`, extracted from git into `into` (the import root for the baseline process)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "cos_core"], capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"git archive {rev} failed ({archive.stderr.decode().strip()}): run from a git checkout, or pass "
                 "--baseline-dir with cos_core of that revision")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def make_run(args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """(run directory, model directory): a fork capture of --instances x --seeds at --steps."""
    import torch

    sys.path.insert(0, str(REPO))
    from cos_core.capture import CaptureSpec
    from cos_core.capture.run import capture_run
    from cos_core.capture.sources import ORGANISM_DIR, SourceConfig, organism_source

    model_dir = Path(args.model_dir or ORGANISM_DIR).resolve()
    if args.tiny:
        from cos_core.organism.pipeline import build_pipeline
        from cos_core.tasks import TASK_NAMES

        torch.manual_seed(0)
        model_dir = root / "model"
        build_pipeline("tiny", task_names=TASK_NAMES).save_pretrained(model_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    src = organism_source(SourceConfig(task=args.task, instances=args.instances, num_inference_steps=args.steps),
                          device=args.device, dtype=torch.float32, seeds=seeds, model_dir=model_dir)
    path = capture_run(src.pipe, src.items, CaptureSpec(reductions=("frame_mean",), tensors=("x0_hat",)),
                       runs_dir=root / "runs", run_id="bench", call_kwargs=src.call_kwargs, source=src.label,
                       score=src.score, command=["bench/intervene_throughput.py"], extra=src.extra)
    return path, model_dir


def measure(variant: str, tree: Path, run: Path, model: Path, args: argparse.Namespace, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")]))}
    cmd = [sys.executable, "-c", SNIPPET, str(run), str(model), args.device, str(batch), str(args.threads),
           str(args.workers), variant]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)  # cwd: its cos_core
    if out.returncode != 0:
        sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(variant=variant, batch_size=batch, process_seconds=time.perf_counter() - start)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random organism (CPU smoke size) instead of the shipped")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--task", default="fork")
    p.add_argument("--instances", type=int, default=6)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="rows per call for both implementations")
    p.add_argument("--new-batch-size", type=int, default=None, help="also time the current code at this batch size")
    p.add_argument("--workers", type=int, default=None, help="scoring processes of the current code (default: 0 on "
                                                              "CPU, else up to 8)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each process")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--baseline-rev", default="9bb3e19")
    p.add_argument("--baseline-dir", type=Path, default=None,
                   help="a folder holding cos_core of the baseline revision (instead of `git archive`, e.g. where the "
                        "checkout has no .git)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.workers is None:
        args.workers = 0 if args.device == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))
    out = args.out or REPO / "bench" / "results" / f"intervene_throughput_{args.device.split(':')[0]}.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run, model = make_run(args, tmp)
        base = args.baseline_dir or baseline_tree(args.baseline_rev, tmp / "baseline")
        plan = [("baseline", base, args.batch_size), ("current", REPO, args.batch_size)]
        plan += [("current", REPO, args.new_batch_size)] if args.new_batch_size else []
        runs: dict[int, list[dict]] = {i: [] for i in range(len(plan))}
        for _ in range(args.reps):  # interleaved, so a change in the machine's load hits every variant alike
            for i, (variant, tree, batch) in enumerate(plan):
                runs[i].append(measure(variant, tree, run, model, args, batch))
        results = []
        for i, reps in runs.items():
            best = sorted(reps, key=lambda r: r["seconds"])[len(reps) // 2]  # the median run
            results.append(best | {"runs_s": [r["seconds"] for r in reps]})
    import torch

    report = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
              or platform.machine(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "config": vars(args) | {"out": str(out)},
              "results": results,
              "speedup_same_batch": results[0]["seconds"] / results[1]["seconds"],
              "speedup_best": results[0]["seconds"] / min(r["seconds"] for r in results[1:]),
              "clean_accuracy_equal": len({r["clean_accuracy"] for r in results}) == 1}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: report[k] for k in ("device", "speedup_same_batch", "speedup_best", "clean_accuracy_equal")}
                     | {r["variant"] + f"@{r['batch_size']}": round(r["seconds"], 2) for r in results}))


if __name__ == "__main__":
    main()
