"""Evaluating the organism: held-out answer accuracy per task, the per-step answer curve, CPU seconds per sample.

Owns `evaluate` (runs the pipeline on task instances, reads the answer from the final video and from every step's
x̂0 with the task's own extractor; for tasks with candidates the candidates alive per step, for fork the goal split),
`noise_redraw`, `cpu_seconds_per_sample`, and `write_card` (the model card README.md and `eval.json` beside the
weights). Imports torch and cos_core.tasks; the pipeline comes in as an argument.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cos_core.tasks import Task, get_task

EVAL_FILE = "eval.json"
CARD_FILE = "README.md"
# A candidate counts as alive at a step while its evidence (task.candidates, 0 = absent, 1 = fully drawn) is at least
# the threshold. 0.25 is the primary one: half of what an even two-way blend gives each path (0.5), so a path that
# keeps half a blend's weight is alive and one pruned to near 0 is not; 0.5 sits exactly at the blend, where small
# errors flip the count, and is reported beside it.
ALIVE_THRESHOLDS = (0.25, 0.5)
STEP_COUNTS = (1, 2, 4, 8, 16, 32)  # sampling step counts of `accuracy_vs_steps` (eval.json)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def has_candidates(task: Task) -> bool:
    """Whether the task reads per-candidate evidence (`task.candidates`), as choice and fork do."""
    return type(task).candidates is not Task.candidates


class _Tally:
    """Per-task sums over instances: final answers, per-step answers, goals reached and candidate evidence."""

    def __init__(self, task: Task, n_steps: int, per_step: bool):
        self.task, self.per_step, self.cands = task, per_step, has_candidates(task)
        self.correct, self.score, self.goals, self.gt_match, self.final_alive = [], [], [], [], []
        self.bins: list[int] = []  # the instance's difficulty bin (task.difficulty_label), when the task has one
        self.lengths: list[float] = []  # cells on the instance's true path, when it has one
        self.step_prefix = np.zeros(n_steps)  # share of the true path traced from the start (tasks that grade it)
        self.agree: dict[str, np.ndarray] = {}  # outcome label -> (step,) count of steps whose reading = the final
        self.agree_n: dict[str, int] = {}
        self.outcomes: list[dict[str, int | None]] = []  # per instance: the final video's outcome labels
        self.step_correct, self.step_score = np.zeros(n_steps), np.zeros(n_steps)
        self.alive = np.zeros((len(ALIVE_THRESHOLDS), n_steps))  # (threshold, step)
        self.chosen, self.runner_up = np.zeros(n_steps), np.zeros(n_steps)

    def add(self, inst: Any, video: np.ndarray, x0_steps: list[np.ndarray]) -> None:
        task = self.task
        final_answer = task.extract(video)
        sc = task.score(final_answer, inst)
        self.correct.append(sc["correct"])
        self.score.append(sc["score"])
        if task.difficulty_label:
            self.bins.append(int(inst.labels[task.difficulty_label]))
        if "path" in inst.meta:
            self.lengths.append(float(len(inst.meta["path"])))
        final_outcome = task.outcome_labels(final_answer)
        self.outcomes.append(final_outcome)
        if "goal" in sc:  # fork: which goal the sample walked to (-1: none)
            self.goals.append(int(sc["goal"]))
            if "gt_goal" in inst.meta:
                self.gt_match.append(float(sc["goal"] == inst.meta["gt_goal"]))
        chosen = None
        if self.cands:
            final = task.candidates(video, inst)
            chosen = int(final.argmax())
            self.final_alive.append([(final >= th).sum() for th in ALIVE_THRESHOLDS])
        if not self.per_step:
            return
        for label, value in final_outcome.items():
            if value is not None:
                self.agree.setdefault(label, np.zeros(len(self.step_correct)))
                self.agree_n[label] = self.agree_n.get(label, 0) + 1
        for i, x0 in enumerate(x0_steps):
            answer = task.extract(x0)
            sc = task.score(answer, inst)
            self.step_correct[i] += sc["correct"]
            self.step_score[i] += sc["score"]
            self.step_prefix[i] += sc.get("prefix", math.nan)
            for label, value in task.outcome_labels(answer).items():
                if final_outcome.get(label) is not None:
                    self.agree[label][i] += value == final_outcome[label]
            if chosen is not None:
                ev = task.candidates(x0, inst)  # (k,)
                self.alive[:, i] += [(ev >= th).sum() for th in ALIVE_THRESHOLDS]
                self.chosen[i] += ev[chosen]
                self.runner_up[i] += np.delete(ev, chosen).max()

    def result(self, seeds: list[int]) -> dict[str, Any]:
        n = len(seeds)
        out: dict[str, Any] = {"n": n, "accuracy": float(np.mean(self.correct)) if n else math.nan,
                               "score": float(np.mean(self.score)) if n else math.nan,
                               "seeds": [seeds[0], seeds[-1]] if n else []}
        if n:
            lo, hi = wilson(float(np.sum(self.correct)), n)
            out["accuracy_ci"] = [lo, hi]
        if self.outcomes and self.outcomes[0]:
            out["final_outcome"] = {k: [-1 if o.get(k) is None else int(o[k]) for o in self.outcomes]
                                    for k in self.outcomes[0]}
            out["outcome_split"] = {k: {str(v): float(np.mean(np.array(vals) == v)) for v in sorted(set(vals))}
                                    for k, vals in out["final_outcome"].items()}
        if self.bins:
            bins, correct, lengths = np.array(self.bins), np.array(self.correct), np.array(self.lengths)
            out["by_difficulty"] = {
                str(b): {"n": int((bins == b).sum()), "accuracy": float(correct[bins == b].mean()),
                         "mean_path_cells": float(lengths[bins == b].mean()) if len(lengths) else math.nan}
                for b in sorted(set(self.bins))}
        if self.per_step:
            out["per_step_accuracy"] = (self.step_correct / max(n, 1)).tolist()
            out["per_step_score"] = (self.step_score / max(n, 1)).tolist()
            if np.isfinite(self.step_prefix).all():
                out["per_step_prefix"] = (self.step_prefix / max(n, 1)).tolist()
            if self.agree:
                # per outcome label: P(the reading of x0_hat at step s = the final video's), over samples whose
                # final video has a reading: when the noise's pick (goal, identity, colour, direction) commits
                out["per_step_outcome_agreement"] = {k: (v / max(1, self.agree_n[k])).tolist()
                                                     for k, v in self.agree.items()}
                out["outcome_n"] = dict(self.agree_n)
        if self.goals:
            goals = np.array(self.goals)
            out["goal_split"] = {str(g): float(np.mean(goals == g)) for g in range(max(2, goals.max() + 1))}
            out["goal_split"]["none"] = float(np.mean(goals < 0))
            out["final_goal"] = self.goals
            if self.gt_match:
                out["gt_goal_match"] = float(np.mean(self.gt_match))
        if self.cands and n:
            out["candidates_alive_final"] = dict(zip(map(str, ALIVE_THRESHOLDS),
                                                     np.mean(self.final_alive, axis=0).tolist()))
            if self.per_step:
                out["per_step_candidates_alive"] = dict(zip(map(str, ALIVE_THRESHOLDS), (self.alive / n).tolist()))
                out["per_step_evidence_chosen"] = (self.chosen / n).tolist()
                out["per_step_evidence_runner_up"] = (self.runner_up / n).tolist()
        return out


def evaluate(pipe: Any, seeds: Mapping[str, Sequence[int]], num_inference_steps: int,
             task_params: Mapping[str, dict] | None = None, per_step: bool = True, batch_size: int = 200,
             seed: int = 0) -> dict[str, Any]:
    """Accuracy of `pipe` on `seeds[task]` instances of each task, at `num_inference_steps` (guidance 1).

    Returns {"tasks": {name: {n, accuracy, score, per_step_accuracy, per_step_score, ...}}, "num_inference_steps",
    "sigmas"}; tasks with candidates add the candidates alive and evidence per step, fork the goal split.
    The sampler noise of batch k is drawn from a generator seeded with `seed + k`.
    """
    task_params = task_params or {}
    device = pipe._execution_device
    out: dict[str, Any] = {"num_inference_steps": int(num_inference_steps), "seed": int(seed), "tasks": {}}
    for name, task_seeds in seeds.items():
        task = get_task(name, **task_params.get(name, {}))
        task_seeds = list(task_seeds)
        tally = _Tally(task, num_inference_steps, per_step)
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
            out["sigmas"] = pipe.scheduler.sigmas[:num_inference_steps].float().cpu().tolist()
            for b, inst in enumerate(insts):
                tally.add(inst, video[b], [x0[b] for x0 in x0_steps])
        out["tasks"][name] = tally.result(task_seeds)
    return out


def accuracy_vs_steps(pipe: Any, seeds: Mapping[str, Sequence[int]], step_counts: Sequence[int] = STEP_COUNTS,
                      task_params: Mapping[str, dict] | None = None, batch_size: int = 200,
                      seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {str(n_steps): {n, accuracy, accuracy_ci, by_difficulty?}}}: exact accuracy of the final video when
    sampling with each number of steps (same instances and generator seeds at every count)."""
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in seeds}
    for k in step_counts:
        result = evaluate(pipe, seeds, int(k), task_params, per_step=False, batch_size=batch_size, seed=seed)
        for name, r in result["tasks"].items():
            out[name][str(int(k))] = {key: r[key] for key in ("n", "accuracy", "accuracy_ci", "by_difficulty",
                                                                "score", "goal_split") if key in r}
    return out


