"""Evaluating the organism: held-out answer accuracy per task, the per-step answer curve, CPU seconds per sample.

Owns `evaluate` (runs the pipeline on task instances, reads the answer from the final video and from every step's
x̂0 with the task's own extractor), `cpu_seconds_per_sample`, and `write_card` (the model card README.md and
`eval.json` beside the weights). Imports torch and cos_core.tasks; the pipeline comes in as an argument.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cos_core.tasks import get_task

EVAL_FILE = "eval.json"
CARD_FILE = "README.md"


def evaluate(pipe: Any, seeds: Mapping[str, Sequence[int]], num_inference_steps: int,
             task_params: Mapping[str, dict] | None = None, per_step: bool = True, batch_size: int = 200,
             seed: int = 0) -> dict[str, Any]:
    """Accuracy of `pipe` on `seeds[task]` instances of each task, at `num_inference_steps` (guidance 1).

    Returns {"tasks": {name: {n, accuracy, score, per_step_accuracy, per_step_score}}, "num_inference_steps"}.
    The sampler noise of batch k is drawn from a generator seeded with `seed + k`.
    """
    task_params = task_params or {}
    device = pipe._execution_device
    out: dict[str, Any] = {"num_inference_steps": int(num_inference_steps), "tasks": {}}
    for name, task_seeds in seeds.items():
        task = get_task(name, **task_params.get(name, {}))
        task_seeds = list(task_seeds)
        correct, score = [], []
        step_correct = np.zeros(num_inference_steps) if per_step else None
        step_score = np.zeros(num_inference_steps) if per_step else None
        for k in range(0, len(task_seeds), batch_size):
            insts = [task.instance(s) for s in task_seeds[k:k + batch_size]]
            first = np.stack([inst.first_frame for inst in insts])  # (B, 3, H, W)
            x0_steps: list[np.ndarray] = []

            def keep(_pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
                x0_steps.append(kwargs["x0_hat"].float().clamp(-1, 1).cpu().numpy())  # (B, 3, F, H, W)
                return {}

            gen = torch.Generator(device=device).manual_seed(seed + k // batch_size)
            video = pipe(first, task=name, num_inference_steps=num_inference_steps, generator=gen,
                         callback_on_step_end=keep if per_step else None,
                         callback_on_step_end_tensor_inputs=["x0_hat"]).frames  # (B, 3, F, H, W)
            for b, inst in enumerate(insts):
                sc = task.score(task.extract(video[b]), inst)
                correct.append(sc["correct"])
                score.append(sc["score"])
                if per_step:
                    for i, x0 in enumerate(x0_steps):
                        sc = task.score(task.extract(x0[b]), inst)
                        step_correct[i] += sc["correct"]
                        step_score[i] += sc["score"]
        n = len(task_seeds)
        result = {"n": n, "accuracy": float(np.mean(correct)) if n else math.nan,
                  "score": float(np.mean(score)) if n else math.nan,
                  "seeds": [task_seeds[0], task_seeds[-1]] if n else []}
        if per_step:
            result["per_step_accuracy"] = (step_correct / max(n, 1)).tolist()
            result["per_step_score"] = (step_score / max(n, 1)).tolist()
        out["tasks"][name] = result
    return out


def cpu_seconds_per_sample(pipe: Any, first_frame: np.ndarray, task: str, num_inference_steps: int,
                           threads: int = 2, repeats: int = 3) -> float:
    """Median wall seconds of one sample on the CPU with `threads` torch threads (one warm-up run first)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe.to("cpu")
        times = []
        for r in range(repeats + 1):
            start = time.perf_counter()
            pipe(first_frame, task=task, num_inference_steps=num_inference_steps,
                 generator=torch.Generator().manual_seed(r))
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:]))
    finally:
        torch.set_num_threads(previous)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _thin(points: list, n: int = 20) -> list:
    if len(points) <= n:
        return points
    idx = np.unique(np.linspace(0, len(points) - 1, n).round().astype(int))
    return [points[i] for i in idx]


