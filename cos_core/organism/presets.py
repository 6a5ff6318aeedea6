"""Named sizes of the organism: `WanTransformer3DModel` configs, the registry that is also `cos train --preset`.

Owns the architecture numbers and the fixed pixel-space interface (7 input channels: x_t, first-frame mask,
first-frame video; 3 output channels) and the deterministic task-prompt embedding layout. Plain Python only: it
must not import torch or diffusers, so the CLI can list presets cheaply.
"""

from __future__ import annotations

# Pixel-space I2V interface, Wan 2.1 I2V style: cat([x_t (3), mask (1, ones at frame 0), first frame video (3)]).
IN_CHANNELS = 7
OUT_CHANNELS = 3
TEXT_DIM = 16        # one-hot task prompt: token 0 = one-hot(task_id), token 1 = a constant "bos" one-hot(TEXT_DIM-1)
PROMPT_LEN = 2
BOS_INDEX = TEXT_DIM - 1

_COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=IN_CHANNELS,
    out_channels=OUT_CHANNELS,
    text_dim=TEXT_DIM,
    freq_dim=64,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

# name -> WanTransformer3DModel keyword arguments (heads × head_dim = width).
PRESETS: dict[str, dict] = {
    # unit tests only: builds and runs in milliseconds on a CPU
    "tiny": dict(_COMMON, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2),
    # the shipped organism: 8 Wan blocks of width 192 (≈ 5 M parameters); ≈ 0.25 s per forward on 2 CPU cores
    "small": dict(_COMMON, num_attention_heads=3, attention_head_dim=64, ffn_dim=768, num_layers=8),
    # shallower organisms of the same width: fewer blocks per forward pass, so long chains need denoising steps
    "small-l2": dict(_COMMON, num_attention_heads=3, attention_head_dim=64, ffn_dim=768, num_layers=2),
    "small-l4": dict(_COMMON, num_attention_heads=3, attention_head_dim=64, ffn_dim=768, num_layers=4),
    "small-l6": dict(_COMMON, num_attention_heads=3, attention_head_dim=64, ffn_dim=768, num_layers=6),
    # the feasibility size (width 256 × 8 blocks, ≈ 9 M parameters); too slow for the 5 s CPU bar at 16 steps
    "base": dict(_COMMON, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=8),
}


def transformer_config(preset: str) -> dict:
    """The `WanTransformer3DModel` kwargs of a named preset (a fresh copy)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[preset])