def noise_redraw(pipe: Any, test: dict[str, Any], seeds: Mapping[str, Sequence[int]],
                 task_params: Mapping[str, dict] | None = None, seed: int = 1) -> dict[str, Any]:
    """Sample the tasks of `test` that report outcome labels again with other noise (generator `seed`), final videos
    only. Per task and outcome label: `same`, the fraction of the `n_both` instances read in both draws whose label
    is the same (≈ 1/k when the noise picks among k, 1.0 when the first frame fixes it); fork also the goal split
    and `same_goal` (its goal label)."""
    names = [name for name, r in test["tasks"].items() if "final_goal" in r or "final_outcome" in r]
    again = evaluate(pipe, {n: seeds[n] for n in names}, test["num_inference_steps"], task_params, per_step=False,
                     seed=seed)
    out = {}
    for name in names:
        r = again["tasks"][name]
        out[name] = {"seed": seed, "n": r["n"], "accuracy": r["accuracy"], "same_outcome": {}}
        for label, first in test["tasks"][name].get("final_outcome", {}).items():
            a, b = np.array(first), np.array(r["final_outcome"][label])
            both = (a >= 0) & (b >= 0)
            out[name]["same_outcome"][label] = {"n_both": int(both.sum()),
                                                "same": float(np.mean(a[both] == b[both])) if both.any() else math.nan}
        if "final_goal" in r:
            a, b = np.array(test["tasks"][name]["final_goal"]), np.array(r["final_goal"])
            both = (a >= 0) & (b >= 0)
            out[name] |= {"goal_split": r["goal_split"], "n_both": int(both.sum()),
                          "same_goal": float(np.mean(a[both] == b[both])) if both.any() else math.nan}
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


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _candidates_section(name: str, r: dict[str, Any], sigmas: list[float], redraw: dict | None) -> str:
    """Card section of one task with candidates: goal split, second draw, candidates alive and evidence per step."""
    lines = [f"## Candidates along the steps: {name}", ""]
    if "goal_split" in r:
        split = r["goal_split"]
        goals = ", ".join(f"goal {g} {_pct(v)} %" for g, v in split.items() if g != "none")
        lines.append(f"Final videos (n = {r['n']}) end at {goals}, neither {_pct(split['none'])} % (goals numbered in "
                     f"row-major cell order, independent of which one the training video walked to; a balanced "
                     f"organism gives ≈ 50/50, a learned bias far from it).")
        if "gt_goal_match" in r:
            lines[-1] += f" Same goal as the instance's ground-truth video: {_pct(r['gt_goal_match'])} %."
        if redraw:
            lines.append(f"\nA second noise draw (generator seed {redraw['seed']}): {_pct(redraw['accuracy'])} % "
                         f"exact; of the {redraw['n_both']} instances that reached a goal in both draws "
                         f"{_pct(redraw['same_goal'])} % reached the same one (≈ 50 % when the noise picks the goal, "
                         f"100 % when the maze fixes it).")
        lines.append("")
    if "per_step_candidates_alive" in r:
        alive = r["per_step_candidates_alive"]
        lines += [f"Evidence per candidate is `task.candidates` on x̂0 of each step (0 = not drawn, 1 = fully drawn; "
                  f"an even blend of two paths gives 0.5 each). Alive = evidence ≥ threshold; ≥ 0.25 (half an even "
                  f"blend's weight) is the primary count, ≥ 0.5 sits on the blend itself. 'Final choice' is the "
                  f"candidate with the most evidence in the final video, 'best other' the strongest of the rest "
                  f"(means over n = {r['n']}).", ""]
        rows = [[i, f"{sigmas[i]:.3f}" if i < len(sigmas) else "?", _pct(r["per_step_accuracy"][i]),
                 f"{alive['0.25'][i]:.2f}", f"{alive['0.5'][i]:.2f}", f"{r['per_step_evidence_chosen'][i]:.3f}",
                 f"{r['per_step_evidence_runner_up'][i]:.3f}"] for i in range(len(r["per_step_accuracy"]))]
        lines.append(_table(rows, ["step", "σ", "exact %", "alive ≥ 0.25", "alive ≥ 0.5", "final choice",
                                   "best other"]))
        lines.append("")
    return "\n".join(lines)