def write_card(folder: Path, report: dict[str, Any]) -> None:
    """Write `eval.json` (the whole report) and the model card README.md from it into the weights folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVAL_FILE).write_text(json.dumps(report, indent=1))
    cfg, test = report["config"], report["test"]
    steps = test["num_inference_steps"]
    acc_rows = [[name, r["n"], f"{100 * r['accuracy']:.1f} %", f"{r['score']:.3f}", f"{r['seeds'][0]}..{r['seeds'][1]}"]
                for name, r in test["tasks"].items()]
    curve_rows = [[i] + [f"{100 * r['per_step_accuracy'][i]:.1f}" for r in test["tasks"].values()]
                  for i in range(steps)]
    loss_rows = [[s, f"{v:.5f}"] for s, v in _thin(report["losses"], 25)]
    tp = report.get("throughput", {})
    cpu = report.get("cpu_seconds_per_sample")
    tasks = ",".join(f"{n}:{w:g}" for n, w in cfg["tasks"])
    notes = "".join(f"\n{note}\n" for note in report.get("notes", []))
    text = f"""# cos-lab organism

A small video diffusion transformer that solves procedural reasoning tasks ({", ".join(test["tasks"])}) so that
its Chain-of-Steps can be watched with `cos capture` like Wan's. The denoiser is diffusers'
`WanTransformer3DModel` (preset `{cfg["preset"]}`: {report["model"]["num_layers"]} blocks, width
{report["model"]["width"]}, {report["model"]["parameters"] / 1e6:.2f} M parameters, patch (1, 2, 2)), conditioned on
the first frame by channel concatenation as Wan 2.1 I2V does (input = [x_t, mask, first frame], 7 channels) and on
the task by a one-hot prompt embedding (no text encoder). Sampler: `FlowMatchEulerDiscreteScheduler`, shift
{cfg["shift"]}, {steps} steps by default, guidance 1.

**Pixel space, no VAE.** Videos are {report["video_shape"]} (channels, frames, height, width) in [-1, 1]: at 24×24
a VAE would save little, would blur one-pixel maze walls, and would put a second model between the answer and the
pixels the extractors read. Latents *are* the video, so x̂0 at every step can be scored exactly.

Weights: safetensors, float32, `{report["weights"]}` weights of the run. Load offline:
`OrganismPipeline.from_pretrained("models/organism")` (`cos_core.organism`).

## Held-out accuracy (TEST seeds, {steps} steps, exact answers)

{_table(acc_rows, ["task", "n", "exact", "graded score", "seeds"])}

## Answer accuracy at each step (% exact, answer read from x̂0 of that step; step 0 = noisiest)

{_table(curve_rows, ["step"] + list(test["tasks"]))}

## Training

Recipe: `cos train --preset {cfg["preset"]} --tasks {tasks} --steps {cfg["steps"]} --batch-size {cfg["batch_size"]}`
(AdamW lr {cfg["lr"]}, warmup {cfg["warmup"]}, linear decay over the last {100 * cfg["decay_frac"]:.0f} %, weight
decay {cfg["weight_decay"]}, EMA {cfg["ema_decay"]}, {cfg["precision"]} autocast; rectified flow
x_t = (1−σ)·x0 + σ·ε, target ε − x0, σ drawn uniformly through the shift map; loss weight
1 + {cfg["answer_weight"]} on pixels that differ from frame 0 (the answer), 1 elsewhere, so walls keep their weight;
task token dropped with p = {cfg["cond_dropout"]} for optional CFG). Batches are fresh TRAIN seeds every
step, made by `--workers` CPU processes.

- steps trained: {report["step"]}; training time: {report["train_seconds"] / 60:.1f} min (compile and validation
  included) on {report.get("device_name", "?")}
- throughput: {tp.get("it_s", math.nan):.2f} it/s × batch {tp.get("batch_size", "?")} = \
{tp.get("achieved_tflops", math.nan):.1f} TFLOP/s = {100 * tp.get("fraction_of_peak", math.nan):.1f} % of a \
{tp.get("peak_tflops", "?")} TFLOP/s bf16 peak
  (FLOPs counted by torch's FlopCounterMode, forward + backward: {tp.get("flops_per_sample", math.nan) / 1e9:.1f} \
GFLOP per sample)
- one sample on 2 CPU cores ({steps} steps, with capture): {f"{cpu:.2f} s" if cpu else "not measured"}
{notes}
Loss (weighted, mean over the preceding log interval):

{_table(loss_rows, ["step", "loss"])}

Everything above is also in `eval.json` beside this file.
"""
    (folder / CARD_FILE).write_text(text)
