"""Training the organism: rectified flow in pixel space on a task mixture, with checkpoints and exact resume.

Owns `TrainConfig`, the flow-matching loss (x_t = (1−σ)·x0 + σ·ε, target v = ε − x0, σ drawn through the same
shift as the sampler's schedule), the learning-rate schedule (warmup, constant, linear decay), the EMA, and the
loop with its checkpoints (`checkpoint.py`), validation and final export + evaluation (`evaluate.py`). A run starts
from random weights or, with `init_from`, from a saved organism's transformer (fine-tuning; fresh optimizer).
Every random draw of step s comes from a generator seeded by (seed, s), and batch s from fixed seeds, so a resumed
run repeats an uninterrupted one. The library logs; progress goes to an `on_log` callback (the CLI draws the bar).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import load_checkpoint, load_optimizer, optimizer_tensors, save_checkpoint
from .data import BatchSource, build_tasks, task_mix
from .pipeline import build_pipeline, first_frame_condition, task_prompt_embeds
from .presets import PRESETS

logger = logging.getLogger(__name__)

# Fields that may change on --resume without changing what the run computes.
OPERATIONAL = ("steps", "checkpoint_every", "eval_every", "log_every", "time_limit", "workers", "compile",
               "device", "eval_n", "val_n", "peak_tflops")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "small"
    tasks: tuple[tuple[str, float], ...] = (("maze", 2.0), ("memory", 1.0), ("choice", 1.0))
    task_params: dict = field(default_factory=dict)  # {task name: get_task kwargs}
    steps: int = 20000
    batch_size: int = 256
    lr: float = 6e-4
    warmup: int = 500
    decay_frac: float = 0.2  # linear decay to 0 over the last fraction of `steps`
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    answer_weight: float = 3.0  # loss weight 1 + answer_weight on pixels that differ from frame 0
    shift: float = 3.0  # the scheduler's shift; training σ is drawn through the same map
    cond_dropout: float = 0.1  # drop the task token (null prompt) so CFG is possible
    precision: str = "bf16"
    seed: int = 0
    num_inference_steps: int = 16  # sampler steps for validation and evaluation
    checkpoint_every: int = 500
    eval_every: int = 2000
    log_every: int = 50
    val_n: int = 64  # validation instances per task (VAL seeds)
    eval_n: int = 200  # final test instances per task (TEST seeds)
    time_limit: float = 0.0  # seconds of training in this process; 0 = no limit
    workers: int = 0
    compile: bool = False
    device: str = "cpu"
    peak_tflops: float = 790.0  # the accelerator's dense bf16 peak, for the fraction-of-peak figure
    init_from: str = ""  # a save_pretrained organism folder whose transformer weights start the run; "" = random

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "checkpoint_every", "eval_every", "log_every", "num_inference_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "workers", "val_n", "eval_n", "seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.decay_frac <= 1 or not 0 <= self.ema_decay < 1 or not 0 <= self.cond_dropout < 1:
            raise ValueError(f"decay_frac={self.decay_frac} must be in [0, 1], ema_decay={self.ema_decay} and "
                             f"cond_dropout={self.cond_dropout} in [0, 1)")
        if not isinstance(self.init_from, str):
            raise ValueError(f"init_from must be a folder path (str), got {self.init_from!r}")
        if self.shift <= 0 or self.answer_weight < 0:
            raise ValueError(f"shift={self.shift} must be > 0 and answer_weight={self.answer_weight} >= 0")
        task_mix(self.tasks, self.batch_size, self.task_params)  # validates names, weights and batch size

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data["tasks"] = tuple((str(n), float(w)) for n, w in data["tasks"])
        return cls(**data)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Warmup to cfg.lr, constant, then linear decay to 0 over the last `decay_frac` of cfg.steps."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = cfg.steps * (1 - cfg.decay_frac)
    if step >= decay_start and cfg.decay_frac > 0:
        return cfg.lr * max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return cfg.lr


def sample_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """u in (0, 1] -> σ through the scheduler's shift map σ = s·u / (1 + (s−1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(model: Callable, x0: torch.Tensor, task_ids: torch.Tensor, generator: torch.Generator,
              cfg: TrainConfig, text_dim: int) -> torch.Tensor:
    """Weighted rectified-flow loss of one batch x0 (B, 3, F, H, W) in [-1, 1]."""
    b, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device)
    u = torch.rand(b, generator=generator, device=device) * (1 - 1e-3) + 1e-3
    drop = torch.rand(b, generator=generator, device=device) < cfg.cond_dropout
    sigma = sample_sigma(u, cfg.shift)  # (B,)
    s = sigma.view(b, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    target = noise - x0  # the sampler steps x += (σ_next − σ)·v, so v points from data to noise
    embeds = task_prompt_embeds(task_ids, text_dim)
    embeds[:, 0] = embeds[:, 0] * (~drop).float()[:, None]
    inputs = torch.cat([x_t, first_frame_condition(x0[:, :, 0], x0.shape[2])], dim=1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pred = model(hidden_states=inputs, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
    answer = ((x0 - x0[:, :, :1]).abs().amax(dim=1, keepdim=True) > 1e-3).float()  # (B, 1, F, H, W)
    weight = 1 + cfg.answer_weight * answer
    return ((pred.float() - target).square() * weight).mean() / weight.mean()


def initial_weights(model: torch.nn.Module, folder: Path, task_names: tuple[str, ...],
                    video_shape: tuple[int, ...]) -> dict[str, Any]:
    """Load the transformer weights of organism folder `folder` into `model` (same architecture); returns what the
    card records: the folder and its own training summary. Its task ids must be a prefix of `task_names` (new tasks
    take the next one-hot slots of the prompt embedding) and its video shape must equal `video_shape`."""
    from .pipeline import load_transformer

    index = folder / "model_index.json"
    if not index.is_file() or not (folder / "transformer" / "config.json").is_file():
        raise ValueError(f"init_from={str(folder)!r} is not a save_pretrained organism folder "
                         f"(needs model_index.json and transformer/config.json)")
    saved = json.loads(index.read_text())
    names = list(saved.get("task_names", []))
    if names != list(task_names[:len(names)]):
        raise ValueError(f"init_from={str(folder)!r} has task ids {names}; they must be a prefix of {list(task_names)}")
    if list(saved.get("video_shape", [])) != list(video_shape):
        raise ValueError(f"init_from={str(folder)!r} makes videos {saved.get('video_shape')}; the tasks need "
                         f"{list(video_shape)}")
    loaded = load_transformer(str(folder / "transformer"))
    ours, theirs = (json.loads(json.dumps(dict(m.config))) for m in (model, loaded))  # tuples vs JSON lists
    differ = sorted(k for k, v in ours.items() if not k.startswith("_") and theirs.get(k) != v)
    if differ:
        raise ValueError(f"init_from={str(folder)!r} has another architecture: {', '.join(differ)} differ from the "
                         f"preset; allowed: the same preset")
    model.load_state_dict(loaded.state_dict(), strict=True)
    record: dict[str, Any] = {"from": str(folder), "task_names": names}
    if (folder / "eval.json").is_file():
        prior = json.loads((folder / "eval.json").read_text())
        record |= {"step": prior.get("step"), "train_seconds": prior.get("train_seconds"),
                   "tasks": prior.get("config", {}).get("tasks"), "init": prior.get("init")}
    logger.info("initial weights from %s (tasks %s)", folder, names)
    return record


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "scale_shift_table" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) % 2**63)
    return gen


def train_flops_per_sample(model: torch.nn.Module, video_shape: tuple[int, ...], text_dim: int,
                           device: torch.device) -> float:
    """FLOPs of one training sample (forward + backward), counted by torch's FlopCounterMode on a batch of 2.

    Attention kernels that the counter does not see (the CPU flash kernel) are added analytically (4·N²·d per
    layer forward, twice that backward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    c, f, h, w = video_shape
    x = torch.randn(2, 7, f, h, w, device=device)
    emb = torch.zeros(2, 2, text_dim, device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(hidden_states=x, timestep=torch.full((2,), 500.0, device=device), encoder_hidden_states=emb,
                    return_dict=False)[0]
        out.square().mean().backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / 2
    if not any("attention" in str(op) for op in counter.get_flop_counts()["Global"]):
        cfgm = model.config
        pt, ph, pw = cfgm.patch_size
        n = (f // pt) * (h // ph) * (w // pw)
        flops += 3 * 4 * n * n * cfgm.num_attention_heads * cfgm.attention_head_dim * cfgm.num_layers
    return float(flops)


class Trainer:
    """Holds the model, EMA, optimizer and counters of one run; `run()` trains until cfg.steps or the time limit."""

    def __init__(self, cfg: TrainConfig, out: Path, checkpoint_dir: Path | None = None, resume: bool = False,
                 on_log: Callable[[dict], None] | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else self.out.with_name(self.out.name + "_ckpt")
        self.on_log = on_log or (lambda record: None)
        self.device = torch.device(cfg.device)
        from cos_core.tasks import TASKS

        self.mix = task_mix(cfg.tasks, cfg.batch_size, cfg.task_params)
        shapes = {t.name: tuple(t.video_shape) for t in build_tasks(self.mix)}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"tasks must share one video shape to train one organism, got {shapes}")
        self.video_shape = next(iter(shapes.values()))
        torch.manual_seed(cfg.seed)  # the initial weights
        self.pipe = build_pipeline(cfg.preset, task_names=tuple(TASKS), video_shape=self.video_shape,
                                   shift=cfg.shift, task_params=cfg.task_params,
                                   trained_tasks=[name for name, _ in cfg.tasks])
        self.state: dict[str, Any] = {"step": 0, "train_seconds": 0.0, "losses": [], "validation": []}
        if cfg.init_from and not resume:  # on resume the checkpoint holds the weights (and the init record)
            self.state["init"] = initial_weights(self.pipe.transformer, Path(cfg.init_from), tuple(TASKS),
                                                 self.video_shape)
        self.model = self.pipe.transformer.to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.99), **fused)
        if resume:
            self._load(cfg)
        elif self.checkpoint_dir.exists():
            raise ValueError(f"checkpoint folder {self.checkpoint_dir} exists; pass --resume to continue it or "
                             f"choose another --out")

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def _load(self, cfg: TrainConfig) -> None:
        state, groups = load_checkpoint(self.checkpoint_dir)
        saved = TrainConfig.from_json(state["config"]).to_json()
        differ = [k for k, v in cfg.to_json().items() if k not in OPERATIONAL and saved[k] != v]
        if differ:
            raise ValueError(f"--resume with settings that change the run: {', '.join(differ)} differ from the "
                             f"checkpoint in {self.checkpoint_dir}; only {', '.join(OPERATIONAL)} may change")
        self.model.load_state_dict(groups["model"])
        if "ema" in groups:
            self.ema.load_state_dict(groups["ema"])
        else:
            logger.warning("checkpoint has no EMA shards; EMA restarts from the weights")
            self.ema.load_state_dict(self.model.state_dict())
        if "optim" in groups:
            load_optimizer(self.optimizer, {k: v.to(self.device) if not k.endswith(".step") else v
                                            for k, v in groups["optim"].items()}, state["param_groups"])
        else:
            logger.warning("checkpoint has no optimizer shards; AdamW restarts")
        self.state = {k: state[k] for k in ("step", "train_seconds", "losses", "validation", "rates", "init")
                      if k in state}
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.state["step"])

    def save(self) -> None:
        tensors, param_groups = optimizer_tensors(self.optimizer)
        groups = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optim": tensors}
        save_checkpoint(self.checkpoint_dir, groups,
                        dict(self.state, config=self.cfg.to_json(), param_groups=param_groups))
        logger.info("checkpoint at step %d -> %s", self.state["step"], self.checkpoint_dir)

    # -- loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        text_dim = self.model.config.text_dim
        flops = train_flops_per_sample(self.model, self.video_shape, text_dim, self.device)
        forward = torch.compile(self.model) if cfg.compile else self.model
        source = BatchSource(self.mix, self.device, workers=cfg.workers)
        params, ema_params = list(self.model.parameters()), list(self.ema.parameters())
        start_step, t_start = self.state["step"], time.perf_counter()
        window_loss, window_n, t_window, step_window = torch.zeros((), device=self.device), 0, time.perf_counter(), 0
        rate = 0.0
        try:
            for step in range(start_step, cfg.steps):
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step)
                x0, task_ids = source.batch(step)
                loss = flow_loss(forward, x0, task_ids, _step_generator(self.device, cfg.seed, step), cfg, text_dim)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                    torch._foreach_lerp_(ema_params, params, 1 - decay)
                window_loss += loss.detach()
                window_n += 1
                step_window += 1
                self.state["step"] = step + 1
                done = step + 1 == cfg.steps
                over = cfg.time_limit and (self.state["train_seconds"] + time.perf_counter() - t_start) > cfg.time_limit
                if (step + 1) % cfg.log_every == 0 or done or over:
                    mean = float(window_loss) / window_n  # the one host sync per log interval
                    now = time.perf_counter()
                    rate = step_window / (now - t_window)
                    self.state["losses"].append([step + 1, mean])
                    self.state.setdefault("rates", []).append([step + 1, rate])
                    self.on_log({"step": step + 1, "loss": mean, "it_s": rate, "lr": learning_rate(cfg, step),
                                 "fraction_of_peak": rate * flops * cfg.batch_size / (cfg.peak_tflops * 1e12)})
                    window_loss.zero_()
                    window_n, t_window, step_window = 0, now, 0
                if (step + 1) % cfg.eval_every == 0 and cfg.val_n and not (done or over):
                    self._validate()
                if (step + 1) % cfg.checkpoint_every == 0 or done or over:
                    self.state["train_seconds"] += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    self.save()
                if over:
                    logger.info("time limit %.0f s reached at step %d", cfg.time_limit, step + 1)
                    break
        finally:
            source.close()
        return {"step": self.state["step"], "finished": self.state["step"] >= cfg.steps,
                "flops_per_sample": flops, "last_it_s": rate}

    def _validate(self) -> dict:
        from .data import VAL_SEEDS
        from .evaluate import evaluate

        names = [n for n, _ in self.cfg.tasks]
        seeds = {n: range(VAL_SEEDS.start, VAL_SEEDS.start + self.cfg.val_n) for n in names}
        record: dict[str, Any] = {"step": self.state["step"]}
        for label, model in (("ema", self.ema), ("raw", self.model)):
            pipe = self._pipeline(model)
            model.eval()
            result = evaluate(pipe, seeds, self.cfg.num_inference_steps, task_params=self.cfg.task_params,
                              per_step=False)
            record[label] = {n: result["tasks"][n]["accuracy"] for n in names}
        self.model.train()
        self.state["validation"].append(record)
        self.on_log({"step": self.state["step"], "validation": record})
        return record

    def _pipeline(self, model: torch.nn.Module) -> Any:
        cfg = self.pipe.config
        return type(self.pipe)(transformer=model, scheduler=self.pipe.scheduler, task_names=cfg.task_names,
                               video_shape=self.video_shape, task_params=cfg.task_params,
                               trained_tasks=cfg.trained_tasks)

    def export(self, which: str = "ema") -> Any:
        """The pipeline with the chosen weights ("ema" or "raw") on the CPU in float32, saved into `out`."""
        model = copy.deepcopy(self.ema if which == "ema" else self.model).to("cpu", torch.float32).eval()
        pipe = self._pipeline(model)
        self.out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(str(self.out), safe_serialization=True, max_shard_size="15MB")
        return pipe


def best_weights(validation: list[dict]) -> str:
    """'ema' or 'raw': whichever had the higher mean validation accuracy at the last validation (ema on ties)."""
    if not validation:
        return "ema"
    last = validation[-1]
    mean = {k: sum(last[k].values()) / max(1, len(last[k])) for k in ("ema", "raw")}
    return "raw" if mean["raw"] > mean["ema"] else "ema"


def describe_throughput(flops_per_sample: float, batch_size: int, it_s: float, peak_tflops: float) -> dict:
    achieved = flops_per_sample * batch_size * it_s
    return {"flops_per_sample": flops_per_sample, "batch_size": batch_size, "it_s": it_s,
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak_tflops,
            "fraction_of_peak": achieved / (peak_tflops * 1e12) if it_s else math.nan}


def finish(trainer: Trainer, summary: dict[str, Any], evaluate_test: bool = True) -> dict[str, Any]:
    """Export the better of EMA/raw weights into `trainer.out`, evaluate on TEST seeds, write eval.json + card."""
    from cos_core.tasks import TEST_SEEDS

    from .evaluate import STEP_COUNTS, accuracy_vs_steps, evaluate, noise_redraw, write_card

    cfg = trainer.cfg
    which = best_weights(trainer.state["validation"])
    pipe = trainer.export(which)
    model_cfg = pipe.transformer.config
    report: dict[str, Any] = {
        "config": cfg.to_json(), "step": trainer.state["step"], "finished": summary["finished"],
        "train_seconds": trainer.state["train_seconds"], "weights": which,
        "video_shape": list(trainer.video_shape),
        "device_name": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        "model": {"preset": cfg.preset, "num_layers": model_cfg.num_layers,
                  "width": model_cfg.num_attention_heads * model_cfg.attention_head_dim,
                  "parameters": sum(p.numel() for p in pipe.transformer.parameters())},
        "throughput": describe_throughput(summary["flops_per_sample"], cfg.batch_size, summary["last_it_s"],
                                          cfg.peak_tflops),
        "losses": trainer.state["losses"], "validation": trainer.state["validation"],
        "init": trainer.state.get("init"),
        "answer_is_unique": {t.name: bool(t.answer_is_unique) for t in build_tasks(trainer.mix)},
    }
    if evaluate_test and cfg.eval_n:
        pipe.to(trainer.device)
        names = [n for n, _ in cfg.tasks]
        seeds = {n: range(TEST_SEEDS.start, TEST_SEEDS.start + cfg.eval_n) for n in names}
        report["test"] = evaluate(pipe, seeds, cfg.num_inference_steps, task_params=cfg.task_params)
        report["redraw"] = noise_redraw(pipe, report["test"], seeds, cfg.task_params)  # is a fork goal noise's pick?
        report["accuracy_vs_steps"] = accuracy_vs_steps(pipe, seeds, STEP_COUNTS, cfg.task_params)
        pipe.to("cpu")
        write_card(trainer.out, report)
    else:
        (trainer.out / "eval.json").write_text(json.dumps(report, indent=1))
    return report
