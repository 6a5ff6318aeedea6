"""Where a capture's model and work items come from: the shipped organism on a task, a tiny random diffusers
pipeline, Wan2.1-1.3B's architecture with random weights (benchmarks), or any diffusers folder / hub id with
prompts or a VBVR-Bench folder.

Owns `SourceConfig` (what to load, as plain values), `Source` (pipeline, call kwargs, work items, scorer, labels for
the manifest) and `load_source`. Imports torch and diffusers; never streamlit, argparse or experiments.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from .run import WorkItem

ORGANISM_DIR = Path(__file__).resolve().parents[2] / "models" / "organism"  # the shipped weights


@dataclass(frozen=True)
class SourceConfig:
    """What `load_source` loads. `model`: "organism" (default), "tiny:<family>", "random:<name>", or a diffusers
    folder / hub id. The organism reads `task`, `instances`, `first_instance` (into the held-out seeds) and `members`;
    other models read `prompts` or `vbvr`, `cpu_offload` and `device_map`. The generation overrides left at None
    keep the model's own values. `members`: videos per pipeline call for a latent ensemble of that many seeds
    (member m draws seed + m; None: a plain run), set up by `cos_core.experiments.merge`. `noise` (organism):
    "shared" — seed k draws the same initial noise for every instance, as a diffusers generator seeded k does — or
    "per_instance" — each (instance, seed) draws its own (`instance_noise_seed`, recorded as the sample's seed), so
    that statistics over instances also sample the noise."""

    model: str = "organism"
    task: str = "maze"
    instances: int = 4
    first_instance: int = 0
    prompts: tuple[str, ...] = ()
    vbvr: Path | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    cpu_offload: bool = False
    device_map: str | None = None
    members: int | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    true_cfg_scale: float | None = None
    guidance_scale_2: float | None = None
    image: Path | None = None  # one input image for every item of an image-to-video pipeline (no VBVR folder)
    noise: str = "shared"

    def __post_init__(self) -> None:
        if self.noise not in NOISE_MODES:
            raise ValueError(f"--noise {self.noise!r}: choose one of {', '.join(NOISE_MODES)}")
        if self.members is not None and self.members < 1:
            raise ValueError(f"members={self.members} must be >= 1 (videos per pipeline call)")
        if self.image is not None and self.vbvr is not None:
            raise ValueError("--image and --vbvr both give input images: choose one")

    def overrides(self) -> dict[str, Any]:
        """The generation settings given, as pipeline call kwargs."""
        return {k: getattr(self, k) for k in OVERRIDES if getattr(self, k) is not None}


NOISE_MODES = ("shared", "per_instance")
NOISE_STRIDE = 1_000_003  # per-instance noise seeds: instance_seed * NOISE_STRIDE + k


def instance_noise_seed(instance_seed: int, seed: int) -> int:
    """The noise seed of (instance, seed) under `noise="per_instance"`: distinct for every pair of a task's seeds
    (instance seeds < 2**32, seeds k < NOISE_STRIDE), deterministic, and a valid torch seed (< 2**63)."""
    return int(instance_seed) * NOISE_STRIDE + int(seed)


def seed_index(noise_seed: int, instance_seed: int, noise: str = "shared") -> int:
    """The seed k the user asked for (`--seeds`) of a sample drawn with `noise_seed`: itself under shared noise, the
    inverse of `instance_noise_seed` under per-instance noise. Pairings "same seed" compare these."""
    return int(noise_seed) if noise == "shared" else int(noise_seed) - int(instance_seed) * NOISE_STRIDE


# SourceConfig fields passed to the pipeline call as they are (when given), with the flag that sets each
OVERRIDES = {"num_inference_steps": "--num-inference-steps", "guidance_scale": "--guidance-scale",
             "height": "--height", "width": "--width", "num_frames": "--num-frames",
             "negative_prompt": "--negative-prompt", "max_sequence_length": "--max-sequence-length",
             "true_cfg_scale": "--true-cfg-scale", "guidance_scale_2": "--guidance-scale-2"}


def check_call(pipe: Any, call: dict[str, Any]) -> dict[str, Any]:
    """`call` unchanged when the pipeline's `__call__` takes every key; else a ValueError naming the flag."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return call
    for key in call:
        if key not in params:
            flag = OVERRIDES.get(key, "--image" if key == "image" else key)
            raise ValueError(f"{flag}: {type(pipe).__name__} takes no {key!r} argument; drop the flag")
    return call


def load_image(path: Path) -> Any:
    """The RGB image at `path` (PIL), with a clear error when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"--image {str(path)!r} cannot be read as an image: {err}") from None


@dataclass
class Source:
    pipe: Any
    call_kwargs: dict[str, Any]
    items: list[WorkItem]
    label: str
    default_run_id: str
    score: Callable[[WorkItem, np.ndarray], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    members: int = 1  # videos per pipeline call (a latent ensemble's n), of which the first is captured
    around: Callable[[], ContextManager] = contextlib.nullcontext  # entered around the capture (ensemble merging)


def load_source(config: SourceConfig, *, device: str, dtype: torch.dtype, seeds: list[int]) -> Source:
    if not seeds:
        raise ValueError("--seeds selects no seed")
    if config.model == "organism":
        extra = [OVERRIDES[k] for k in ("negative_prompt", "max_sequence_length", "true_cfg_scale", "guidance_scale_2")
                 if getattr(config, k) is not None] + (["--image"] if config.image is not None else [])
        if extra:
            raise ValueError(f"{', '.join(extra)}: the organism takes its first frame and prompt from the task; "
                             "these flags are for diffusers models (--model)")
        return organism_source(config, device=device, dtype=dtype, seeds=seeds)
    if config.members is not None:
        raise ValueError("--ensemble runs the organism (its flow-matching scheduler and scored tasks); drop --model")
    if config.model.startswith("tiny:"):
        return tiny_source(config, device=device, dtype=dtype, seeds=seeds)
    if config.model.startswith("random:"):
        return random_source(config, device=device, dtype=dtype, seeds=seeds)
    return pretrained_source(config, device=device, dtype=dtype, seeds=seeds)


def organism_source(config: SourceConfig, *, device: str, dtype: torch.dtype, seeds: list[int],
                    model_dir: Path | None = None) -> Source:
    from ..organism.pipeline import DEFAULT_STEPS, OrganismPipeline
    from ..tasks import TEST_SEEDS, get_task

    model_dir = Path(model_dir or ORGANISM_DIR)
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"no organism weights at {model_dir} (model_index.json missing); train them with "
                         "`cos train` or pass --model")
    if config.instances < 1:
        raise ValueError(f"--instances must be ≥ 1, got {config.instances}")
    members = config.members
    pipe = OrganismPipeline.from_pretrained(str(model_dir)).to(device=device, dtype=dtype)
    params = check_trained(pipe, config.task, model_dir)
    task = get_task(config.task, **params)
    if config.noise == "per_instance" and any(not 0 <= int(s) < NOISE_STRIDE for s in seeds):
        raise ValueError(f"--noise per-instance takes seeds 0..{NOISE_STRIDE - 1}, got {list(seeds)}")
    items = []
    for k in range(config.first_instance, config.first_instance + config.instances):
        inst = task.instance(TEST_SEEDS[k])
        frame = torch.from_numpy(inst.first_frame).to(device=device, dtype=dtype)
        for seed in seeds:
            noise_seed = seed if config.noise == "shared" else instance_noise_seed(inst.seed, seed)
            kwargs = {"first_frame": frame[None]}  # (1, 3, H, W): items of a batched call concatenate
            if members is not None:  # member m starts from seed + m's noise (member 0: the plain run of this seed)
                kwargs = {"first_frame": frame.expand(members, -1, -1, -1),
                          "latents": pipe.seed_noise(range(noise_seed, noise_seed + members))}
            items.append(WorkItem(sample_id=f"{config.task}-{inst.seed}-s{seed}", seed=noise_seed, task=config.task,
                                  instance=str(inst.seed), prompt=inst.prompt, labels=inst.labels, kwargs=kwargs))
    instances = {it.instance: task.instance(int(it.instance)) for it in items}

    def score(item: WorkItem, final: np.ndarray) -> dict[str, Any]:
        inst = instances[item.instance]
        answer = task.extract(final)
        outcomes = {f"label_outcome_{k}": float("nan") if v is None else int(v)
                    for k, v in task.outcome_labels(answer).items()}
        return {"answer": json.dumps(answer, sort_keys=True, default=str),
                **{f"score_{k}": float(v) for k, v in task.score(answer, inst).items()}, **outcomes}

    call = {"task": config.task, **config.overrides()}
    call.setdefault("num_inference_steps", DEFAULT_STEPS)
    steps = call["num_inference_steps"]
    run_id = f"organism-{config.task}-{len(items)}x{steps}"
    extra = {"task": config.task, "task_params": {config.task: params} if params else {}, "model_dir": str(model_dir),
             "noise": config.noise}
    return Source(pipe, call, items, label=f"organism:{model_dir.name}", default_run_id=run_id, score=score,
                  extra=extra, members=members or 1)


def check_trained(pipe: Any, task: str, model_dir: Path) -> dict[str, Any]:
    """The `get_task` kwargs the organism was trained with for `task`; ValueError when it was not trained on it (an
    organism that records no `trained_tasks`, like the first one, is trusted with every task it has a slot for)."""
    trained = list(pipe.config.get("trained_tasks") or [])
    if task not in pipe.config.task_names or (trained and task not in trained):
        raise ValueError(f"the organism at {model_dir} was trained on {trained or list(pipe.config.task_names)}, "
                         f"not {task!r}; choose one of those with --task")
    return dict((pipe.config.get("task_params") or {}).get(task, {}))


def tiny_source(config: SourceConfig, *, device: str, dtype: torch.dtype, seeds: list[int]) -> Source:
    from .tiny_pipelines import build_tiny

    name = config.model.split(":", 1)[1]
    case = build_tiny(name, dtype=dtype)
    if config.cpu_offload:
        case.pipe.enable_model_cpu_offload(device=device)
    else:
        case.pipe.to(device)
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.call_kwargs.items()
            if k != "output_type"}
    call.update(config.overrides())
    if config.image is not None:
        call["image"] = load_image(check_call(case.pipe, {"image": config.image})["image"])
    items = [WorkItem(sample_id=f"seed{s}", seed=s, task="", instance="0") for s in seeds]
    return Source(case.pipe, check_call(case.pipe, call), items, label=f"tiny:{name}", default_run_id=f"tiny-{name}")


RANDOM_MODELS = ("wan2.1-1.3b",)


def random_source(config: SourceConfig, *, device: str, dtype: torch.dtype, seeds: list[int]) -> Source:
    """`random:wan2.1-1.3b`: Wan2.1-T2V-1.3B's transformer with seeded random weights (no download), no text encoder
    or VAE, fixed seeded prompt embeddings: a real-size workload for capture and scaling benchmarks. Every rank
    builds the same weights and embeddings; the work items are one per seed."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from .tiny_pipelines import wan_1_3b_transformer

    name = config.model.split(":", 1)[1]
    if name not in RANDOM_MODELS:
        allowed = ", ".join(f"random:{m}" for m in RANDOM_MODELS)
        raise ValueError(f"--model random:{name} is unknown; allowed: {allowed}")
    transformer = wan_1_3b_transformer(dtype, device=device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    embeds = torch.randn(2, 512, transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    embeds = embeds.to(device=device, dtype=dtype)
    call = {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:], "height": 480, "width": 832,
            "num_frames": 33, "num_inference_steps": 20, "guidance_scale": 5.0, **config.overrides()}
    items = [WorkItem(sample_id=f"seed{s}", seed=s, task="", instance="0") for s in seeds]
    return Source(pipe, call, items, label=f"random:{name}", default_run_id=f"random-{name}-{len(items)}")


def pretrained_source(config: SourceConfig, *, device: str, dtype: torch.dtype, seeds: list[int]) -> Source:
    """A real diffusers video pipeline from a folder or hub id (needs its weights on disk or network access)."""
    from diffusers import DiffusionPipeline

    if config.device_map and config.cpu_offload:
        raise ValueError("--device-map and --cpu-offload are alternatives: choose one")
    extra = {"device_map": config.device_map} if config.device_map else {}
    pipe = DiffusionPipeline.from_pretrained(config.model, torch_dtype=dtype, **extra)
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif not config.device_map:
        pipe.to(device)
    call = {"num_inference_steps": 50, **config.overrides()}
    if config.image is not None:
        call["image"] = load_image(check_call(pipe, {"image": config.image})["image"])
    check_call(pipe, call)
    items: list[WorkItem] = []
    if config.vbvr is not None:
        from .vbvr import load_vbvr

        for rec in load_vbvr(config.vbvr):
            for seed in seeds:
                kwargs = {"prompt": rec.prompt}
                if "ImageToVideo" in type(pipe).__name__:
                    kwargs["image"] = rec.image
                items.append(WorkItem(sample_id=f"{rec.sample_id}-s{seed}", seed=seed, task="vbvr",
                                      instance=rec.sample_id, prompt=rec.prompt, kwargs=kwargs))
    elif config.prompts:
        for k, prompt in enumerate(config.prompts):
            for seed in seeds:
                items.append(WorkItem(sample_id=f"p{k}-s{seed}", seed=seed, instance=str(k), prompt=prompt,
                                      kwargs={"prompt": prompt}))
    else:
        raise ValueError(f"--model {config.model}: give --prompt or --vbvr to say what to generate")
    name = Path(str(config.model)).name or "model"
    return Source(pipe, call, items, label=str(config.model), default_run_id=f"{name}-{len(items)}")
