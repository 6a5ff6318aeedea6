"""Capture overhead on a real-size Wan2.1-1.3B transformer (random weights, bf16) on one GPU.

Compares, in one process and on the same inputs, plain denoising against (a) capture of frame_mean + token_norm
for all 30 layers x all steps x both CFG branches (+ x_t/v_hat/x0_hat every step) and (b) additionally full tokens
of 3 layers at every step. Also measures the plain device-to-host copy bandwidth into pinned memory, so (b) can be
stated as a fraction of it. Writes bench/results/capture_overhead.json (or --out). Run on a GPU:

    python bench/capture_overhead.py --height 480 --width 832 --frames 33 --steps 20 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.capture import Capturer, CaptureSpec  # noqa: E402
from cos_core.capture.tiny_pipelines import wan_1_3b_transformer  # noqa: E402


def d2h_bandwidth(nbytes: int = 2 * 2**30, reps: int = 5) -> float:
    """GB/s of one large device -> pinned host copy (the ceiling capture copies are measured against)."""
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


def build(args):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    transformer = wan_1_3b_transformer(torch.bfloat16, device="cuda")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cuda").manual_seed(0)
    embeds = torch.randn(2, 512, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
    call = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], height=args.height, width=args.width,
                num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent")
    return pipe, call


def timed(pipe, call, capturer=None) -> tuple[float, torch.Tensor]:
    gen = torch.Generator("cuda").manual_seed(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if capturer is None:
        out = pipe(**call, generator=gen)[0]
    else:
        capturer.begin_sample()
        out = pipe(**call, generator=gen, callback_on_step_end=capturer.callback(),
                   callback_on_step_end_tensor_inputs=["latents"])[0]
        capturer.end_sample(copy=False)  # as capture_run does; includes waiting for every host copy
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--token-layers", default="5,15,25")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture_overhead.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    pipe, call = build(args)
    layers = [int(x) for x in args.token_layers.split(",")]
    specs = {
        "reductions": CaptureSpec(reductions=("frame_mean", "token_norm")),
        "reductions+tokens3": CaptureSpec(reductions=("frame_mean", "token_norm"),
                                          tokens=tuple((l, s) for l in layers for s in range(args.steps))),
    }
    timed(pipe, call)  # warm-up: kernels, allocator
    results = {"plain": []}
    outs = {}
    capturers = {name: Capturer(pipe, spec, n_steps=args.steps) for name, spec in specs.items()}
    for name, cap in capturers.items():
        with cap:
            timed(pipe, call, cap)  # warm-up with hooks (pinned buffers are allocated per sample)
        results[name] = []
    for _ in range(args.reps):  # interleave the variants so drift affects all alike
        t, outs["plain"] = timed(pipe, call)
        results["plain"].append(t)
        for name, cap in capturers.items():
            with cap:
                t, outs[name] = timed(pipe, call, cap)
            results[name].append(t)
    base = statistics.median(results["plain"])
    bw = d2h_bandwidth()
    f, h, w = (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16
    token_bytes = f * h * w * 1536 * 2 * len(layers) * args.steps * 2  # bf16, both branches
    extra = statistics.median(results["reductions+tokens3"]) - base
    summary = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": vars(args) | {"out": None},
        "tokens_per_frame_grid": [f, h, w], "seconds": results, "median_plain_s": base,
        "overhead_reductions": statistics.median(results["reductions"]) / base - 1,
        "overhead_reductions_tokens3": statistics.median(results["reductions+tokens3"]) / base - 1,
        "d2h_bandwidth_GBps": bw, "token_bytes": token_bytes,
        "token_copy_effective_GBps": token_bytes / max(extra, 1e-9) / 1e9,
        "token_copy_fraction_of_d2h": token_bytes / max(extra, 1e-9) / 1e9 / bw,
        "outputs_identical": {k: bool(torch.equal(v, outs["plain"])) for k, v in outs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "seconds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
