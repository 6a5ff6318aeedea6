"""`cos train`: the flags and entry point for training the organism (`cos_core.organism.train`).

Owns the flag names, the mapping flags -> `TrainConfig`, resume semantics (settings come from the checkpoint;
only operational flags may be changed), the progress bar and the printed report. Imports only argparse, the presets
and `common` at module level, so building the CLI parser needs no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..organism.presets import PRESETS
from .common import default_device

# flag dest -> TrainConfig field (flags left at None take the config's default, or the checkpoint's on --resume)
FIELDS = ("preset", "steps", "batch_size", "lr", "warmup", "decay_frac", "weight_decay", "ema_decay",
          "answer_weight", "shift", "cond_dropout", "precision", "seed", "num_inference_steps", "checkpoint_every",
          "eval_every", "log_every", "val_n", "eval_n", "time_limit", "workers", "compile", "device", "peak_tflops",
          "init_from")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `cos train` flags to `parser`."""
    a = parser.add_argument
    a("--preset", choices=list(PRESETS), default=None, help="model size (default small)")
    a("--tasks", default=None, help="task mixture as name[:weight],... (default maze:2,memory:1,choice:1)")
    a("--task-params", default=None, help='JSON {task: get_task kwargs}, e.g. \'{"maze": {"size": 5}}\'')
    a("--steps", type=int, default=None, help="total optimizer steps (default 20000)")
    a("--batch-size", type=int, default=None, help="instances per step (default 256)")
    a("--lr", type=float, default=None)
    a("--warmup", type=int, default=None)
    a("--decay-frac", type=float, default=None, help="fraction of --steps with linear LR decay to 0 (default 0.2)")
    a("--weight-decay", type=float, default=None)
    a("--ema-decay", type=float, default=None)
    a("--answer-weight", type=float, default=None, help="extra loss weight on pixels that differ from frame 0")
    a("--shift", type=float, default=None, help="flow-matching shift (scheduler and training σ)")
    a("--cond-dropout", type=float, default=None)
    a("--precision", choices=["bf16", "fp32"], default=None)
    a("--seed", type=int, default=None)
    a("--num-inference-steps", type=int, default=None, help="sampler steps for evaluation (default 16)")
    a("--checkpoint-every", type=int, default=None)
    a("--eval-every", type=int, default=None, help="validation interval in steps")
    a("--log-every", type=int, default=None)
    a("--val-n", type=int, default=None, help="validation instances per task")
    a("--eval-n", type=int, default=None, help="final test instances per task (default 200)")
    a("--time-limit", type=float, default=None, help="stop (checkpoint, export, evaluate) after this many seconds")
    a("--workers", type=int, default=None, help="data worker processes (default: 0 on CPU, up to 12 on CUDA)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default on CUDA)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default cuda when available)")
    a("--peak-tflops", type=float, default=None, help="accelerator bf16 peak for the fraction-of-peak figure")
    a("--init-from", default=None, metavar="DIR",
      help="start from the transformer weights of a saved organism folder (fine-tuning; its task ids must be a "
           "prefix of the registry, new tasks get new prompt slots; fresh optimizer)")
    a("--out", default="models/organism", help="weights folder (save_pretrained + README.md + eval.json)")
    a("--checkpoint-dir", default=None, help="checkpoint folder (default <out>_ckpt)")
    a("--resume", action="store_true", help="continue the run in the checkpoint folder")
    a("--no-eval", action="store_true", help="skip the final test evaluation and model card")


def config_from_args(args: argparse.Namespace, saved: dict | None = None) -> Any:
    """Flags -> TrainConfig. With `saved` (a checkpoint's config) unset flags take the saved values."""
    import os

    from ..organism.data import parse_tasks
    from ..organism.train import TrainConfig

    values: dict[str, Any] = dict(saved) if saved else {}
    for name in FIELDS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.tasks is not None:
        values["tasks"] = parse_tasks(args.tasks)
    if args.task_params is not None:
        try:
            values["task_params"] = json.loads(args.task_params)
        except json.JSONDecodeError as err:
            raise ValueError(f"--task-params is not valid JSON ({err}): {args.task_params!r}") from None
        if not isinstance(values["task_params"], dict):
            raise ValueError(f"--task-params must be a JSON object {{task: {{...}}}}, got {args.task_params!r}")
    if not saved:
        values.setdefault("device", default_device(None))
        on_cuda = str(values["device"]).startswith("cuda")
        values.setdefault("compile", on_cuda)
        values.setdefault("precision", "bf16" if on_cuda else "fp32")
        values.setdefault("workers", min(12, max(1, (os.cpu_count() or 2) - 2)) if on_cuda else 0)
    if saved:
        return TrainConfig.from_json(values)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Train (or resume), then export weights, evaluate and write the model card. Returns the exit status."""
    from tqdm import tqdm

    from ..organism.checkpoint import STATE_FILE
    from ..organism.train import Trainer, finish

    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + "_ckpt")
    saved = None
    if args.resume:
        if not (ckpt / STATE_FILE).exists():
            raise ValueError(f"--resume: no checkpoint in {ckpt} (expected {ckpt / STATE_FILE})")
        saved = json.loads((ckpt / STATE_FILE).read_text())["config"]
    cfg = config_from_args(args, saved)
    bar = tqdm(total=cfg.steps, desc="cos train", unit="step", dynamic_ncols=True)

    def on_log(record: dict) -> None:
        if "validation" in record:
            v = record["validation"]
            bar.write(f"step {v['step']}: validation accuracy ema {v['ema']} raw {v['raw']}")
            return
        bar.n = record["step"]
        bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['it_s']:.2f}",
                        peak=f"{100 * record['fraction_of_peak']:.1f}%", lr=f"{record['lr']:.2e}")

    trainer = Trainer(cfg, out, ckpt, resume=args.resume, on_log=on_log)
    bar.n = trainer.state["step"]
    bar.refresh()
    summary = trainer.run()
    bar.close()
    report = finish(trainer, summary, evaluate_test=not args.no_eval)
    print(f"trained to step {report['step']} ({'finished' if report['finished'] else 'stopped early'}); "
          f"weights ({report['weights']}) in {out}, checkpoint in {ckpt}")
    for name, r in report.get("test", {}).get("tasks", {}).items():
        print(f"  {name}: {100 * r['accuracy']:.1f} % exact (n={r['n']})")
    return 0