def _ci(ci: Sequence[float] | None) -> str:
    return f"{_pct(ci[0])}–{_pct(ci[1])} %" if ci else "?"


def _steps_section(vs_steps: dict | None) -> str:
    """Card section: exact accuracy of the final video vs the number of sampling steps, per task and difficulty."""
    if not vs_steps:
        return ""
    counts = sorted({int(k) for per_k in vs_steps.values() for k in per_k})
    rows = []
    for name, per_k in vs_steps.items():
        first = per_k[str(counts[0])]
        rows.append([name, "all", first["n"]] + [_pct(per_k[str(k)]["accuracy"]) if str(k) in per_k else "" for k in counts])
        for b, cell in first.get("by_difficulty", {}).items():
            rows.append([name, f"bin {b} (≈ {cell['mean_path_cells']:.0f} path cells)", cell["n"]]
                        + [_pct(per_k[str(k)]["by_difficulty"][b]["accuracy"]) for k in counts])
    return f"""
## Accuracy vs number of sampling steps (% exact, final video, TEST seeds)

A task whose first frame fixes a unique answer is in the Chain-of-Steps regime when one step (x̂0 at σ = 1, the
posterior mean) misses the answer and more steps find it. With diffusers' flow-matching schedule the last of K steps
always lands near σ = 0.003, so K = 2 is one real step plus a tiny one and reads like K = 1.

{_table(rows, ["task", "instances", "n"] + [f"{k} steps" for k in counts])}
"""


