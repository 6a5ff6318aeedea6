"""The run loop: a pipeline over work items (instance x seed) with capture on, writing one archive shard per item.

Owns `WorkItem`, the capture run's manifest keys (model, scheduler, versions, command, timing: `Manifest`'s "capture
run" part) and decoding of chosen x̂0 steps. Resumable: items whose shard exists are skipped; a run with a different
configuration is refused. Imports torch; diffusers only through the pipeline object; never streamlit or experiments.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..archive.writer import RunWriter
from . import families as fam
from .capturer import Capturer, CaptureSpec
from .distributed import Ranks, from_env
from .selection import select

log = logging.getLogger(__name__)
Scorer = Callable[["WorkItem", np.ndarray], dict[str, Any]]


@dataclass(frozen=True)
class WorkItem:
    """One pipeline call. `kwargs` (e.g. an image or first frame) are passed to the pipeline, not archived."""

    sample_id: str
    seed: int
    task: str = ""
    instance: str = ""
    prompt: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    def row(self) -> dict[str, Any]:
        row = {"sample_id": self.sample_id, "seed": int(self.seed), "task": self.task,
               "instance": str(self.instance), "prompt": self.prompt}
        row.update({f"label_{k}": int(v) for k, v in self.labels.items()})
        return row


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cos-lab", "torch", "diffusers", "transformers", "numpy", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def model_info(pipe: Any, source: str) -> dict[str, Any]:
    """What the manifest records about the model: classes and full configs (JSON-able)."""
    def config(module):  # diffusers' `_use_default_values` is an unordered set: leave it out
        if module is None:
            return None
        return json.loads(json.dumps({k: v for k, v in dict(module.config).items() if k != "_use_default_values"},
                                     default=str))

    return {"source": source, "pipeline_class": type(pipe).__name__, "family": fam.family_of(pipe).name,
            "transformer_class": type(pipe.transformer).__name__, "transformer_config": config(pipe.transformer),
            "transformer_2_config": config(getattr(pipe, "transformer_2", None)),
            "boundary_ratio": getattr(pipe.config, "boundary_ratio", None),
            "scheduler_class": type(pipe.scheduler).__name__, "scheduler_config": config(pipe.scheduler),
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."), "device": str(pipe.transformer.device)}


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call kwargs as recorded in the manifest: tensors by shape/dtype, plain values as they are."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[k] = {"tensor": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                      "sum": round(float(v.double().sum()), 6)}
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        else:
            out[k] = repr(type(v).__name__)
    return out


def _decode(pipe: Any, family: fam.Family, tensors: dict[str, np.ndarray], positions: list[int]) -> None:
    decode = fam.decoder(family, pipe)
    device = pipe.transformer.device
    with torch.no_grad():
        x0 = torch.from_numpy(tensors["x0_hat"][positions]).to(device)  # (step, C, F, H, W)
        tensors["decoded/x0_hat"] = decode(x0).cpu().numpy()
        tensors["decoded/final"] = decode(torch.from_numpy(tensors["final"])[None].to(device))[0].cpu().numpy()


def capture_run(pipe: Any, items: list[WorkItem], spec: CaptureSpec, *, runs_dir: str | Path, run_id: str,
                call_kwargs: dict[str, Any], source: str, decode_steps: Any = None, decode: bool = False,
                score: Scorer | None = None, command: list[str] | None = None, extra: dict | None = None,
                progress: Callable[[Iterable], Iterable] = lambda it: it, ranks: Ranks | None = None,
                members: int = 1) -> Path:
    """Capture every item into `runs_dir/run_id` and publish the archive; returns its path.

    Under torchrun each rank captures its share of the items (`Ranks.share`) into the same run directory and
    rank 0 publishes once all have finished; the archive is the same as a single process would write. With
    context parallelism the ranks of a group run the same items and the group's first rank writes them.
    `members` > 1: each pipeline call generates that many videos (a latent ensemble) and the first is recorded."""
    ranks = ranks or from_env()
    if not items:
        raise ValueError("no work items: nothing to capture")
    ids = [it.sample_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample ids in the work items: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    n_steps = call_kwargs.get("num_inference_steps")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"call_kwargs needs num_inference_steps as a positive int, got {n_steps!r}")
    # validates layers/steps before anything is written
    capturer = Capturer(pipe, spec, n_steps=n_steps, members=members)
    decode_pos: list[int] = []
    if decode:
        if "x0_hat" not in spec.tensors:
            raise ValueError("decoding needs x0_hat among the captured tensors")
        chosen = select(decode_steps, n_steps, "decode step")
        missing = [s for s in chosen if s not in capturer.tensor_steps]
        if missing:
            raise ValueError(f"decode steps {missing} are not among the captured tensor steps")
        decode_pos = [capturer.tensor_steps.index(s) for s in chosen]
    config = {"spec": {**asdict(spec), "layers": list(capturer.layers),
                       "steps": list(capturer.act_steps), "tensor_steps": list(capturer.tensor_steps)},
              "call": _jsonable(call_kwargs), "items": [[it.sample_id, it.seed] for it in items],
              "decode_steps": [capturer.tensor_steps[p] for p in decode_pos] if decode else None,
              **(extra or {})}
    config = json.loads(json.dumps(config, default=str))
    info = model_info(pipe, source)
    resume_key = {"config": config, "model": {k: info[k] for k in ("source", "pipeline_class", "family")}}
    writer = RunWriter(runs_dir, run_id, resume_key) if ranks.is_main else None
    ranks.barrier()  # rank 0 has created (or checked) the run directory
    writer = writer or RunWriter(runs_dir, run_id, resume_key, join=True)
    ranks.barrier()  # every rank has checked the configuration before anyone writes
    done = writer.finished()
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with capturer:
        for sample in progress([i for i in ranks.share(len(items)) if i not in done]):
            item = items[sample]
            capturer.begin_sample()
            # the device the pipeline samples its noise on (with CPU offload the transformer itself sits on the CPU)
            generator = torch.Generator(device=getattr(pipe, "_execution_device", pipe.transformer.device))
            generator.manual_seed(int(item.seed))
            pipe(**call_kwargs, **item.kwargs, generator=generator, output_type="latent",
                 callback_on_step_end=capturer.callback(), callback_on_step_end_tensor_inputs=["latents"])
            tensors, layout = capturer.end_sample(copy=False)  # written below, before the next sample
            if not ranks.writes:
                continue  # another rank of this context-parallel group holds the same video and writes it
            if decode:  # the VAE runs no collectives: the writing rank alone decodes
                _decode(pipe, capturer.family, tensors, decode_pos)
            layout["decoded"] = ({"steps": config["decode_steps"], "shape": list(tensors["decoded/final"].shape)}
                                 if decode else None)
            row = item.row()
            if score is not None:
                row.update(score(item, tensors["final"]))
            writer.write_sample(sample, tensors, row, layout)
    ranks.barrier()  # every rank's shards are written
    if ranks.is_main:
        # wall time of the capture phase, all ranks together (from the configuration barrier to the last shard)
        timing = {"capture_s": round(time.perf_counter() - started, 3), "world_size": ranks.world,
                  "context_parallel": ranks.cp, "captured_here": len(items) - len(done)}
        record = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "timing": timing,
                  "command": command if command is not None else sys.argv, "config": config,
                  "versions": versions(), "model": info}
        writer.finalize(len(items), record)
    ranks.barrier()  # the run is published
    return writer.final_dir
