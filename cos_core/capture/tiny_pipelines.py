"""Tiny, seeded configurations of the real diffusers video pipelines, for tests, and the real-size Wan2.1-1.3B
transformer (random weights) for GPU benchmarks. Owns model construction only: each entry of `_BUILDERS` is the
genuine pipeline class built in code with fixed seeds, text encoders bypassed by `prompt_embeds`, a tiny real VAE and
`output_type="latent"`; sizes follow diffusers' `get_dummy_components`, pixel sizes non-square (row/col mix-ups show).
Must not import the rest of capture, archive, analysis or streamlit; nothing here reaches a model hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Callable

import numpy as np
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

try:  # transformers >= 5: the torchvision-free processor has its own name (the old one warns without torchvision)
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

# Pixel geometry shared by all families (LTX needs multiples of 32): 9 frames of 32x64 -> 3 latent frames; with an 8x
# VAE and 2x2 patches that is a (3, 2, 4) token grid, distinct per axis so a transposed (frame, row, col) map fails.
HEIGHT, WIDTH, NUM_FRAMES = 32, 64, 9
TEXT_LEN = 8  # prompt-embedding tokens
WAN_FLOW_SHIFT = 5.0  # the paper's shift; Wan's own 1.3B config ships 3.0
WAN22_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B: high-noise expert while t >= 875
WAN22_I2V_BOUNDARY_RATIO = 0.9  # Wan2.2-I2V-A14B (the paper's VBVR-Wan2.2 base): switch at t = 900

# Wan2.1-T2V-1.3B transformer, as in its diffusers config.json.
WAN_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


@dataclass(frozen=True)
class TinyCase:
    """A ready pipeline plus the keyword arguments for one call (add generator/latents/callbacks yourself).

    `latent_shape` is the shape of the output with `output_type="latent"` and of `latents` inside the loop. Its
    layout is `latent_layout`: "BCFHW" (Wan, Hunyuan), "BFCHW" (CogVideoX) or "BTC" (LTX: packed tokens; unpack
    with `latent_grid` and `patch_size`). `latent_grid` is (frames, height, width) in latent units before patching;
    `patch_size` is the transformer's (t, h, w) patch, so the token grid is `latent_grid // patch_size`.
    `cfg_kwarg` names the call argument that sets CFG strength (None when the case was built with cfg=False).
    """

    family: str
    pipe: DiffusionPipeline
    call_kwargs: dict
    latent_shape: tuple[int, ...]
    latent_layout: str
    latent_grid: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    cfg_kwarg: str | None

    def __post_init__(self):
        if self.latent_layout not in ("BCFHW", "BFCHW", "BTC"):
            raise ValueError(f"latent_layout={self.latent_layout!r}; allowed: 'BCFHW', 'BFCHW', 'BTC'")
        bad = [g for g, p in zip(self.latent_grid, self.patch_size) if g % p]
        if bad:
            raise ValueError(f"latent_grid={self.latent_grid} is not divisible by patch_size={self.patch_size}")

    @property
    def n_steps(self) -> int:
        return self.call_kwargs["num_inference_steps"]

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(frame, row, col) sizes of the transformer's video tokens, frame-major after patchify."""
        return tuple(g // p for g, p in zip(self.latent_grid, self.patch_size))


# ---------------------------------------------------------------------------------------------------- helpers


def _embeds(seed: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)  # (batch, token, d) or (batch, d)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast like `from_pretrained(torch_dtype=dtype)`: modules named in `_keep_in_fp32_modules` stay float32."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _cast(component, dtype)
    pipe.set_progress_bar_config(disable=True)  # the library logs; progress bars belong to the CLI
    return pipe


def _wan_scheduler(scheduler: str):
    if scheduler == "unipc":  # what the Wan diffusers checkpoints ship
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=WAN_FLOW_SHIFT)
    return FlowMatchEulerDiscreteScheduler(shift=WAN_FLOW_SHIFT)


def _wan_vae(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _wan_transformer(seed: int, in_channels: int = 16, image_dim: int | None = None) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=image_dim,
    )


def _wan_text_kwargs(seed: int, cfg: bool, dtype: torch.dtype, n_steps: int) -> dict:
    kwargs = dict(prompt_embeds=_embeds(seed + 100, 1, TEXT_LEN, 32, dtype=dtype), guidance_scale=5.0 if cfg else 1.0,
                  height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, num_inference_steps=n_steps,
                  output_type="latent")
    if cfg:
        kwargs["negative_prompt_embeds"] = _embeds(seed + 101, 1, TEXT_LEN, 32, dtype=dtype)
    return kwargs


