"""Architecture adapters: one small table entry per diffusers video family, no class hierarchy of ours.

Owns what differs between Wan 2.1/2.2 (and our Wan-class organism), CogVideoX, LTX and HunyuanVideo: where the
blocks are, the latent layout, the token grid after patchify, how the CFG branches are laid out, how x̂0 follows
from the scheduler (or is read from it), which latent frames a pipeline overwrites with its conditioning, and how
latents decode through the VAE. A pipeline or transformer is matched by its class hierarchy (subclasses and
`torch.compile`d transformers are accepted). Imports torch lazily; used only by capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

SUPPORTED_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "CogVideoXPipeline", "CogVideoXImageToVideoPipeline",
                       "LTXPipeline", "LTXImageToVideoPipeline", "HunyuanVideoPipeline", "OrganismPipeline")


@dataclass(frozen=True)
class Family:
    name: str
    transformer_class: str
    block_lists: tuple[str, ...]      # transformer attributes holding blocks, concatenated into one layer index
    latent_layout: str                # layout of `latents` inside the loop: "BCFHW", "BFCHW" or "packed"
    batched_cfg: bool                 # True: one doubled batch per step, uncond half first; False: separate calls

    def patch(self, config: Any) -> tuple[int, int, int]:
        """(pt, ph, pw) of the transformer's patchify."""
        p = config.patch_size
        if isinstance(p, (tuple, list)):
            return tuple(int(v) for v in p)  # type: ignore[return-value]
        return (int(getattr(config, "patch_size_t", None) or 1), int(p), int(p))


FAMILIES: dict[str, Family] = {
    "wan": Family("wan", "WanTransformer3DModel", ("blocks",), "BCFHW", False),
    "cogvideox": Family("cogvideox", "CogVideoXTransformer3DModel", ("transformer_blocks",), "BFCHW", True),
    "ltx": Family("ltx", "LTXVideoTransformer3DModel", ("transformer_blocks",), "packed", True),
    "hunyuan": Family("hunyuan", "HunyuanVideoTransformer3DModel",
                      ("transformer_blocks", "single_transformer_blocks"), "BCFHW", False),
}


def unwrap(module: Any) -> Any:
    """The module itself, or the model inside a `torch.compile` wrapper (`OptimizedModule._orig_mod`)."""
    return getattr(module, "_orig_mod", module)


def _lineage(obj: Any) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def family_of(pipe: Any) -> Family:
    """The adapter for a pipeline: its class or a base class must be a supported pipeline, and its transformer's
    class (or a base class; a `torch.compile`d one is looked through) a supported transformer."""
    name = type(pipe).__name__
    if not set(_lineage(pipe)) & set(SUPPORTED_PIPELINES):
        raise ValueError(f"pipeline class {name!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)} "
                         "(or a subclass of one)")
    transformer = unwrap(getattr(pipe, "transformer", None))
    lineage = _lineage(transformer)
    for family in FAMILIES.values():
        if family.transformer_class in lineage:
            return family
    raise ValueError(f"{name} has a transformer of class {type(transformer).__name__!r}; supported (or subclasses): "
                     f"{', '.join(f.transformer_class for f in FAMILIES.values())}")


def experts(pipe: Any) -> list[tuple[str, Any]]:
    """[(name, module)] of the denoisers: Wan 2.2 has `transformer` (high noise) and `transformer_2` (low)."""
    out = [("transformer", pipe.transformer)]
    second = getattr(pipe, "transformer_2", None)
    if second is not None:
        out.append(("transformer_2", second))
    return out


def blocks(family: Family, transformer: Any) -> list[Any]:
    found = []
    for attr in family.block_lists:
        found.extend(getattr(transformer, attr))
    return found


