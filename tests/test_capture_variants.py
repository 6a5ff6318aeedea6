"""Capture on the pipeline variants a researcher builds: Wan2.2 TI2V-5B's conditioning frame, a user callback that edits
the latents, a clipping scheduler, a diffusers block cache, a subclassed pipeline, a compiled transformer, and the
float32 projection. Each is checked against something outside capture: the pipeline's returned latent, the
transformer's own input, the scheduler's own step, hooks we install ourselves.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cos_core.archive import Archive
from cos_core.archive.schema import act_key, skip_key
from cos_core.capture import SITE, Capturer, CaptureSpec, capture_pipeline
from cos_core.capture.reductions import Reducer


def generate(case, seed: int = 0, **overrides):
    kwargs = {**case.call_kwargs, **overrides}
    return case.pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).frames


def run(case, spec=CaptureSpec(), seed: int = 0, **overrides):
    with Capturer(case.pipe, spec) as cap:
        return cap.run(**{**case.call_kwargs, **overrides}, generator=torch.Generator("cpu").manual_seed(seed))


# ---- Wan2.2 TI2V-5B: final is the returned latent; the conditioning frame is what the model saw ----------------------


@pytest.mark.parametrize("name, frames", [("wan22_ti2v", [0]), ("wan22_ti2v_t2v", [])])
def test_ti2v_records_what_the_model_saw_and_names_the_conditioning_frames(tiny, name, frames):
    case = tiny(name)
    seen = []
    handle = case.pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        captured = run(case)
    finally:
        handle.remove()
    t, layout = captured.tensors, captured.layout
    assert layout["conditioning_frames"] == frames
    assert np.array_equal(t["final"], captured.output.frames[0].numpy()), "final is not the returned latent"
    n = case.n_steps
    calls = len(seen) // n  # cond and uncond calls see the same latent
    for s in range(n):
        assert np.array_equal(t["x_t"][s], seen[s * calls][0].numpy()), f"step {s}: x_t is not the model's input"
    if frames:
        condition = seen[0][0][:, 0].numpy()  # the image latent the model is given at frame 0
        for s in range(n):
            assert np.array_equal(t["x0_hat"][s][:, 0], condition), f"step {s}: x̂0 at the conditioning frame"
        assert np.array_equal(t["final"][:, 0], condition)
    np.testing.assert_allclose(t["x0_hat"][-1], t["final"], rtol=0, atol=1e-6)


def test_ti2v_image_frame_differs_from_the_loops_own_latent(tiny):
    """The reason for the blend: the loop's own frame 0 is noise the model never sees (the issue's ~4.5 off)."""
    case = tiny("wan22_ti2v")
    loop = []

    def keep(pipe, i, t, kwargs):
        loop.append(kwargs["latents"].clone())
        return {}

    captured = run(case, callback_on_step_end=keep)
    assert np.abs(loop[-1][0, :, 0].numpy() - captured.tensors["final"][:, 0]).max() > 0.1
    assert np.array_equal(loop[-1][0, :, 1:].numpy(), captured.tensors["final"][:, 1:])


# ---- a user callback that edits the latents ----------------------------------------------------------------------


def test_final_is_the_latent_after_a_user_callback_edits_it(tiny):
    case = tiny("wan_t2v")

    def edit(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0 + 0.25} if i == case.n_steps - 1 else {}

    for via_output in (True, False):
        with Capturer(case.pipe, CaptureSpec(layers=0)) as cap:
            cap.begin_sample()
            out = generate(case, callback_on_step_end=cap.callback(edit),
                           callback_on_step_end_tensor_inputs=["latents"])
            tensors, _ = cap.end_sample(out if via_output else None)
        assert np.array_equal(tensors["final"], out[0].numpy()) and float(out.abs().max()) == 0.25


def test_capture_run_chains_the_users_callback(tiny, tmp_path):
    case = tiny("wan_t2v")
    steps = []

    def mine(pipe, i, t, kwargs):
        steps.append((i, tuple(kwargs)))
        return {}

    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    path = capture_pipeline(case.pipe, runs_dir=tmp_path, run_id="chained", seeds=(0,),
                            spec=CaptureSpec(layers=0), callback_on_step_end=mine,
                            callback_on_step_end_tensor_inputs=["prompt_embeds"], **call)
    assert [i for i, _ in steps] == list(range(case.n_steps))
    assert all(set(keys) == {"latents", "prompt_embeds"} for _, keys in steps)
    archive = Archive.open(path)
    assert np.array_equal(archive.read(0, "final"), generate(case)[0].numpy())


# ---- x̂0 as the sampler used it -------------------------------------------------------------------------------------


def test_x0_hat_is_the_clipped_value_a_clip_sample_scheduler_steps_with(tiny):
    case = tiny("cogvideox", scheduler="ddim_clip")
    captured = run(case)
    t, layout = captured.tensors, captured.layout
    assert layout["x0_source"] == "scheduler"
    assert np.abs(t["x0_hat"]).max() <= 1.0
    fresh = copy.deepcopy(case.pipe.scheduler)
    raw_max = 0.0
    for s, st in enumerate(layout["steps"]):
        v, x = (torch.from_numpy(t[k][s]).permute(1, 0, 2, 3)[None] for k in ("v_hat", "x_t"))  # (1, F, C, H, W)
        own = fresh.step(v, int(st["t"]), x).pred_original_sample[0].permute(1, 0, 2, 3).numpy()
        np.testing.assert_array_equal(t["x0_hat"][s], own, err_msg=f"step {s}")
        a = float(fresh.alphas_cumprod[int(st["t"])])
        raw = a ** 0.5 * t["x_t"][s] - (1 - a) ** 0.5 * t["v_hat"][s]  # what an unclipped rule would archive
        raw_max = max(raw_max, float(np.abs(raw).max()))
    assert raw_max > 1.5, "the clip never acted: the test would not tell clipped from raw"


def test_schedulers_that_return_no_x0_use_the_rule(tiny):
    assert run(tiny("wan_t2v"), CaptureSpec(layers=0)).layout["x0_source"] == "rule"
    assert run(tiny("cogvideox"), CaptureSpec(layers=0)).layout["x0_source"] == "scheduler"


# ---- a diffusers cache that skips blocks -------------------------------------------------------------------------


def test_blocks_skipped_by_first_block_cache_are_flagged(tiny):
    from diffusers import FirstBlockCacheConfig

    from cos_core.capture.tiny_pipelines import build_tiny

    case = build_tiny("wan_t2v")  # its own copy: the cache hooks stay on this pipeline
    case.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # skip whenever it can
    plain = generate(case)
    ran = []  # (step, branch) of every call in which block 1 really computed, seen from its own submodule
    step = [0]

    def count(pipe, i, t, kwargs):
        step[0] = i + 1
        return {}

    handle = case.pipe.transformer.blocks[1].ffn.register_forward_hook(lambda m, a, o: ran.append(step[0]))
    try:
        captured = run(case, callback_on_step_end=count)
    finally:
        handle.remove()
    assert torch.equal(captured.output.frames, plain), "capture changed a cached run"
    for branch in ("cond", "uncond"):
        flags = captured.tensors[skip_key(SITE, branch)]  # (step, layer)
        computed = [s for s in range(case.n_steps) if flags[s, 1] == 0]
        assert computed == sorted(set(ran)) == [0], (branch, flags)
        assert (flags[1:] == 1).all(), "the leader block's output carries the cached residual at skipped steps"
        assert (flags[0] == 0).all()
        skipped_means = captured.tensors[act_key(SITE, "frame_mean", branch)][1:]
        np.testing.assert_array_equal(skipped_means[:, 1], skipped_means[:, 0])  # block 1 passed its input through


def test_no_cache_means_no_flags(tiny):
    flags = run(tiny("wan_t2v")).tensors[skip_key(SITE, "cond")]
    assert flags.shape == (4, 2) and not flags.any()


# ---- family detection: subclasses and compiled transformers ----------------------------------------------------


def test_a_subclassed_pipeline_is_captured_like_its_base(tiny):
    from diffusers import WanPipeline

    class MyWanPipeline(WanPipeline):
        pass

    case = tiny("wan_t2v")
    mine = MyWanPipeline(**case.pipe.components)
    mine.set_progress_bar_config(disable=True)
    ours = copy.copy(case)
    object.__setattr__(ours, "pipe", mine)
    captured = run(ours, CaptureSpec(layers=0))
    reference = run(case, CaptureSpec(layers=0))
    for key, value in reference.tensors.items():
        np.testing.assert_array_equal(captured.tensors[key], value, err_msg=key)


def test_a_compiled_transformer_is_captured(tiny):
    from cos_core.capture.tiny_pipelines import build_tiny

    case = build_tiny("wan_t2v")
    reference = run(case, CaptureSpec(layers=0, reductions=("frame_mean",)))
    case.pipe.transformer = torch.compile(case.pipe.transformer, backend="eager", dynamic=False)
    captured = run(case, CaptureSpec(layers=0, reductions=("frame_mean",)))
    assert type(case.pipe.transformer).__name__ == "OptimizedModule"
    for key, value in reference.tensors.items():
        np.testing.assert_allclose(captured.tensors[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


# ---- proj<d'> in float32 -----------------------------------------------------------------------------------------


def test_projection_of_bfloat16_states_is_computed_in_float32():
    hidden = torch.randn(1, 2 * 3 * 4, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = Reducer(("proj16",), proj_seed=1)(hidden, (2, 3, 4))["proj16"]
    mat = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) / 16 ** 0.5
    exact = hidden.double().view(1, 2, 3, 4, 64) @ mat.double()
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), exact.numpy(), rtol=1e-5, atol=1e-5)
    bf16 = (hidden.view(1, 2, 3, 4, 64) @ mat.bfloat16()).float()  # what a bf16 matmul would store
    assert (bf16 - exact.float()).abs().max() > 10 * (got - exact.float()).abs().max()