def _first_frame(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _wan_case(family, pipe, kwargs, cfg, dtype) -> TinyCase:
    grid = ((NUM_FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    return TinyCase(family=family, pipe=_finish(pipe, dtype), call_kwargs=kwargs, latent_shape=(1, 16, *grid),
                    latent_layout="BCFHW", latent_grid=grid, patch_size=(1, 2, 2),
                    cfg_kwarg="guidance_scale" if cfg else None)


# ---------------------------------------------------------------------------------------------------- families


def _build_wan_t2v(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(seed), scheduler=_wan_scheduler(scheduler),
                       transformer=_wan_transformer(seed + 1))
    return _wan_case("wan_t2v", pipe, _wan_text_kwargs(seed, cfg, dtype, n_steps=4), cfg, dtype)


def _build_wan22(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """Two experts: `transformer` (high noise, t >= boundary_ratio * 1000) then `transformer_2` (low noise)."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(seed), scheduler=_wan_scheduler(scheduler),
                       transformer=_wan_transformer(seed + 1), transformer_2=_wan_transformer(seed + 2),
                       boundary_ratio=WAN22_BOUNDARY_RATIO)
    return _wan_case("wan22", pipe, _wan_text_kwargs(seed, cfg, dtype, n_steps=6), cfg, dtype)


def _build_wan_i2v(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """Wan 2.1 I2V: 36 input channels (16 noise + 4 first-frame mask + 16 VAE-encoded image) and CLIP image tokens.

    diffusers 0.42.1 refuses `image` together with `image_embeds`, yet needs `image` for the VAE condition, so the
    CLIP image encoder cannot be bypassed: a tiny one is built in code (17 tokens of width 4).
    """
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, intermediate_size=16,
                                                     patch_size=8))
    image_processor = _CLIPImageProcessor(crop_size=32, size=32)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(seed),
                                   scheduler=_wan_scheduler(scheduler), image_processor=image_processor,
                                   image_encoder=image_encoder,
                                   transformer=_wan_transformer(seed + 1, in_channels=36, image_dim=4))
    kwargs = dict(image=_first_frame(seed), **_wan_text_kwargs(seed, cfg, dtype, n_steps=4))
    return _wan_case("wan_i2v", pipe, kwargs, cfg, dtype)


def _build_wan22_i2v(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """Wan 2.2 I2V two-expert (the paper's architecture): 36 input channels, no CLIP image tokens, boundary 0.9."""
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(seed),
                                   scheduler=_wan_scheduler(scheduler),
                                   transformer=_wan_transformer(seed + 1, in_channels=36),
                                   transformer_2=_wan_transformer(seed + 2, in_channels=36),
                                   boundary_ratio=WAN22_I2V_BOUNDARY_RATIO)
    kwargs = dict(image=_first_frame(seed), **_wan_text_kwargs(seed, cfg, dtype, n_steps=6))
    return _wan_case("wan22_i2v", pipe, kwargs, cfg, dtype)


# Wan2.2 TI2V-5B: a 48-channel VAE that also patchifies 2x2 (16x spatial in all), one transformer, `expand_timesteps`
# (per-token timesteps; image-to-video writes the image latent into latent frame 0 for the model and the output).
TI2V_HEIGHT, TI2V_WIDTH = 64, 96  # latent (3, 4, 6) -> token grid (3, 2, 3)


def _wan_5b_vae(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                            temperal_downsample=[False, True, True])


def _wan_5b_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _wan_5b_case(family: str, pipe, kwargs: dict, cfg: bool, dtype: torch.dtype) -> TinyCase:
    grid = ((NUM_FRAMES - 1) // 4 + 1, TI2V_HEIGHT // 16, TI2V_WIDTH // 16)
    kwargs.update(height=TI2V_HEIGHT, width=TI2V_WIDTH)
    return TinyCase(family=family, pipe=_finish(pipe, dtype), call_kwargs=kwargs, latent_shape=(1, 48, *grid),
                    latent_layout="BCFHW", latent_grid=grid, patch_size=(1, 2, 2),
                    cfg_kwarg="guidance_scale" if cfg else None)


def _build_wan22_ti2v_t2v(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """Wan2.2 TI2V-5B text-to-video: `WanPipeline` with `expand_timesteps=True` (diffusers' Wan 2.2 5B tests)."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_wan_5b_vae(seed), scheduler=_wan_scheduler(scheduler),
                       transformer=_wan_5b_transformer(seed + 1), expand_timesteps=True)
    return _wan_5b_case("wan22_ti2v_t2v", pipe, _wan_text_kwargs(seed, cfg, dtype, n_steps=4), cfg, dtype)


def _build_wan22_ti2v(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """Wan2.2 TI2V-5B image-to-video: `WanImageToVideoPipeline` with `expand_timesteps=True`, no image encoder; the
    pipeline feeds the model latent frame 0 = the image latent and returns it there."""
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_wan_5b_vae(seed),
                                   scheduler=_wan_scheduler(scheduler), transformer=_wan_5b_transformer(seed + 1),
                                   expand_timesteps=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(TI2V_HEIGHT, TI2V_WIDTH, 3), dtype=np.uint8)
    kwargs = dict(image=Image.fromarray(pixels), **_wan_text_kwargs(seed, cfg, dtype, n_steps=4))
    return _wan_5b_case("wan22_ti2v", pipe, kwargs, cfg, dtype)


def _build_cogvideox(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """CogVideoX-2b layout: latents (B, F, C, H, W), v-prediction DDIM (or DPM) with zero-terminal-SNR betas."""
    grid = ((NUM_FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    torch.manual_seed(seed + 1)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=grid[2], sample_height=grid[1], sample_frames=NUM_FRAMES,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    # THUDM/CogVideoX-2b scheduler_config.json (the 5b differs only in snr_shift_scale=1.0)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=True,
                  steps_offset=0, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing")
    if scheduler == "ddim_clip":  # diffusers' plain DDIM with clip_sample: it steps with the clipped x̂0
        sched = DDIMScheduler(clip_sample=True, clip_sample_range=1.0, **common)
    else:
        scheduler_cls = CogVideoXDPMScheduler if scheduler == "dpm" else CogVideoXDDIMScheduler
        sched = scheduler_cls(clip_sample=False, snr_shift_scale=3.0, **common)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=sched)
    kwargs = dict(prompt_embeds=_embeds(seed + 100, 1, TEXT_LEN, 32, dtype=dtype), guidance_scale=6.0 if cfg else 1.0,
                  height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, num_inference_steps=4, output_type="latent")
    if cfg:
        kwargs["negative_prompt_embeds"] = _embeds(seed + 101, 1, TEXT_LEN, 32, dtype=dtype)
    return TinyCase(family="cogvideox", pipe=_finish(pipe, dtype), call_kwargs=kwargs,
                    latent_shape=(1, grid[0], 4, grid[1], grid[2]), latent_layout="BFCHW", latent_grid=grid,
                    patch_size=(1, 2, 2), cfg_kwarg="guidance_scale" if cfg else None)


def _build_ltx(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """LTX-Video: latents stay packed as (B, tokens, C) through the loop; the tiny VAE compresses 4x in space/time."""
    torch.manual_seed(seed + 1)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=2, caption_channels=32)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    # Lightricks/LTX-Video scheduler_config.json: resolution-dependent shift, stretched to a terminal sigma of 0.1
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    s, st = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    grid = ((NUM_FRAMES - 1) // st + 1, HEIGHT // s, WIDTH // s)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long)
    kwargs = dict(prompt_embeds=_embeds(seed + 100, 1, TEXT_LEN, 32, dtype=dtype), prompt_attention_mask=mask,
                  guidance_scale=3.0 if cfg else 1.0, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
                  num_inference_steps=4, output_type="latent")
    if cfg:
        kwargs.update(negative_prompt_embeds=_embeds(seed + 101, 1, TEXT_LEN, 32, dtype=dtype),
                      negative_prompt_attention_mask=mask.clone())
    return TinyCase(family="ltx", pipe=_finish(pipe, dtype), call_kwargs=kwargs,
                    latent_shape=(1, grid[0] * grid[1] * grid[2], 8), latent_layout="BTC", latent_grid=grid,
                    patch_size=(1, 1, 1), cfg_kwarg="guidance_scale" if cfg else None)


def _build_hunyuan(*, cfg: bool, dtype: torch.dtype, seed: int, scheduler: str) -> TinyCase:
    """HunyuanVideo: `guidance_scale` is the distilled (embedded) guidance; real CFG is `true_cfg_scale` with
    negative prompt, pooled and mask embeddings, run as a second transformer call."""
    torch.manual_seed(seed + 1)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    sched = FlowMatchEulerDiscreteScheduler(shift=7.0)  # hunyuanvideo-community/HunyuanVideo
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=sched,
                                text_encoder_2=None, tokenizer_2=None)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long)
    kwargs = dict(prompt_embeds=_embeds(seed + 100, 1, TEXT_LEN, 16, dtype=dtype),
                  pooled_prompt_embeds=_embeds(seed + 102, 1, 8, dtype=dtype), prompt_attention_mask=mask,
                  guidance_scale=6.0, true_cfg_scale=4.0 if cfg else 1.0, height=HEIGHT, width=WIDTH,
                  num_frames=NUM_FRAMES, num_inference_steps=4, output_type="latent")
    if cfg:
        kwargs.update(negative_prompt_embeds=_embeds(seed + 101, 1, TEXT_LEN, 16, dtype=dtype),
                      negative_pooled_prompt_embeds=_embeds(seed + 103, 1, 8, dtype=dtype),
                      negative_prompt_attention_mask=mask.clone())
    grid = ((NUM_FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    return TinyCase(family="hunyuan", pipe=_finish(pipe, dtype), call_kwargs=kwargs, latent_shape=(1, 4, *grid),
                    latent_layout="BCFHW", latent_grid=grid, patch_size=(1, 2, 2),
                    cfg_kwarg="true_cfg_scale" if cfg else None)


_BUILDERS: dict[str, Callable[..., TinyCase]] = {
    "wan_t2v": _build_wan_t2v,
    "wan_i2v": _build_wan_i2v,
    "wan22": _build_wan22,
    "wan22_i2v": _build_wan22_i2v,
    "wan22_ti2v_t2v": _build_wan22_ti2v_t2v,
    "wan22_ti2v": _build_wan22_ti2v,
    "cogvideox": _build_cogvideox,
    "ltx": _build_ltx,
    "hunyuan": _build_hunyuan,
}

# Allowed `scheduler=` per family; the first is the default (the one the real checkpoint ships).
SCHEDULERS: dict[str, tuple[str, ...]] = {
    "wan_t2v": ("unipc", "euler"),
    "wan_i2v": ("unipc", "euler"),
    "wan22": ("unipc", "euler"),
    "wan22_i2v": ("unipc", "euler"),
    "wan22_ti2v_t2v": ("unipc", "euler"),
    "wan22_ti2v": ("unipc", "euler"),
    "cogvideox": ("ddim", "dpm", "ddim_clip"),
    "ltx": ("euler",),
    "hunyuan": ("euler",),
}


def build_tiny(name: str, *, cfg: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
               scheduler: str | None = None) -> TinyCase:
    """Build the tiny pipeline `name`; the same (name, cfg, dtype, seed, scheduler) always gives the same weights."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {name!r}; allowed: {sorted(_BUILDERS)}")
    allowed = SCHEDULERS[name]
    scheduler = allowed[0] if scheduler is None else scheduler
    if scheduler not in allowed:
        raise ValueError(f"scheduler={scheduler!r} is not available for {name!r}; allowed: {list(allowed)}")
    with torch.random.fork_rng(devices=[]):  # builders seed the global CPU generator; leave the caller's untouched
        return _BUILDERS[name](cfg=cfg, dtype=dtype, seed=seed, scheduler=scheduler)


# The registry (also the CLI's `tiny:<name>` choices): TINY_FAMILIES[name](**options) == build_tiny(name, **options).
TINY_FAMILIES: dict[str, Callable[..., TinyCase]] = {name: partial(build_tiny, name) for name in _BUILDERS}


def wan_1_3b_transformer(dtype: torch.dtype = torch.bfloat16, *, device: str | torch.device = "cpu",
                         seed: int = 0) -> WanTransformer3DModel:
    """Wan2.1-T2V-1.3B architecture with random weights (no download), for GPU benchmarks.

    Built directly on `device` (use "cuda": initialising 1.4 B parameters on a CPU takes a while; "meta" builds
    the structure without memory).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**WAN_1_3B_CONFIG)
    return _cast(model, dtype).eval()