def token_grid(family: Family, transformer: Any, hidden_states: Any, kwargs: dict) -> tuple[int, int, int]:
    """(frames, rows, cols) of video tokens for one transformer call, from its input (tokens are frame-major)."""
    pt, ph, pw = family.patch(transformer.config)
    if family.latent_layout == "packed":
        f, h, w = kwargs["num_frames"], kwargs["height"], kwargs["width"]
    elif family.latent_layout == "BFCHW":
        f, h, w = hidden_states.shape[1], hidden_states.shape[3], hidden_states.shape[4]
    else:
        f, h, w = hidden_states.shape[2], hidden_states.shape[3], hidden_states.shape[4]
    return (int(f) // pt, int(h) // ph, int(w) // pw)


def to_cfhw(family: Family, pipe: Any, latents: Any, latent_fhw: tuple[int, int, int]) -> Any:
    """Latents as the loop holds them -> (B, C, F, H, W)."""
    if family.latent_layout == "BFCHW":
        return latents.permute(0, 2, 1, 3, 4)
    if family.latent_layout == "packed":
        f, h, w = latent_fhw
        return pipe._unpack_latents(latents, f, h, w, pipe.transformer_spatial_patch_size,
                                    pipe.transformer_temporal_patch_size)
    return latents


def x0_rule(scheduler: Any) -> str:
    """'flow' (x̂0 = x_t − σ·v̂), 'v_prediction' or 'epsilon' (DDPM-family, from alphas_cumprod)."""
    kind = getattr(scheduler.config, "prediction_type", None)
    if type(scheduler).__name__.startswith("FlowMatch") or kind == "flow_prediction":
        return "flow"  # Wan's own configs use UniPC with flow_prediction and flow sigmas
    if kind in ("v_prediction", "epsilon") and hasattr(scheduler, "alphas_cumprod"):
        return kind
    raise ValueError(f"scheduler {type(scheduler).__name__} (prediction_type={kind!r}) is not supported: need a "
                     "FlowMatch* scheduler or a DDPM-family one with v_prediction/epsilon")


def sigma_of(scheduler: Any, rule: str, step: int, t: Any) -> float:
    """σ at this step = the noise coefficient of x_t: flow matching's σ (x_t = (1−σ)·x0 + σ·ε), or sqrt(1−ᾱ_t) for
    DDPM-family schedulers (x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε); both run from 1 (noise) to 0 (clean)."""
    if rule == "flow":
        return float(scheduler.sigmas[step])
    return float(1.0 - float(scheduler.alphas_cumprod[int(t)])) ** 0.5


def x0_hat(scheduler: Any, rule: str, step: int, t: Any, sample: Any, model_output: Any) -> Any:
    """x̂0 from x_t and the guided model output by the family's rule, in float32 (as the schedulers compute their own
    steps), then thresholded or clipped as the scheduler's config says (`thresholding`, `clip_sample`)."""
    import torch

    x, out = sample.to(torch.float32), model_output.to(torch.float32)
    if rule == "flow":
        x0 = x - float(scheduler.sigmas[step]) * out
    else:
        a = scheduler.alphas_cumprod[int(t)].to(device=x.device, dtype=torch.float32)
        x0 = a.sqrt() * x - (1 - a).sqrt() * out if rule == "v_prediction" else (x - (1 - a).sqrt() * out) / a.sqrt()
    config = scheduler.config
    if getattr(config, "thresholding", False) and hasattr(scheduler, "_threshold_sample"):
        return scheduler._threshold_sample(x0)
    if getattr(config, "clip_sample", False):
        bound = float(getattr(config, "clip_sample_range", 1.0))
        return x0.clamp(-bound, bound)
    return x0


def own_x0(result: Any, sample: Any) -> Any:
    """The x̂0 a scheduler's `step` returned with its next latent (DDIM, DDPM, CogVideoX DDIM/DPM, Euler: the
    `pred_original_sample` it stepped with, clipped or thresholded when it does so), or None when it returns none
    (flow-matching Euler, UniPC, DPM-Solver). With `return_dict=False` diffusers returns (prev_sample,
    pred_original_sample) in that order."""
    import torch

    own = getattr(result, "pred_original_sample", None)
    if own is None and isinstance(result, tuple) and len(result) >= 2:
        own = result[1]
    if isinstance(own, torch.Tensor) and own.shape == sample.shape:
        return own.to(torch.float32)
    return None


def conditioning_of(pipe: Any, prepared: Any) -> tuple[Any, Any] | None:
    """(condition, mask) when the pipeline overwrites latent frames with its conditioning: Wan2.2 TI2V-5B image-to-video
    (`expand_timesteps`) returns them from `prepare_latents` and feeds the model `(1 - mask) * condition + mask *
    latents`, and returns that blend as its output. None for every other pipeline (channel-concatenated conditions,
    as in Wan 2.1 I2V or the organism, leave the latent frames alone)."""
    if getattr(getattr(pipe, "config", None), "expand_timesteps", False) and isinstance(prepared, tuple) \
            and len(prepared) == 3:
        return prepared[1], prepared[2]
    return None


def blend(conditioning: tuple[Any, Any] | None, latents: Any) -> Any:
    """The latent the model sees (and the pipeline returns): `latents` with the conditioning frames written in, by the
    pipeline's own expression, so the values are the same bits."""
    if conditioning is None:
        return latents
    condition, mask = conditioning
    return (1 - mask) * condition + mask * latents


def conditioning_frames(conditioning: tuple[Any, Any] | None) -> list[int]:
    """Latent frames that hold the conditioning (mask 0 everywhere in the frame): [0] for TI2V image-to-video."""
    if conditioning is None:
        return []
    mask = conditioning[1]  # (1, 1, F, H, W): 0 where the condition is written
    return [f for f in range(mask.shape[2]) if not bool(mask[:, :, f].any())]


def decoder(family: Family, pipe: Any) -> Callable[[Any], Any]:
    """A function (B, C, F, H, W) latents -> (B, F, H, W, 3) uint8 frames, via the pipeline's own VAE.

    Mirrors each pipeline's own decode path. The organism works in pixel space: frames are the latents.
    """
    import torch

    vae = getattr(pipe, "vae", None)

    def to_uint8(video: torch.Tensor) -> torch.Tensor:  # (B, 3, F, H, W) in [-1, 1]
        return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)

    if vae is None:
        return lambda latents: to_uint8(latents)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.device, vae.dtype)
        if family.name == "wan":
            cfg = vae.config
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z)
            return to_uint8(vae.decode(z * std + mean, return_dict=False)[0])
        if family.name == "cogvideox":
            return to_uint8(vae.decode(z / pipe.vae_scaling_factor_image).sample)
        if family.name == "hunyuan":
            return to_uint8(vae.decode(z / vae.config.scaling_factor, return_dict=False)[0])
        z = pipe._denormalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        timestep = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype) if vae.config.timestep_conditioning \
            else None
        return to_uint8(vae.decode(z, timestep, return_dict=False)[0])

    return decode