def _outcome_section(test: dict[str, Any]) -> str:
    """Card section: per step, how often the reading of x̂0 already names the final video's pick (goal, identity,
    colour, direction): when the noise's choice commits."""
    curves = [(name, label, values) for name, r in test["tasks"].items()
              for label, values in r.get("per_step_outcome_agreement", {}).items()]
    if not curves:
        return ""
    n_steps = len(curves[0][2])
    rows = [[i] + [_pct(values[i]) for _, _, values in curves] for i in range(n_steps)]
    return f"""
## When the noise's pick commits (% of samples whose x̂0 at step s already reads the final answer's label)

{_table(rows, ["step"] + [f"{name}: {label}" for name, label, _ in curves])}
"""


def _init_text(init: dict | None) -> str:
    if not init:
        return "- initial weights: random (seeded)\n"
    tasks = ",".join(f"{n}:{w:g}" for n, w in init.get("tasks") or [])
    prior = (f", trained {init['step']} steps on {tasks} in {init['train_seconds'] / 60:.1f} min"
             if init.get("step") is not None and init.get("train_seconds") is not None else "")
    return (f"- initial weights: the transformer of `{init['from']}` (task ids {init['task_names']}{prior}); new tasks "
            f"use new one-hot slots of the prompt embedding; AdamW and EMA started fresh\n")


