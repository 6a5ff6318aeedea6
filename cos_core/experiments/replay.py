"""Re-run the samples of an organism archive: the model, work items, noise and scorer that made it.

Owns `Replay` (the pipeline, the task, the archive's work items in sample order, each item's initial noise exactly
as `cos capture` drew it, batched calls with per-item generators, and scoring a final video with the task's answer
extractor) and `load_replay`. Interventions and the latent ensemble build on it. Imports torch and diffusers
through the organism pipeline; never streamlit.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..archive import Archive
from ..capture.run import WorkItem
from ..capture.sources import ORGANISM_DIR, check_trained
from ..tasks import Instance, Task, get_task

log = logging.getLogger(__name__)
Callback = Callable[[Any, int, Any, dict], dict]


@dataclass
class Replay:
    """An organism archive made runnable again. `items[i]` is archive sample i (same id, seed, instance)."""

    archive: Archive
    pipe: Any
    task: Task
    call_kwargs: dict[str, Any]
    items: list[WorkItem]
    instances: dict[str, Instance] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def n_steps(self) -> int:
        return int(self.call_kwargs["num_inference_steps"])

    def sigmas(self, n_steps: int | None = None) -> list[float]:
        """σ of every step (n_steps + 1 values, the last 0) as the pipeline's scheduler sets them for a call with
        `n_steps` steps (default the run's); read from a copy, so the pipeline's own scheduler is not touched."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(int(n_steps or self.n_steps), device="cpu")
        return [float(s) for s in scheduler.sigmas]

    def instance(self, item: WorkItem) -> Instance:
        if item.instance not in self.instances:
            self.instances[item.instance] = self.task.instance(int(item.instance))
        return self.instances[item.instance]

    def first_frames(self, items: Sequence[WorkItem]) -> torch.Tensor:
        """(B, 3, H, W) float32 on the pipeline's device."""
        frames = np.stack([self.instance(it).first_frame for it in items])
        return torch.from_numpy(frames).to(self.device)

    @property
    def noise_mode(self) -> str:
        """How the archive's noise seeds were chosen (`cos capture --noise`): "shared" or "per_instance"."""
        return str((self.archive.manifest.get("config") or {}).get("noise", "shared"))

    def seed_indexes(self) -> list[int]:
        """Per item, the seed k asked for (`--seeds`), whatever the noise mode made of it (`seed_index`)."""
        from ..capture.sources import seed_index

        return [seed_index(it.seed, int(it.instance), self.noise_mode) for it in self.items]

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """(B, 3, F, H, W) float32: the initial noise each seed gives in `cos capture` (per-item generator)."""
        return self.pipe.seed_noise(seeds)

    def run(self, items: Sequence[WorkItem], *, latents: torch.Tensor | None = None,
            callback: Callback | None = None, tensor_inputs: Sequence[str] = ("latents",),
            **overrides: Any) -> np.ndarray:
        """Generate `items` as one batch; returns the final latents (B, 3, F, H, W) float32 (unclipped, like the
        archive's `final`). Without `latents` each item starts from its own seed's noise."""
        if not items:
            raise ValueError("no items to run")
        kwargs = {**self.call_kwargs, **overrides}
        if latents is None:
            latents = self.noise([it.seed for it in items])
        out = self.pipe(first_frame=self.first_frames(items), latents=latents, output_type="latent",
                        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=list(tensor_inputs),
                        **kwargs)
        return out.frames.float().cpu().numpy()

    def score(self, item: WorkItem, final: np.ndarray) -> dict[str, Any]:
        """`correct` (bool), `score` (float) and `answer_key` (the discrete answer, None if unreadable)."""
        answer = self.task.extract(final)
        scores = self.task.score(answer, self.instance(item))
        return {"correct": bool(scores["correct"]), "score": float(scores["score"]),
                "answer_key": self.task.answer_key(answer)}


def held_out_instances(first: int, n: int) -> list[int]:
    """The task's held-out instance seeds TEST_SEEDS[first:first + n] (never seen in training), validated."""
    from ..tasks import TEST_SEEDS

    if n < 1 or first < 0:
        raise ValueError(f"--instances {n} must be >= 1 and --first-instance {first} >= 0")
    if first + n > len(TEST_SEEDS):
        raise ValueError(f"instances {first}..{first + n} exceed the {len(TEST_SEEDS)} held-out seeds")
    return list(TEST_SEEDS[first:first + n])


def load_replay(archive: Archive | str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, model_dir: str | Path | None = None) -> Replay:
    """The pipeline and work items of an organism archive made by `cos capture --task ...`.

    `model_dir` defaults to the shipped organism (the manifest's own path is from the machine that made the run);
    ValueError when the run is not an organism task run or the weights are missing."""
    from ..analysis.step_frames import run_tasks, task_for
    from ..organism.pipeline import OrganismPipeline

    archive = archive if isinstance(archive, Archive) else Archive.open(archive)
    source = str(archive.manifest.get("model", {}).get("source", ""))
    if not source.startswith("organism"):
        raise ValueError(f"{archive.run_id} was made by {source or 'an unknown model'!r}; re-running needs a run "
                         "of the organism on a task (`cos capture --task ...`), whose answers can be scored")
    ensemble = (archive.manifest.get("config") or {}).get("ensemble")
    if ensemble:
        raise ValueError(f"{archive.run_id} captured member 0 of latent ensembles ({ensemble.get('method')}, "
                         f"K={ensemble.get('k')}, n={ensemble.get('n')}); re-running it alone would not reproduce "
                         "it: intervene on / ensemble the plain run of the same instances instead")
    tasks = run_tasks(archive)
    if len(tasks) != 1:
        raise ValueError(f"{archive.run_id} mixes tasks {sorted(tasks)}; re-running needs a run of one task")
    task = task_for(archive, next(iter(tasks)))
    model_dir = Path(model_dir or ORGANISM_DIR)
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"no organism weights at {model_dir} (model_index.json missing)")
    pipe = OrganismPipeline.from_pretrained(str(model_dir)).to(device=device, dtype=dtype)
    if archive.noise_device not in ("?", pipe._execution_device.type):
        log.warning("%s drew its noise on %s; re-running on %s draws other noise for the same seeds, so the "
                    "re-run samples are new draws, not the archive's", archive.run_id, archive.noise_device,
                    pipe._execution_device.type)
    trained = get_task(task.name, **check_trained(pipe, task.name, model_dir)).config
    if trained != task.config:
        raise ValueError(f"{archive.run_id} was made with {task.name} {task.config}; the organism at {model_dir} was "
                         f"trained on {trained}: re-run the archive with the organism that made it (--model)")
    call = dict(archive.manifest["config"].get("call") or {})
    call = {k: v for k, v in call.items() if k in ("task", "num_inference_steps", "guidance_scale")}
    call.setdefault("task", task.name)
    call["num_inference_steps"] = int(archive.n_steps)
    table = archive.samples
    items = [WorkItem(sample_id=str(r["sample_id"]), seed=int(r["seed"]), task=task.name, instance=str(r["instance"]))
             for _, r in table.sort_values("sample").iterrows()]
    return Replay(archive, pipe, task, call, items)
