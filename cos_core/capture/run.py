"""The run loop: a pipeline over work items (instance x seed) with capture on, writing one archive shard per item.

Owns `WorkItem`, `capture_run` (work items in batches of pipeline calls → shards → archive), `capture_pipeline`
(the one-call helper for a pipeline you built), the capture run's manifest keys (model, scheduler, versions,
command, timing: `Manifest`'s "capture run" part) and decoding of chosen x̂0 steps. Resumable: items whose shard
exists are skipped; a run with a different configuration is refused; the batch size may differ between attempts.
Imports torch; diffusers only through the pipeline object; never streamlit or experiments.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..archive.writer import RunWriter
from . import batching
from . import families as fam
from .capturer import Captured, Capturer, CaptureSpec
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

    transformer = fam.unwrap(pipe.transformer)
    return {"source": source, "pipeline_class": type(pipe).__name__, "family": fam.family_of(pipe).name,
            "transformer_class": type(transformer).__name__, "transformer_config": config(transformer),
            "transformer_2_config": config(fam.unwrap(getattr(pipe, "transformer_2", None))),
            "boundary_ratio": getattr(pipe.config, "boundary_ratio", None),
            "scheduler_class": type(pipe.scheduler).__name__, "scheduler_config": config(pipe.scheduler),
            "dtype": str(transformer.dtype).removeprefix("torch."), "device": str(transformer.device)}


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call kwargs as recorded in the manifest: tensors by shape/dtype, plain values as they are."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[k] = {"tensor": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                      "sum": round(float(v.double().sum()), 6)}
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif hasattr(v, "tobytes") and hasattr(v, "size") and hasattr(v, "mode"):  # a PIL image (--image)
            out[k] = {"image": list(v.size), "mode": v.mode, "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
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


BATCH_FORWARDS = ("auto", "per_item", "joint")
WRITERS = 4  # threads scoring and writing shards on a GPU run


def _callbacks(call_kwargs: dict[str, Any]) -> tuple[dict[str, Any], Callable | None, list[str]]:
    """(pipeline kwargs without the user's step callback, that callback, the tensor inputs both need)."""
    call = dict(call_kwargs)
    if call.pop("output_type", "latent") != "latent":
        raise ValueError(f"call_kwargs has output_type={call_kwargs['output_type']!r}: capture runs the pipeline with "
                         "output_type='latent' (decode with decode=True); drop it")
    for key in ("generator", "latents"):
        if key in call:
            raise ValueError(f"call_kwargs has {key!r}: capture draws each item's noise from its seed (give an item "
                             "its own latents in WorkItem.kwargs)")
    user = call.pop("callback_on_step_end", None)
    inputs = list(dict.fromkeys(["latents", *call.pop("callback_on_step_end_tensor_inputs", ())]))
    return call, user, inputs


class _Batches:
    """The items this rank still has to capture, run as pipeline calls of up to `size` items; iterating yields each
    item's index once its shard is written (a progress bar wraps it; `len` is the item count)."""

    def __init__(self, todo: list[int], size: int | None, run_group: Callable[[list[int]], Iterable[int]],
                 items: list[WorkItem], device: torch.device, drain: Callable[[], Iterable[int]]):
        self.todo, self.size, self.run_group, self.items, self.device = todo, size, run_group, items, device
        self.drain = drain

    def __len__(self) -> int:
        return len(self.todo)

    def __iter__(self):
        pos = 0
        while pos < len(self.todo):
            measure = self.size is None  # the device default: run one item, measure its memory, fill the GPU
            group = batching.groups(self.todo[pos:], lambda i: self.items[i].kwargs, self.size or 1)[0]
            if measure:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            yield from self.run_group(group)
            pos += len(group)
            if measure:
                peak = torch.cuda.max_memory_allocated(self.device) - base
                self.size = batching.fit_batch_size(self.device, peak, len(self.todo) - pos)
                log.info("one item peaked at %.1f MB of GPU memory: batches of %d", peak / 2**20, self.size)
        yield from self.drain()


def capture_run(pipe: Any, items: list[WorkItem], spec: CaptureSpec, *, runs_dir: str | Path, run_id: str,
                call_kwargs: dict[str, Any], source: str, decode_steps: Any = None, decode: bool = False,
                score: Scorer | None = None, command: list[str] | None = None, extra: dict | None = None,
                progress: Callable[[Iterable], Iterable] = lambda it: it, ranks: Ranks | None = None,
                members: int = 1, batch_size: int | None = 1, batch_forward: str = "auto",
                writers: int | None = None) -> Path:
    """Capture every item into `runs_dir/run_id` and publish the archive; returns its path.

    `call_kwargs` are the pipeline's own (num_inference_steps required); a `callback_on_step_end` there is chained
    after capture's. `batch_size` items run per pipeline call, each with its own seed (one generator per row) and
    shard; None picks the device default (1 on a CPU; on a GPU one item is measured, then batches fill 60 % of the
    free memory). A pipeline that cannot batch (`batching.why_unbatchable`) runs one item per call with a warning.
    `batch_forward`: "per_item" runs each item's transformer rows on their own (archives bit-identical to batch
    size 1), "joint" one forward per call (items agree to the kernels' rounding), "auto" per_item on a CPU and
    joint on a GPU. `writers` threads score and write a call's shards while the next call runs (None: 4 on a GPU,
    0 = inline on a CPU). Under torchrun each rank captures its share of the items (`Ranks.share`) into the same run
    directory and rank 0 publishes once all have finished. With context parallelism the ranks of a group run the
    same items and the group's first rank writes them. `members` > 1: each item is that many videos (a latent
    ensemble) and the first is recorded."""
    ranks = ranks or from_env()
    if not items:
        raise ValueError("no work items: nothing to capture")
    ids = [it.sample_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample ids in the work items: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    n_steps = call_kwargs.get("num_inference_steps")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"call_kwargs needs num_inference_steps as a positive int, got {n_steps!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (the device default), got {batch_size!r}")
    if batch_forward not in BATCH_FORWARDS:
        raise ValueError(f"batch_forward {batch_forward!r} is not allowed; allowed: {BATCH_FORWARDS}")
    call, user, inputs = _callbacks(call_kwargs)
    device = torch.device(getattr(pipe, "_execution_device", fam.unwrap(pipe.transformer).device))
    size = batch_size if batch_size is not None else batching.default_batch_size(device)
    why = batching.why_unbatchable(pipe, members, items[0].kwargs)
    if why and size != 1:
        log.warning("%s cannot run several items per call: %s; capturing one item per call",
                    type(pipe).__name__, why)
        size = 1
    forward = batch_forward if batch_forward != "auto" else ("joint" if device.type == "cuda" else "per_item")
    # validates layers/steps before anything is written
    capturer = Capturer(pipe, spec, n_steps=n_steps, members=members, per_item=forward == "per_item")
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

    # on a GPU the shards of one call are scored and written (fsync) by threads while the next call computes
    writers = (WRITERS if device.type == "cuda" else 0) if writers is None else writers
    pool = ThreadPoolExecutor(writers, thread_name_prefix="cos-shard") if writers > 0 else None
    in_flight: list[tuple[int, Future]] = []  # the previous call's writes

    def run_group(group: list[int]) -> Iterable[int]:
        """One pipeline call for the items of `group`; yields each item once its shard is written."""
        chosen = [items[i] for i in group]
        capturer.begin_batch(len(group))
        output = pipe(**batching.call_kwargs(call, [it.kwargs for it in chosen]),
                      generator=batching.generators([it.seed for it in chosen], members, device),
                      output_type="latent", callback_on_step_end=capturer.callback(user),
                      callback_on_step_end_tensor_inputs=inputs)
        captured = capturer.end_batch(output, copy=pool is not None)  # without copies: written before the next call
        if not ranks.writes:
            return  # another rank of this context-parallel group holds the same videos and writes them
        jobs = [(sample, item, one, pipe, capturer, decode_pos, config["decode_steps"], score)
                for sample, item, one in zip(group, chosen, captured)]
        if pool is None:
            for job in jobs:
                _write(writer, *job)
                yield job[0]
            return
        previous = list(in_flight)
        in_flight[:] = [(job[0], pool.submit(_write, writer, *job)) for job in jobs]
        yield from drain(previous)

    def drain(pending: list[tuple[int, Future]] | None = None) -> Iterable[int]:
        for sample, future in (in_flight if pending is None else pending):
            future.result()  # a failed write or scorer raises here
            yield sample

    started = time.perf_counter()
    batches = _Batches([i for i in ranks.share(len(items)) if i not in done], size, run_group, items, device, drain)
    try:
        with capturer:
            for _ in progress(batches):
                pass
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # shards being written finish (each is atomic) before an error propagates
    ranks.barrier()  # every rank's shards are written
    if ranks.is_main:
        # wall time of the capture phase, all ranks together (from the configuration barrier to the last shard)
        timing = {"capture_s": round(time.perf_counter() - started, 3), "world_size": ranks.world,
                  "context_parallel": ranks.cp, "captured_here": len(items) - len(done),
                  "batch_size": batches.size, "batch_forward": forward}
        record = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "timing": timing,
                  "command": command if command is not None else sys.argv, "config": config,
                  "versions": versions(), "model": info}
        writer.finalize(len(items), record)
    ranks.barrier()  # the run is published
    return writer.final_dir