def write_card(folder: Path, report: dict[str, Any]) -> None:
    """Write `eval.json` (the whole report) and the model card README.md from it into the weights folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVAL_FILE).write_text(json.dumps(report, indent=1))
    cfg, test = report["config"], report["test"]
    steps, sigmas = test["num_inference_steps"], test.get("sigmas", [])
    unique = report.get("answer_is_unique", {})
    acc_rows = [[name, r["n"], f"{_pct(r['accuracy'])} %", _ci(r.get("accuracy_ci")),
                 {True: "unique", False: "several (noise picks)"}.get(unique.get(name), "?"),
                 f"{r['seeds'][0]}..{r['seeds'][1]}" if r.get("seeds") else "TEST"]
                for name, r in test["tasks"].items()]
    curve_rows = [[i, f"{sigmas[i]:.3f}" if i < len(sigmas) else "?"]
                  + [_pct(r["per_step_accuracy"][i]) for r in test["tasks"].values()] for i in range(steps)]
    candidates = "\n".join(_candidates_section(name, r, sigmas, report.get("redraw", {}).get(name))
                           for name, r in test["tasks"].items() if "candidates_alive_final" in r)
    loss_rows = [[s, f"{v:.5f}"] for s, v in _thin(report["losses"], 25)]
    tp = report.get("throughput", {})
    cpu = report.get("cpu_seconds_per_sample")
    tasks = ",".join(f"{n}:{w:g}" for n, w in cfg["tasks"])
    init_flag = f" --init-from {cfg['init_from']}" if cfg.get("init_from") else ""
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

{_table(acc_rows, ["task", "n", "exact", "95 % interval", "answer", "seeds"])}
{_steps_section(report.get("accuracy_vs_steps"))}{_outcome_section(test)}
## Answer accuracy at each step (% exact, answer read from x̂0 of that step; step 0 = noisiest)

{_table(curve_rows, ["step", "σ"] + list(test["tasks"]))}

{candidates}
## Training

Recipe: `cos train --preset {cfg["preset"]} --tasks {tasks} --steps {cfg["steps"]} --batch-size {cfg["batch_size"]}\
{init_flag}` (AdamW lr {cfg["lr"]}, warmup {cfg["warmup"]}, linear decay over the last {100 * cfg["decay_frac"]:.0f} %,
weight decay {cfg["weight_decay"]}, EMA {cfg["ema_decay"]}, {cfg["precision"]} autocast; rectified flow
x_t = (1−σ)·x0 + σ·ε, target ε − x0, σ drawn uniformly through the shift map; loss weight
1 + {cfg["answer_weight"]} on pixels that differ from frame 0 (the answer), 1 elsewhere, so walls keep their weight;
task token dropped with p = {cfg["cond_dropout"]} for optional CFG). Batches are fresh TRAIN seeds every
step, made by `--workers` CPU processes.

{_init_text(report.get("init"))}- steps trained: {report["step"]}; training time: {report["train_seconds"] / 60:.1f} min \
(compile and validation included) on {report.get("device_name", "?")}
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
