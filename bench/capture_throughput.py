"""Organism capture throughput, unbatched vs batched, on any device (issue 16).

The default organism capture (every block's frame_mean + token_norm, x_t/v_hat/x0_hat at every step, scoring, one
shard per item) of the shipped organism on maze instances, run twice in one process: one item per pipeline call on
the first `--unbatched-items` items, then `--batch-size` items per call on all `--items`. The two archives are
compared on the shared items (bit for bit, and the largest difference). The organism's FLOPs per sample are counted
with torch's FlopCounterMode and stated as a fraction of the GPU's peak for the model's dtype. `--live` instead times
the dashboard's Live page capture (one item, CPU, `--threads` threads) at several step counts.

    python bench/capture_throughput.py --device cuda --items 2000 --batch-size 256          # the GPU figure
    python bench/capture_throughput.py --device cpu --items 12 --unbatched-items 6 --batch-size 6
    python bench/capture_throughput.py --live --threads 2 --live-steps 16,8,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.archive import Archive  # noqa: E402
from cos_core.capture import CaptureSpec, capture_run  # noqa: E402
from cos_core.capture.sources import SourceConfig, organism_source  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = CaptureSpec(reductions=("frame_mean", "token_norm"))  # all layers, all steps, x_t/v_hat/x0_hat every step
# dense peak FLOP/s by GPU name fragment and dtype (vendor datasheets, SXM parts; float32 = CUDA cores, no TF32)
# ("tf32" = float32 storage with matmuls on the tensor cores in TF32, `--tf32`)
PEAK_FLOPS = {"H200": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989e12, "float16": 989e12},
              "H100": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989e12, "float16": 989e12},
              "A100": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12}}


def source(items: int, steps: int, device: str, dtype: torch.dtype, task: str):
    config = SourceConfig(task=task, instances=items, num_inference_steps=steps)
    return organism_source(config, device=device, dtype=dtype, seeds=[0])


def timed_capture(src, runs: Path, run_id: str, n: int, **kwargs) -> tuple[float, Archive]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    path = capture_run(src.pipe, src.items[:n], SPEC, runs_dir=runs, run_id=run_id, call_kwargs=src.call_kwargs,
                       source=src.label, score=src.score, command=["bench"], extra=src.extra, **kwargs)
    return time.perf_counter() - start, Archive.open(path)


def compare(a: Archive, b: Archive, n: int) -> dict:
    equal, diff = True, 0.0
    for sample in range(n):
        for key in a.keys(sample):
            x, y = a.read(sample, key), b.read(sample, key)
            equal &= bool(np.array_equal(x, y))
            if x.dtype.kind == "f":
                diff = max(diff, float(np.abs(x.astype(np.float64) - y).max()))
    answers = (a.samples["answer"].iloc[:n].to_numpy() == b.samples["answer"].iloc[:n].to_numpy()).mean()
    return {"archives_equal": equal, "max_abs_diff": diff, "answers_equal": float(answers), "compared_items": n}


def flops_per_sample(src) -> float:
    """FLOPs of one organism sample: one transformer forward counted, times forwards per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe, steps = src.pipe, src.call_kwargs["num_inference_steps"]
    calls = 2 if src.call_kwargs.get("guidance_scale", 1.0) > 1.0 else 1
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("kwargs", {k: v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe(**src.call_kwargs | {"num_inference_steps": 1}, **src.items[0].kwargs, output_type="latent")
    finally:
        handle.remove()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.transformer(**seen["kwargs"])
    return float(counter.get_total_flops()) * steps * calls


def peak_flops(device: str, dtype: str) -> tuple[float | None, str]:
    if torch.device(device).type != "cuda":
        return None, "no peak stated for CPUs"
    name = torch.cuda.get_device_name(torch.device(device))
    for fragment, table in PEAK_FLOPS.items():
        if fragment in name:
            return table.get(dtype), f"{fragment} datasheet, {dtype}, dense"
    return None, f"no datasheet entry for {name!r}"


def throughput(args) -> dict:
    dtype = getattr(torch, args.dtype)
    if args.tf32:  # float32 tensors, matmuls and convolutions in TF32 on the tensor cores (10-bit mantissa)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    src = source(args.items, args.steps, args.device, dtype, args.task)
    n_one = min(args.unbatched_items, args.items)
    runs = Path(tempfile.mkdtemp(prefix="cos-bench-"))
    try:
        timed_capture(src, runs, "warmup", 1)  # lazy initialisation (CUDA context, kernels) outside the timing
        t_one, one = timed_capture(src, runs, "one", n_one, batch_size=1)
        t_batch, batched = timed_capture(src, runs, "batched", args.items, batch_size=args.batch_size,
                                         batch_forward=args.batch_forward)
        result = compare(one, batched, n_one)
        forward = batched.manifest["timing"]["batch_forward"]
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    flops = flops_per_sample(src)
    rate = args.items / t_batch
    peak, peak_source = peak_flops(args.device, "tf32" if args.tf32 and args.dtype == "float32" else args.dtype)
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else \
        f"cpu ({torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "dtype": args.dtype, "tf32": args.tf32,
            "task": args.task, "steps": args.steps, "items": args.items, "batch_size": args.batch_size, "batch_forward": forward,
            "unbatched_items": n_one, "unbatched_s": round(t_one, 3), "batched_s": round(t_batch, 3),
            "unbatched_samples_per_s": round(n_one / t_one, 3), "batched_samples_per_s": round(rate, 3),
            "speedup": round(rate / (n_one / t_one), 2), **result,
            "flops_per_sample": flops, "achieved_flops_per_s": flops * rate, "peak_flops_per_s": peak,
            "peak_source": peak_source, "fraction_of_peak": None if peak is None else flops * rate / peak,
            "load_average": os.getloadavg()[0],
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def live(args) -> dict:
    """The Live page's capture (views/live.py): one fresh instance, one seed, frame_mean + token_norm, on a CPU."""
    torch.set_num_threads(args.threads)
    out = {}
    for steps in (int(s) for s in args.live_steps.split(",")):
        src = source(1, steps, "cpu", torch.float32, args.task)
        times = []
        for rep in range(args.reps + 1):
            runs = Path(tempfile.mkdtemp(prefix="cos-live-"))
            try:
                start = time.perf_counter()
                capture_run(src.pipe, src.items, CaptureSpec(reductions=("frame_mean", "token_norm")),
                            runs_dir=runs, run_id="live", call_kwargs=src.call_kwargs, source=src.label,
                            score=src.score, command=["bench"], extra=src.extra)
                times.append(time.perf_counter() - start)
            finally:
                shutil.rmtree(runs, ignore_errors=True)
        out[str(steps)] = round(float(np.median(times[1:])), 3)  # the first run warms up
    return {"device": f"cpu ({args.threads} threads)", "torch": torch.__version__, "task": args.task,
            "s_per_sample_by_steps": out, "reps": args.reps, "load_average": os.getloadavg()[0],
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tf32", action="store_true", help="float32 matmuls in TF32 on the tensor cores")
    p.add_argument("--task", default="maze")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--items", type=int, default=2000, help="work items of the batched run (2000 on a GPU)")
    p.add_argument("--unbatched-items", type=int, default=200, help="items of the one-per-call baseline")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batch-forward", default="auto", choices=["auto", "per_item", "joint"])
    p.add_argument("--live", action="store_true", help="time the Live page's capture instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--live-steps", default="16,8,4")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = live(args) if args.live else throughput(args)
    out = args.out or RESULTS / ("live_sample.json" if args.live else "capture_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
