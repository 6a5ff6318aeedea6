"""`cos capture`: the command-line front of capture — flags, ranks and devices, progress bar.

Owns the flags and turning them into library values: a `SourceConfig` (the shipped organism by default,
`tiny:<family>`, `random:wan2.1-1.3b`, or any diffusers folder / hub id), a `CaptureSpec`, the torchrun ranks and
context parallelism, and `--ensemble` (a `MergeSpec` wrapped around the source). Prints; the library only logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..archive.schema import BRANCHES, STEP_TENSORS
from ..capture.reductions import HELP as REDUCTION_HELP
from .common import add_device, add_dtype, add_runs_dir, command, default_device, seeds, split


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to run")
    src.add_argument("--model", default="organism",
                     help="'organism' (the shipped small model, default), 'tiny:<family>' (tiny random diffusers "
                          "pipeline: wan_t2v, wan_i2v, wan22, cogvideox, ltx, hunyuan), 'random:wan2.1-1.3b' "
                          "(Wan2.1-1.3B architecture, random weights, 480x832x33: for benchmarks), or a local "
                          "diffusers folder / hub id loaded with DiffusionPipeline.from_pretrained")
    src.add_argument("--task", default="maze", help="organism task, one it was trained on (trained_tasks in "
                     "models/organism/model_index.json: maze, arrows, fork, recall, dispatch); ignored for other "
                     "models")
    src.add_argument("--instances", type=int, default=4, help="number of task instances (test seeds), default 4")
    src.add_argument("--first-instance", type=int, default=0, help="offset into the task's held-out seeds")
    src.add_argument("--seeds", default="0", help="noise seeds per instance: comma list and/or ranges "
                     "'a:b' (b excluded), default '0'")
    src.add_argument("--noise", default="shared", choices=["shared", "per-instance"],
                     help="organism: 'shared' (default, as diffusers: seed k draws the same initial noise for every "
                          "instance) or 'per-instance' (each instance x seed draws its own, recorded as the sample's "
                          "seed; use it when statistics over instances should also sample the noise)")
    src.add_argument("--vbvr", type=Path, help="VBVR-Bench style folder (first_frame.png, prompt.txt, "
                                                  "ground_truth.mp4 per sample) as input source")
    src.add_argument("--ensemble", metavar="METHOD:K:N", default=None,
                     help="organism only: run each work item as a latent ensemble of N seeds (seed, seed+1, ...) "
                          "merged during the first K steps by METHOD (mean_x_t, mean_v_hat, mean_x0_hat), and "
                          "capture member 0, e.g. mean_x0_hat:4:4. Compare it with the plain run of the same seeds")
    src.add_argument("--prompt", action="append", help="text prompt (repeatable) for models with a text encoder")
    src.add_argument("--negative-prompt", help="negative prompt for CFG (diffusers models with a text encoder)")
    src.add_argument("--image", type=Path, help="input image for every item of an image-to-video model (e.g. "
                     "Wan I2V, Wan2.2 TI2V-5B), without a VBVR folder")
    gen = p.add_argument_group("generation")
    gen.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance-scale", type=float, help="CFG scale (default: the model's)")
    gen.add_argument("--guidance-scale-2", type=float, help="CFG scale of Wan 2.2's low-noise expert "
                     "(transformer_2; default: --guidance-scale)")
    gen.add_argument("--true-cfg-scale", type=float, help="HunyuanVideo's real CFG scale (a second, negative-prompt "
                     "call; --guidance-scale there is the distilled guidance embedding)")
    gen.add_argument("--max-sequence-length", type=int, help="text tokens the prompt is padded/cut to (Wan: 512)")
    gen.add_argument("--batch-size", default="auto", help="work items per pipeline call, each with its own seed and "
                     "shard: an integer, or 'auto' (default: 1 on a CPU; on a GPU one item is measured and batches "
                     "fill 60%% of the free memory). A pipeline that cannot batch runs one item per call and says why")
    gen.add_argument("--batch-forward", default="auto", choices=["auto", "per_item", "joint"],
                     help="inside a batched call: per_item runs each item's transformer rows on their own (archive "
                          "bit-identical to --batch-size 1), joint one forward for all (fastest; items agree to the "
                          "kernels' rounding); auto: per_item on a CPU, joint on a GPU")
    gen.add_argument("--height", type=int, help="video height in pixels (hub models)")
    gen.add_argument("--width", type=int, help="video width in pixels (hub models)")
    gen.add_argument("--num-frames", type=int, help="video frames (hub models)")
    add_device(gen)
    gen.add_argument("--cpu-offload", action="store_true",
                     help="diffusers model CPU offload (large models on one GPU); capture is unchanged")
    gen.add_argument("--device-map", default=None, help="diffusers device_map for from_pretrained, e.g. "
                     "'balanced' to spread a large pipeline over the visible GPUs (local/hub models only)")
    gen.add_argument("--ulysses-degree", type=int, default=1,
                     help="context parallelism under torchrun: split each video's tokens over this many ranks with "
                          "Ulysses attention (diffusers' ContextParallelConfig; heads must divide by it)")
    gen.add_argument("--ring-degree", type=int, default=1,
                     help="context parallelism with ring attention over this many ranks (needs an attention backend "
                          "that returns log-sum-exp, e.g. --attention-backend _native_cudnn or flash on GPUs)")
    gen.add_argument("--attention-backend", default=None,
                     help="diffusers attention backend for the transformer(s), e.g. native, _native_cudnn, flash")
    add_dtype(gen, help="model dtype (default float32; bfloat16 for large models on GPU)")
    sel = p.add_argument_group("what to record")
    sel.add_argument("--layers", default="all", help="blocks to hook: 'all', 'a:b[:c]' or '0,5,9'")
    sel.add_argument("--steps", default="all", help="steps whose activations are kept: 'all', 'a:b[:c]', '0,5'")
    sel.add_argument("--branches", default=",".join(BRANCHES), help="CFG branches to keep: cond,uncond")
    sel.add_argument("--reductions", default="frame_mean,token_norm", help=f"comma list of: {REDUCTION_HELP}")
    sel.add_argument("--tokens", default="", help="full tokens for (layer:step) pairs, e.g. '10:5,20:5'")
    sel.add_argument("--tensors", default=",".join(STEP_TENSORS), help="per-step tensors: x_t,v_hat,x0_hat")
    sel.add_argument("--tensor-steps", default="all", help="steps whose x_t/v_hat/x0_hat are kept")
    sel.add_argument("--decode", action="store_true", help="decode x0_hat through the VAE into uint8 frames")
    sel.add_argument("--decode-steps", default="all", help="steps to decode (subset of --tensor-steps)")
    sel.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                     help="dtype of stored reductions and x_t/v_hat/x0_hat (float16 halves the archive)")
    sel.add_argument("--proj-seed", type=int, default=0, help="seed of the proj<d'> random projection")
    out = p.add_argument_group("output")
    add_runs_dir(out)
    out.add_argument("--run-id", help="run directory name (default derived from model and task); an unfinished "
                                      "run with the same id and configuration is resumed")


def _spec(args: argparse.Namespace):
    from ..capture import CaptureSpec

    tokens = []
    for pair in split(args.tokens):
        try:
            layer, step = (int(v) for v in pair.split(":"))
        except ValueError:
            raise ValueError(f"--tokens entry {pair!r} must be 'layer:step', e.g. '10:5'") from None
        tokens.append((layer, step))
    return CaptureSpec(layers=args.layers, steps=args.steps, branches=split(args.branches),
                       reductions=split(args.reductions), tokens=tuple(tokens), tensors=split(args.tensors),
                       tensor_steps=args.tensor_steps, proj_seed=args.proj_seed,
                       store_dtype=args.store_dtype)


def _source_config(args: argparse.Namespace, members: int | None):
    from ..capture.sources import SourceConfig

    return SourceConfig(model=args.model, task=args.task, instances=args.instances, first_instance=args.first_instance,
                        prompts=tuple(args.prompt or ()), vbvr=args.vbvr, num_inference_steps=args.num_inference_steps,
                        guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                        num_frames=args.num_frames, cpu_offload=args.cpu_offload, device_map=args.device_map,
                        members=members, negative_prompt=args.negative_prompt,
                        max_sequence_length=args.max_sequence_length, true_cfg_scale=args.true_cfg_scale,
                        guidance_scale_2=args.guidance_scale_2, image=args.image,
                        noise=args.noise.replace("-", "_"))


def _batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--batch-size {text!r} must be a positive integer or 'auto'")
    return value


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..capture.context_parallel import ContextParallel
    from ..capture.context_parallel import enable as enable_context_parallel
    from ..capture.distributed import from_env
    from ..capture.families import experts
    from ..capture.run import capture_run
    from ..capture.sources import load_source
    from ..experiments.merge import MergeSpec, merged_capture

    cp = ContextParallel(ring=args.ring_degree, ulysses=args.ulysses_degree)
    cp.check_world(int(os.environ.get("WORLD_SIZE", "1")))
    if cp.enabled and (args.cpu_offload or args.device_map):
        raise ValueError("context parallelism (--ring-degree/--ulysses-degree) places the whole model on each rank's "
                         "device: drop --cpu-offload/--device-map")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # under torchrun rank r of a node uses GPU r; an explicit --device (e.g. cuda:0) lets ranks share one GPU
    device = default_device(args.device, local_rank)
    cuda = torch.device(device).type == "cuda"
    if cuda and cp.enabled:
        if args.device is not None:
            raise ValueError(f"--device {args.device} with context parallelism on GPUs: NCCL needs one GPU per rank, "
                             "so each rank uses cuda:LOCAL_RANK; leave --device out")
        torch.cuda.set_device(torch.device(device))  # NCCL binds each rank's communicator to its current device
    # one process, or this rank of a torchrun / accelerate launch job
    ranks = from_env(cp.size, cuda=cuda)
    spec = _spec(args)
    batch_size = _batch_size(args.batch_size)
    merge = MergeSpec.parse(args.ensemble) if args.ensemble is not None else None
    config = _source_config(args, members=merge.n if merge is not None else None)
    source = load_source(config, device=device, dtype=getattr(torch, args.dtype), seeds=seeds(args.seeds))
    if merge is not None:
        source = merged_capture(source, merge)
    if cp.enabled:
        enable_context_parallel(source.pipe, cp, ranks.world, attention_backend=args.attention_backend)
    elif args.attention_backend:
        for _, module in experts(source.pipe):
            module.set_attention_backend(args.attention_backend)
    run_id = args.run_id or source.default_run_id
    runs_dir = args.runs_dir
    if ranks.is_main:
        groups = f" in groups of {cp.size} (context parallel)" if cp.enabled else ""
        print(f"capturing {len(source.items)} samples of {source.label} into {runs_dir / run_id}"
              + (f" with {ranks.world} ranks{groups}" if ranks.world > 1 else ""), file=sys.stderr)
    with source.around():
        path = capture_run(source.pipe, source.items, spec, runs_dir=runs_dir, run_id=run_id,
                           call_kwargs=source.call_kwargs, source=source.label, decode=args.decode,
                           decode_steps=args.decode_steps, score=source.score,
                           command=command(args, "capture"),
                           extra=source.extra, ranks=ranks, members=source.members, batch_size=batch_size,
                           batch_forward=args.batch_forward,
                           progress=lambda it: tqdm(it, desc=f"rank {ranks.rank} samples" if ranks.world > 1
                                                    else "samples", unit="sample", position=ranks.rank,
                                                    disable=not ranks.writes))
    if ranks.is_main:
        print(json.dumps({"run": str(path)}))
    return 0