def _write(writer: RunWriter, sample: int, item: WorkItem, one: Captured, pipe: Any, capturer: Capturer,
           decode_pos: list[int], decode_steps: list[int] | None, score: Scorer | None) -> None:
    tensors, layout = dict(one.tensors), one.layout
    if decode_steps is not None:  # the VAE runs no collectives: the writing rank alone decodes
        _decode(pipe, capturer.family, tensors, decode_pos)
    layout["decoded"] = ({"steps": decode_steps, "shape": list(tensors["decoded/final"].shape)}
                         if decode_steps is not None else None)
    row = item.row()
    if score is not None:
        row.update(score(item, tensors["final"]))
    writer.write_sample(sample, tensors, row, layout)


def capture_pipeline(pipe: Any, *, runs_dir: str | Path, run_id: str, seeds: Iterable[int] = (0,),
                     prompts: Iterable[str] | None = None, spec: CaptureSpec | None = None,
                     batch_size: int | None = 1, score: Scorer | None = None, **call_kwargs: Any) -> Path:
    """Capture a pipeline you built into an archive in one call; returns the archive's path.

    One work item per (prompt, seed): its `prompt` goes to the pipeline, its seed draws its noise. Without
    `prompts`, one item per seed with `call_kwargs` alone (e.g. `prompt_embeds=...`). `call_kwargs` are the
    pipeline's own: `num_inference_steps` is required; a `callback_on_step_end` of yours is chained."""
    seeds = [int(s) for s in seeds]
    texts = list(prompts) if prompts is not None else [None]
    items = [WorkItem(sample_id=f"p{k}-s{seed}" if prompts is not None else f"seed{seed}", seed=seed,
                      instance=str(k), prompt=text or "", kwargs={"prompt": text} if text is not None else {})
             for k, text in enumerate(texts) for seed in seeds]
    return capture_run(pipe, items, spec or CaptureSpec(), runs_dir=runs_dir, run_id=run_id,
                       call_kwargs=call_kwargs, source=type(pipe).__name__, score=score,
                       command=["capture_pipeline"], batch_size=batch_size)
