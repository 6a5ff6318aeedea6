"""`OrganismPipeline`: the organism's diffusers pipeline, image-to-video in pixel space with a Wan transformer.

Owns the denoising loop, written like diffusers' `WanImageToVideoPipeline` so capture treats both alike: the
transformer input is cat([x_t, mask, first-frame video]) on channels, each forward runs inside
`transformer.cache_context("cond"|"uncond")`, CFG uses separate cond then uncond calls, the guided prediction goes
through `scheduler.step`, and `callback_on_step_end(self, i, t, kwargs)` follows each step. Latents are the video.
Imports torch and diffusers; must not import cos_core.tasks (task names live in the pipeline config).
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from .presets import BOS_INDEX, IN_CHANNELS, OUT_CHANNELS, PROMPT_LEN

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 16
OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class OrganismPipelineOutput(BaseOutput):
    """frames: (B, 3, F, H, W) in [-1, 1] (the tasks' layout), numpy or torch; raw latents for "latent"."""

    frames: Any


def task_prompt_embeds(task_ids: torch.Tensor, text_dim: int, null: bool = False) -> torch.Tensor:
    """Deterministic prompt embeddings (B, PROMPT_LEN, text_dim): [one-hot(task_id), one-hot(bos)].

    The null (unconditional) embedding keeps the bos token and zeros the task token.
    """
    task_ids = torch.as_tensor(task_ids).long().reshape(-1)
    out = torch.zeros(task_ids.shape[0], PROMPT_LEN, text_dim, device=task_ids.device)
    if not null:
        out[torch.arange(task_ids.shape[0], device=task_ids.device), 0, task_ids] = 1.0
    out[:, 1, BOS_INDEX] = 1.0
    return out


def first_frame_condition(first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 4, F, H, W): the mask channel (1 at frame 0) and the first frame padded with zeros."""
    b, _, h, w = first_frame.shape
    mask = torch.zeros(b, 1, num_frames, h, w, device=first_frame.device, dtype=first_frame.dtype)
    mask[:, :, 0] = 1.0
    video = torch.zeros(b, 3, num_frames, h, w, device=first_frame.device, dtype=first_frame.dtype)
    video[:, :, 0] = first_frame
    return torch.cat([mask, video], dim=1)


class OrganismPipeline(DiffusionPipeline):
    """First frame + task -> video, by flow matching in pixel space (see the module docstring).

    Args:
        transformer: a `WanTransformer3DModel` with in_channels=7, out_channels=3.
        scheduler: a `FlowMatchEulerDiscreteScheduler`.
        task_names: task names in task-id order (the id is the one-hot index of the prompt embedding).
        video_shape: (channels, frames, height, width) of the videos the organism makes.
        task_params: {task name: `get_task` kwargs} the organism was trained with (a task left out uses its
            defaults); saved in model_index.json so capture and replay build the tasks it knows.
        trained_tasks: the tasks it was trained on (empty: not recorded); others have a prompt slot but no skill.
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred", "x0_hat"]

    def __init__(self, transformer: WanTransformer3DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 task_names: Sequence[str] = ("maze", "memory", "choice"),
                 video_shape: Sequence[int] = (3, 8, 24, 24), task_params: dict | None = None,
                 trained_tasks: Sequence[str] = ()):
        super().__init__()
        cfg = transformer.config
        if cfg.in_channels != IN_CHANNELS or cfg.out_channels != OUT_CHANNELS:
            raise ValueError(f"transformer has in/out channels {cfg.in_channels}/{cfg.out_channels}; "
                             f"the organism needs {IN_CHANNELS}/{OUT_CHANNELS}")
        if len(video_shape) != 4 or video_shape[0] != OUT_CHANNELS:
            raise ValueError(f"video_shape {tuple(video_shape)} must be (3, frames, height, width)")
        if len(task_names) >= cfg.text_dim:
            raise ValueError(f"{len(task_names)} task names do not fit text_dim={cfg.text_dim} (one slot is bos)")
        self.register_modules(transformer=transformer, scheduler=scheduler)
        task_params = dict(task_params or {})
        unknown = sorted(set(task_params) - set(task_names)) + sorted(set(trained_tasks) - set(task_names))
        if unknown:
            raise ValueError(f"task_params/trained_tasks name tasks {unknown} that are not in task_names")
        self.register_to_config(task_names=list(task_names), video_shape=[int(v) for v in video_shape],
                                task_params=task_params, trained_tasks=list(trained_tasks))
        self.set_progress_bar_config(disable=True)  # the library logs; the CLI draws bars

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "OrganismPipeline":
        """Load a saved organism folder offline; the transformer is read here so that no `accelerate` is needed
        (diffusers' own Wan loader refuses to run without it)."""
        path = os.fspath(pretrained_model_name_or_path)
        if "transformer" not in kwargs and os.path.isdir(os.path.join(path, "transformer")):
            kwargs["transformer"] = load_transformer(os.path.join(path, "transformer"), kwargs.get("torch_dtype"))
        return super().from_pretrained(path, **kwargs)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def seed_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """(B, 3, F, H, W) float32: the initial noise a call with `generator` seeded `s` draws, for each seed s (one
        generator per seed on the execution device), so a batch of seeds starts exactly like separate calls."""
        device = self._execution_device
        shape = (1, *self.config.video_shape)
        return torch.cat([torch.randn(shape, generator=torch.Generator(device=device).manual_seed(int(s)),
                                      device=device, dtype=torch.float32) for s in seeds])

    def task_ids(self, task: str | int | Sequence[str | int], batch_size: int) -> torch.Tensor:
        """Task name(s) or id(s) -> (batch_size,) int64 ids, validated against the config's task names."""
        names = list(self.config.task_names)
        items = [task] * batch_size if isinstance(task, (str, int, np.integer)) else list(task)
        if len(items) != batch_size:
            raise ValueError(f"got {len(items)} tasks for a batch of {batch_size} first frames")
        ids = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"unknown task {item!r}; allowed: {', '.join(names)}")
                ids.append(names.index(item))
            elif 0 <= int(item) < len(names):
                ids.append(int(item))
            else:
                raise ValueError(f"task id {item} out of range; allowed: 0..{len(names) - 1} ({', '.join(names)})")
        return torch.tensor(ids, dtype=torch.long)

    def _first_frames(self, first_frame: Any, device: torch.device) -> torch.Tensor:
        c, _, h, w = self.config.video_shape
        x = torch.as_tensor(np.asarray(first_frame) if not torch.is_tensor(first_frame) else first_frame)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"first_frame has shape {tuple(x.shape)}; expected ({c}, {h}, {w}) or (B, {c}, {h}, {w})")
        return x.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        first_frame: Any,
        task: str | int | Sequence[str | int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> OrganismPipelineOutput | tuple:
        """Generate videos from first frames (3, H, W) or (B, 3, H, W) in [-1, 1].

        Give `task` (name, id, or one per frame) or `prompt_embeds` (B, L, text_dim). `output_type` "np"/"pt"
        returns (B, 3, F, H, W) clipped to [-1, 1]; "latent" the raw final latents (the same layout, unclipped).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not allowed; allowed: "
                             f"{self._callback_tensor_inputs}")
        if (task is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of `task` or `prompt_embeds`")
        device = self._execution_device
        dtype = self.transformer.dtype
        text_dim = self.transformer.config.text_dim
        frames = self._first_frames(first_frame, device)  # (B, 3, H, W)
        batch_size = frames.shape[0]
        c, n_frames, h, w = self.config.video_shape
        self._guidance_scale = float(guidance_scale)

        if prompt_embeds is None:
            ids = self.task_ids(task, batch_size).to(device)
            prompt_embeds = task_prompt_embeds(ids, text_dim)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != batch_size or prompt_embeds.shape[2] != text_dim:
            raise ValueError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)}; expected "
                             f"({batch_size}, L, {text_dim})")
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if self.do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt_embeds = task_prompt_embeds(torch.zeros(batch_size, dtype=torch.long, device=device),
                                                        text_dim, null=True)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)

        shape = (batch_size, c, n_frames, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected {shape}")
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        condition = first_frame_condition(frames, n_frames)  # (B, 4, F, H, W)

        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(timesteps):
            sigma = self.scheduler.sigmas[i]
            latent_model_input = torch.cat([latents, condition], dim=1).to(dtype)
            timestep = t.expand(batch_size)
            with self.transformer.cache_context("cond"):
                noise_pred = self.transformer(hidden_states=latent_model_input, timestep=timestep,
                                              encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                with self.transformer.cache_context("uncond"):
                    noise_uncond = self.transformer(hidden_states=latent_model_input, timestep=timestep,
                                                    encoder_hidden_states=negative_prompt_embeds,
                                                    return_dict=False)[0]
                noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
            x0_hat = latents - sigma.to(torch.float32) * noise_pred.float()  # (B, 3, F, H, W)  # noqa: F841
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

            if callback_on_step_end is not None:
                scope = locals()
                callback_outputs = callback_on_step_end(self, i, t, {k: scope[k]
                                                                     for k in callback_on_step_end_tensor_inputs})
                if callback_outputs:
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

        if output_type == "latent":
            video = latents
        else:
            video = latents.clamp(-1.0, 1.0)
            if output_type == "np":
                video = video.float().cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return OrganismPipelineOutput(frames=video)


def load_transformer(folder: str, torch_dtype: torch.dtype | None = None) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` from a `save_pretrained` folder (config.json + one or sharded safetensors)."""
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()


def build_pipeline(preset: str, task_names: Sequence[str] = ("maze", "memory", "choice"),
                   video_shape: Sequence[int] = (3, 8, 24, 24), shift: float = 3.0, task_params: dict | None = None,
                   trained_tasks: Sequence[str] = ()) -> OrganismPipeline:
    """A freshly initialised organism (random weights) of a named preset."""
    from .presets import transformer_config

    transformer = WanTransformer3DModel(**transformer_config(preset))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
    return OrganismPipeline(transformer=transformer, scheduler=scheduler, task_names=task_names,
                            video_shape=video_shape, task_params=task_params, trained_tasks=trained_tasks)
