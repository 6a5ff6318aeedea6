"""Map the regime of the organism: task difficulty × blocks per forward pass × sampling steps -> exact accuracy.

Trains one organism per preset (concurrently on one GPU, the same task mix and wall-clock budget), then measures
each on held-out TEST seeds: exact accuracy when sampled with 1, 2, 4, 8, 16, 32 steps, split by the task's
difficulty bin (path length), and the per-step read-out (answer read from x0_hat of each step) at 16 steps.
Writes one JSON per preset and `regime_map.json` + `regime_map.md` (the table docs/regime.md quotes).

    python scripts/regime_map.py map --presets small-l4,small --time-limit 330 --out runs/map
    python scripts/regime_map.py eval --model runs/map/small-l4 --n 400 --out runs/map/small-l4.json

The training and evaluation code is the project's (`cos_core.organism`); this script only schedules it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The task mix of the new organism: two unique-answer tasks one pass cannot solve (weighted up), the fork as the
# mode-selection contrast, and the two generated-content tasks (working memory, perception before action).
TASKS = "maze:2,arrows:2,fork:1.5,recall:1,dispatch:1"
TASK_PARAMS = {"maze": {"size": 9, "cell_px": 2, "min_path": 14}}
STEP_COUNTS = (1, 2, 4, 8, 16, 32)


def train_one(args: argparse.Namespace) -> None:
    """Train one preset for `time_limit` seconds (constant LR after warmup), export its EMA weights, evaluate."""
    from cos_core.organism.data import parse_tasks
    from cos_core.organism.train import TrainConfig, Trainer, finish

    out = Path(args.out)
    cfg = TrainConfig(preset=args.preset, tasks=parse_tasks(args.tasks), task_params=json.loads(args.task_params),
                      steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      decay_frac=args.decay_frac, init_from=args.init_from,
                      time_limit=args.time_limit, workers=args.workers, compile=args.compile, device=args.device,
                      precision="bf16" if args.device.startswith("cuda") else "fp32", checkpoint_every=10**9,
                      eval_every=10**9, val_n=0, eval_n=0, log_every=100)
    t0 = time.time()

    def log(record: dict) -> None:
        if "loss" in record and record["step"] % 500 == 0:
            print(f"[{args.preset}] step {record['step']} loss {record['loss']:.4f} {record['it_s']:.1f} it/s "
                  f"({time.time() - t0:.0f} s)", flush=True)

    trainer = Trainer(cfg, out, out.with_name(out.name + "_ckpt"), on_log=log)
    summary = trainer.run()
    finish(trainer, summary, evaluate_test=False)
    print(f"[{args.preset}] trained {summary['step']} steps in {time.time() - t0:.0f} s", flush=True)
    evaluate_model(out, args.n, args.n_readout, args.device, Path(args.report), extra={
        "preset": args.preset, "train_steps": summary["step"], "train_seconds": trainer.state["train_seconds"],
        "it_s": summary["last_it_s"], "batch_size": cfg.batch_size})


def evaluate_model(model_dir: Path, n: int, n_readout: int, device: str, report: Path, extra: dict | None = None,
                   step_counts: tuple[int, ...] = STEP_COUNTS, readout_steps: int = 16) -> dict:
    """accuracy_vs_steps (n TEST seeds per task) + the per-step read-out at `readout_steps` (n_readout seeds)."""
    import torch

    from cos_core.organism.evaluate import accuracy_vs_steps, evaluate
    from cos_core.organism.pipeline import OrganismPipeline
    from cos_core.tasks import TEST_SEEDS

    pipe = OrganismPipeline.from_pretrained(str(model_dir)).to(device)
    names, params = list(pipe.config.trained_tasks), dict(pipe.config.task_params)
    t0 = time.time()
    seeds = {name: range(TEST_SEEDS.start, TEST_SEEDS.start + n) for name in names}
    with torch.no_grad():
        vs_steps = accuracy_vs_steps(pipe, seeds, step_counts, params, batch_size=n)
        readout = evaluate(pipe, {name: range(TEST_SEEDS.start, TEST_SEEDS.start + n_readout) for name in names},
                           readout_steps, params, batch_size=n_readout)
    keep = ("n", "accuracy", "accuracy_ci", "per_step_accuracy", "per_step_prefix", "per_step_outcome_agreement",
            "by_difficulty", "outcome_split")
    result = {**(extra or {}), "model": str(model_dir), "layers": pipe.transformer.config.num_layers,
              "task_params": params, "accuracy_vs_steps": vs_steps, "sigmas": readout.get("sigmas"),
              "readout_steps": readout_steps,
              "readout": {name: {k: r[k] for k in keep if k in r} for name, r in readout["tasks"].items()},
              "eval_seconds": time.time() - t0}
    report.write_text(json.dumps(result, indent=1))
    print(f"[{model_dir.name}] evaluated in {result['eval_seconds']:.0f} s -> {report}", flush=True)
    return result


def run_map(args: argparse.Namespace) -> None:
    """Train every preset concurrently (one process each), then write the combined map."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "train", "--preset", preset, "--out", str(out / preset),
               "--report", str(out / f"{preset}.json"), "--time-limit", str(args.time_limit),
               "--workers", str(args.workers), "--device", args.device, "--tasks", args.tasks,
               "--task-params", args.task_params, "--n", str(args.n), "--n-readout", str(args.n_readout),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
        if not args.compile:
            cmd.append("--no-compile")
        procs.append(subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1")))
    codes = [p.wait() for p in procs]
    combine(out, args.presets.split(","))
    if any(codes):
        raise SystemExit(f"a training process failed: exit codes {codes}")


def combine(out: Path, presets: list[str]) -> None:
    """regime_map.json (every preset's report) and regime_map.md (accuracy vs steps per task, difficulty, depth)."""
    reports = [json.loads((out / f"{p}.json").read_text()) for p in presets if (out / f"{p}.json").is_file()]
    (out / "regime_map.json").write_text(json.dumps(reports, indent=1))
    lines = []
    for r in reports:
        lines += [f"### {r['preset']}: {r['layers']} blocks, {r['train_steps']} steps × batch {r['batch_size']} "
                  f"({r['train_seconds'] / 60:.1f} min)", "",
                  "| task | difficulty bin | n | " + " | ".join(f"{k} steps" for k in STEP_COUNTS) + " |",
                  "|---|---|---|" + "---|" * len(STEP_COUNTS)]
        for task, per_k in r["accuracy_vs_steps"].items():
            ks = [str(k) for k in STEP_COUNTS if str(k) in per_k]
            lines.append(f"| {task} | all | {per_k[ks[0]]['n']} | "
                         + " | ".join(f"{100 * per_k[k]['accuracy']:.1f}" for k in ks) + " |")
            for b in per_k[ks[0]].get("by_difficulty", {}):
                cells = per_k[ks[0]]["by_difficulty"][b]
                lines.append(f"| {task} | {b} (~{cells['mean_path_cells']:.0f} cells) | {cells['n']} | "
                             + " | ".join(f"{100 * per_k[k]['by_difficulty'][b]['accuracy']:.1f}" for k in ks)
                             + " |")
        lines.append("")
    (out / "regime_map.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("map", "train"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--time-limit", type=float, default=330)
        p.add_argument("--workers", type=int, default=6)
        p.add_argument("--device", default="cuda")
        p.add_argument("--tasks", default=TASKS)
        p.add_argument("--task-params", default=json.dumps(TASK_PARAMS))
        p.add_argument("--n", type=int, default=400, help="TEST instances per task for accuracy vs steps")
        p.add_argument("--n-readout", type=int, default=200, help="TEST instances per task for the per-step read-out")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--lr", type=float, default=6e-4)
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
        if name == "map":
            p.add_argument("--presets", default="small-l4,small")
        else:
            p.add_argument("--preset", required=True)
            p.add_argument("--report", required=True)
            p.add_argument("--max-steps", type=int, default=10**6, help="steps of the LR schedule")
            p.add_argument("--decay-frac", type=float, default=0.0, help="linear LR decay over this end share")
            p.add_argument("--warmup", type=int, default=300)
            p.add_argument("--init-from", default="", help="start from a saved organism's transformer")
    p = sub.add_parser("eval")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--n-readout", type=int, default=200)
    p.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.cmd == "map":
        run_map(args)
    elif args.cmd == "train":
        train_one(args)
    else:
        evaluate_model(Path(args.model), args.n, args.n_readout, args.device, Path(args.out))


if __name__ == "__main__":
    main()
