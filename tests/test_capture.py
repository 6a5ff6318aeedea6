"""Capture hooks on the real diffusers pipelines of every family, checked against references outside the capture code:
the pipeline's own output and callback latents, the scheduler's own x̂0, hooks we install ourselves, numpy reductions
and the token grid the tiny pipelines declare. Every family is built once per module (tiny, CPU, float32).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cos_core.archive.schema import act_key, token_key
from cos_core.capture import SITE, Capturer, CaptureSpec
from cos_core.capture.reductions import Reducer

FAMILIES = ("wan_t2v", "wan_i2v", "wan22", "cogvideox", "ltx", "hunyuan")
# CogVideoX with its DPM scheduler as well as DDIM; Wan2.2 TI2V-5B text- and image-to-video (expand_timesteps)
VARIANTS = FAMILIES + ("cogvideox:dpm", "wan22_ti2v_t2v", "wan22_ti2v")
FLOW = {"wan_t2v", "wan_i2v", "wan22", "wan22_i2v", "wan22_ti2v_t2v", "wan22_ti2v", "ltx", "hunyuan"}
TI2V = {"wan22_ti2v"}  # latent frame 0 is the image latent, for the model and in the output
BATCHED_CFG = {"cogvideox", "ltx"}  # one doubled batch per step, uncond half first (diffusers' torch.cat order)
FIRST_BLOCKS = {"cogvideox": "transformer_blocks", "ltx": "transformer_blocks", "hunyuan": "transformer_blocks"}
FULL = dict(reductions=("frame_mean", "token_norm", "pool2", "proj4"))


def case_of(tiny, variant: str, cfg: bool = True):
    name, _, scheduler = variant.partition(":")
    return tiny(name, cfg=cfg, scheduler=scheduler or None)


def generate(case, seed: int = 0, **overrides) -> torch.Tensor:
    kwargs = {**case.call_kwargs, **overrides}
    return case.pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).frames


def to_cfhw(case, latents: torch.Tensor) -> torch.Tensor:
    """Loop latents -> (B, C, F, H, W), written here from the tiny case's declared layout (not the adapter's)."""
    if case.latent_layout == "BCFHW":
        return latents
    if case.latent_layout == "BFCHW":
        return latents.permute(0, 2, 1, 3, 4)
    assert case.patch_size == (1, 1, 1), "packed reference below assumes LTX's 1x1x1 patch"
    b, n, c = latents.shape
    f, h, w = case.latent_grid
    return latents.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def from_cfhw(case, z: torch.Tensor) -> torch.Tensor:
    if case.latent_layout == "BCFHW":
        return z
    if case.latent_layout == "BFCHW":
        return z.permute(0, 2, 1, 3, 4).contiguous()
    b, c, f, h, w = z.shape
    return z.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)


def expert_modules(pipe) -> list[tuple[str, torch.nn.Module]]:
    second = getattr(pipe, "transformer_2", None)
    return [("transformer", pipe.transformer)] + ([("transformer_2", second)] if second is not None else [])


def first_block(family: str, transformer) -> torch.nn.Module:
    return getattr(transformer, FIRST_BLOCKS.get(family, "blocks"))[0]


def capture(case, spec: CaptureSpec, seed: int = 0, user=None, **overrides):
    with Capturer(case.pipe, spec) as cap:
        cap.begin_sample()
        out = generate(case, seed, callback_on_step_end=cap.callback(user),
                       callback_on_step_end_tensor_inputs=["latents"], **overrides)
        tensors, layout = cap.end_sample()
    return out, tensors, layout


class Observed:
    """One capture of every step/layer/branch of a variant plus what we saw ourselves during that same run."""

    def __init__(self, variant: str, case):
        self.variant, self.case = variant, case
        self.family = case.family
        self.plain = generate(case)  # no capture, no callback: the reference output
        self.after: list[torch.Tensor] = []            # callback latents after each step, (1, C, F, H, W)
        self.own_x0: list[torch.Tensor] = []           # UniPC's own x̂0 (its data prediction) per step
        self.calls: list[tuple[int, str, torch.Tensor]] = []  # (step, expert, block-0 output) per transformer call
        self.inputs: list[tuple[int, torch.Tensor]] = []  # (step, hidden_states) the transformer was given per call

        def user(pipe, i, t, kwargs):
            self.after.append(to_cfhw(case, kwargs["latents"]).clone())
            outputs = getattr(pipe.scheduler, "model_outputs", None)
            if outputs is not None:
                self.own_x0.append(outputs[-1].clone())
            return {}

        def block_hook(name):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                self.calls.append((len(self.after), name, hidden.detach().clone()))
            return hook

        def input_hook(module, args, kwargs):
            self.inputs.append((len(self.after), kwargs.get("hidden_states", args[0] if args else None).clone()))

        handles = [first_block(case.family, m).register_forward_hook(block_hook(name))
                   for name, m in expert_modules(case.pipe)]
        handles += [m.register_forward_pre_hook(input_hook, with_kwargs=True) for _, m in expert_modules(case.pipe)]
        spec = CaptureSpec(tokens=((0, 0), (1, case.n_steps - 1)), **FULL)
        try:
            self.out, self.tensors, self.layout = capture(case, spec, user=user)
        finally:
            for h in handles:
                h.remove()

    def act(self, reduction: str, branch: str) -> np.ndarray:
        return self.tensors[act_key(SITE, reduction, branch)]  # (step, layer, *shape)


@pytest.fixture(scope="module", params=VARIANTS)
def observed(request, tiny) -> Observed:
    return Observed(request.param, case_of(tiny, request.param))


# ---- output and step tensors -----------------------------------------------------------------------------------------


def test_capture_leaves_the_output_bit_identical(observed):
    assert torch.equal(observed.out, observed.plain), "capture changed what the pipeline generated"
    assert np.array_equal(observed.tensors["final"], to_cfhw(observed.case, observed.plain)[0].numpy())


def test_x0_hat_at_the_last_step_is_the_final_latent(observed):
    x0_last, final = observed.tensors["x0_hat"][-1], observed.tensors["final"]
    if observed.family in FLOW:
        np.testing.assert_allclose(x0_last, final, rtol=0, atol=1e-6)
    else:
        np.testing.assert_allclose(x0_last, final, rtol=1e-5, atol=1e-5)


def test_step_tensors_are_what_the_loop_held(observed):
    """x_t of step s+1 is the latent the pipeline held after step s; t and σ are the scheduler's."""
    x_t, n = observed.tensors["x_t"], observed.case.n_steps
    assert x_t.shape[0] == n and len(observed.after) == n
    for s in range(n - 1):
        if observed.variant in TI2V:  # the loop's frame 0 is never seen: the model gets the image latent there
            assert np.array_equal(x_t[s + 1][:, 1:], observed.after[s][0].numpy()[:, 1:]), f"x_t at step {s + 1}"
        else:
            assert np.array_equal(x_t[s + 1], observed.after[s][0].numpy()), f"x_t at step {s + 1}"
    if observed.variant.startswith("wan22_ti2v"):  # expand_timesteps: the transformer input is the latent itself
        for s in range(n):
            seen = next(h for step, h in observed.inputs if step == s)
            assert np.array_equal(x_t[s], seen[0].numpy()), f"x_t at step {s} is not what the model saw"
    scheduler = observed.case.pipe.scheduler
    steps = observed.layout["steps"]
    assert [st["step"] for st in steps] == list(range(n))
    assert [st["t"] for st in steps] == [float(t) for t in scheduler.timesteps]
    if observed.family in FLOW:
        expected = [float(scheduler.sigmas[s]) for s in range(n)]
    else:
        expected = [float((1 - scheduler.alphas_cumprod[int(t)]) ** 0.5) for t in scheduler.timesteps]
    np.testing.assert_allclose([st["sigma"] for st in steps], expected, rtol=1e-6)
    assert all(b > a for a, b in zip([st["sigma"] for st in steps][1:], [st["sigma"] for st in steps]))


def test_x0_hat_agrees_with_the_schedulers_own(observed):
    t = observed.tensors
    scheduler = observed.case.pipe.scheduler
    kind = type(scheduler).__name__
    n = observed.case.n_steps
    if observed.own_x0:  # UniPC keeps its own x̂0 in model_outputs
        assert len(observed.own_x0) == n
        kept = slice(1, None) if observed.variant in TI2V else slice(None)  # TI2V frame 0: the image latent
        for s in range(n):
            np.testing.assert_allclose(t["x0_hat"][s][:, kept],
                                       to_cfhw(observed.case, observed.own_x0[s])[0].numpy()[:, kept],
                                       rtol=0, atol=1e-6, err_msg=f"step {s}")
    elif kind.startswith("CogVideoX"):  # DDIM and DPM return pred_original_sample
        fresh = copy.deepcopy(scheduler)
        for s, st in enumerate(observed.layout["steps"]):
            v, x = torch.from_numpy(t["v_hat"][s]), torch.from_numpy(t["x_t"][s])
            if kind == "CogVideoXDPMScheduler":
                res = fresh.step(v, None, int(st["t"]), None, x, return_dict=True)
            else:
                res = fresh.step(v, int(st["t"]), x, return_dict=True)
            own = res.pred_original_sample if hasattr(res, "pred_original_sample") else res[1]
            np.testing.assert_allclose(t["x0_hat"][s], own.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {s}")
    else:  # Euler has no x̂0 of its own; x̂0 must be where its step heads: x' = x + (σ'-σ)/σ (x - x̂0)
        assert kind == "FlowMatchEulerDiscreteScheduler", kind
        sig = [float(v) for v in scheduler.sigmas]
        for s in range(n - 1):
            x, x0 = t["x_t"][s].astype(np.float64), t["x0_hat"][s].astype(np.float64)
            expected = x + (sig[s + 1] - sig[s]) / sig[s] * (x - x0)
            np.testing.assert_allclose(t["x_t"][s + 1], expected, rtol=1e-5, atol=1e-5, err_msg=f"step {s}")


def test_decoder_mirrors_the_pipelines_own_decode(observed):
    """`--decode` frames of the final latent equal the pipeline's own output_type="np" video, as uint8."""
    from cos_core.capture import families as fam

    if observed.variant == "cogvideox:dpm":
        pytest.skip("same VAE path as cogvideox")
    pipe = observed.case.pipe
    video = np.asarray(generate(observed.case, output_type="np"))  # (1, frame, H, W, 3) in [0, 1]
    ours = fam.decoder(fam.family_of(pipe), pipe)(torch.from_numpy(observed.tensors["final"])[None])
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == video.shape
    assert np.abs(ours.numpy().astype(np.float64) - np.round(video * 255)).max() <= 1


# ---- experts and CFG branches ----------------------------------------------------------------------------------------


def test_expert_labels_name_the_module_that_ran(observed):
    ran = []
    for s in range(observed.case.n_steps):
        names = {name for step, name, _ in observed.calls if step == s}
        assert len(names) == 1, f"step {s}: experts {names}"
        ran.append(names.pop())
    assert [st["expert"] for st in observed.layout["steps"]] == ran


@pytest.mark.parametrize("name", ["wan22", "wan22_i2v"])
def test_wan22_switches_expert_at_the_boundary(tiny, name):
    case = tiny(name)
    _, tensors, layout = capture(case, CaptureSpec(layers=0, reductions=("token_norm",), tensors=()))
    boundary_t = case.pipe.config.boundary_ratio * case.pipe.scheduler.config.num_train_timesteps
    experts = [st["expert"] for st in layout["steps"]]
    assert experts == ["transformer" if st["t"] >= boundary_t else "transformer_2" for st in layout["steps"]]
    assert experts[0] == "transformer" and experts[-1] == "transformer_2", experts
    norms = tensors[act_key(SITE, "token_norm", "cond")][:, 0]  # (step, frame, row, col): both experts recorded
    assert np.isfinite(norms).all() and (norms > 0).all()


def _branch_outputs(observed, step: int) -> dict[str, torch.Tensor]:
    """Block-0 outputs of one step by CFG branch, from our own hook and diffusers' documented call order."""
    outs = [h for s, _, h in observed.calls if s == step]
    if observed.family in BATCHED_CFG:
        (h,) = outs
        assert h.shape[0] == 2
        return {"uncond": h[0], "cond": h[1]}
    assert len(outs) == 2 and all(h.shape[0] == 1 for h in outs)
    return {"cond": outs[0][0], "uncond": outs[1][0]}  # Wan and Hunyuan: the cond call, then the uncond call


def test_cfg_branches_are_captured_apart_and_labelled(observed):
    site = observed.layout["sites"][SITE]
    assert site["branches"] == ["cond", "uncond"]
    for r in FULL["reductions"]:
        cond, uncond = observed.act(r, "cond"), observed.act(r, "uncond")
        assert cond.shape == uncond.shape
        diff = np.abs(cond - uncond).reshape(cond.shape[0], cond.shape[1], -1).max(-1)  # (step, layer)
        assert (diff > 1e-6).all(), f"{r}: cond and uncond identical at some (step, layer)"
    grid = observed.case.token_grid
    for s in range(observed.case.n_steps):
        for branch, hidden in _branch_outputs(observed, s).items():
            mean = hidden.view(*grid, -1).mean(dim=(1, 2)).numpy()  # (frame, d)
            np.testing.assert_allclose(observed.act("frame_mean", branch)[s, 0], mean, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {s} {branch}")


def test_guidance_off_captures_cond_only_and_it_matches_the_cond_branch(observed, tiny):
    """Step 0 sees identical inputs with and without CFG, so the cond-only run's block output must equal the CFG
    run's "cond" branch there, and not its "uncond" branch."""
    off = case_of(tiny, observed.variant, cfg=False).call_kwargs
    case = observed.case
    spec = CaptureSpec(steps="0", tokens=((0, 0),), reductions=("frame_mean",))
    with Capturer(case.pipe, spec) as cap:
        cap.begin_sample()
        case.pipe(**off, generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=cap.callback(),
                  callback_on_step_end_tensor_inputs=["latents"])
        tensors, layout = cap.end_sample()
    assert layout["sites"][SITE]["branches"] == ["cond"]
    assert not [k for k in tensors if k.endswith("/uncond")]
    solo = tensors[token_key(SITE, 0, 0, "cond")]
    cond = observed.tensors[token_key(SITE, 0, 0, "cond")]
    uncond = observed.tensors[token_key(SITE, 0, 0, "uncond")]
    np.testing.assert_allclose(solo, cond, rtol=1e-4, atol=1e-5)
    assert np.abs(solo - uncond).max() > 1e-3, "uncond branch looks like the conditional pass"


# ---- reductions ------------------------------------------------------------------------------------------------------


def adaptive_pool(x: np.ndarray, k: int) -> np.ndarray:
    """numpy adaptive average pooling over rows/cols of (frame, row, col, d), PyTorch's bin edges."""
    f, h, w, d = x.shape
    out = np.zeros((f, k, k, d))
    for i in range(k):
        r0, r1 = i * h // k, -(-(i + 1) * h // k)
        for j in range(k):
            c0, c1 = j * w // k, -(-(j + 1) * w // k)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def gaussian(d: int, out: int, seed: int) -> np.ndarray:
    """The documented projection: a (d, d') standard normal from a CPU generator with `seed`, over sqrt(d')."""
    return (torch.randn(d, out, generator=torch.Generator("cpu").manual_seed(seed)) / out ** 0.5).numpy()


def numpy_reductions(tokens: np.ndarray, proj_seed: int = 0) -> dict[str, np.ndarray]:
    x = tokens.astype(np.float64)  # (frame, row, col, d)
    return {"frame_mean": x.mean(axis=(1, 2)), "token_norm": np.sqrt((x ** 2).sum(-1)),
            "pool2": adaptive_pool(x, 2), "pool3": adaptive_pool(x, 3),
            "proj4": x @ gaussian(x.shape[-1], 4, proj_seed).astype(np.float64)}


def test_reductions_agree_with_the_full_tokens(observed):
    site = observed.layout["sites"][SITE]
    assert site["tokens"] == [[0, 0], [1, observed.case.n_steps - 1]]
    for layer, step in site["tokens"]:
        for branch in ("cond", "uncond"):
            tokens = observed.tensors[token_key(SITE, layer, step, branch)]
            assert tokens.shape == (*observed.case.token_grid, site["dim"])
            ref = numpy_reductions(tokens)
            for r in FULL["reductions"]:
                got = observed.act(r, branch)[site["steps"].index(step), site["layers"].index(layer)]
                np.testing.assert_allclose(got, ref[r], rtol=1e-5, atol=1e-5, err_msg=f"{r} L{layer} S{step}")


@pytest.mark.parametrize("grid", [(2, 3, 5), (1, 4, 4)])
def test_reducer_matches_numpy(grid):
    f, h, w = grid
    hidden = torch.randn(2, f * h * w, 6, generator=torch.Generator().manual_seed(1))
    out = Reducer(("frame_mean", "token_norm", "pool2", "pool3", "proj4"), proj_seed=0)(hidden, grid)
    for b in range(2):
        ref = numpy_reductions(hidden[b].view(f, h, w, 6).numpy())
        for name, value in out.items():
            assert value.dtype == torch.float32
            np.testing.assert_allclose(value[b].numpy(), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_projection_is_fixed_by_its_seed():
    hidden = torch.randn(1, 2 * 3 * 4, 64, generator=torch.Generator().manual_seed(2))
    a = Reducer(("proj8",), proj_seed=5)(hidden, (2, 3, 4))["proj8"]
    b = Reducer(("proj8",), proj_seed=5)(hidden, (2, 3, 4))["proj8"]
    c = Reducer(("proj8",), proj_seed=6)(hidden, (2, 3, 4))["proj8"]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    np.testing.assert_allclose(a[0].numpy(), hidden[0].view(2, 3, 4, 64).numpy() @ gaussian(64, 8, 5),
                               rtol=1e-5, atol=1e-5)
    # Johnson-Lindenstrauss: a wide projection keeps squared norms on average
    wide = Reducer(("proj2048",), proj_seed=0)(hidden, (2, 3, 4))["proj2048"]
    ratio = (wide ** 2).sum(-1) / (hidden.view(1, 2, 3, 4, 64) ** 2).sum(-1)
    assert abs(float(ratio.mean()) - 1) < 0.1


def test_bfloat16_hidden_states_reduce_in_float32():
    hidden = torch.randn(1, 2 * 2 * 2, 16, generator=torch.Generator().manual_seed(3))
    full = Reducer(("frame_mean", "token_norm"))(hidden, (2, 2, 2))
    half = Reducer(("frame_mean", "token_norm"))(hidden.bfloat16(), (2, 2, 2))
    for name in full:
        assert half[name].dtype == torch.float32
        torch.testing.assert_close(half[name], full[name], rtol=2e-2, atol=2e-2)


# ---- token order -----------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _block0_input(case, latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The video tokens entering block 0 at step 0 (the run is cut there) and the grid the capturer assigned."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None).detach().clone()
        raise _Stop

    handle = first_block(case.family, case.pipe.transformer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with Capturer(case.pipe, CaptureSpec(layers=0, reductions=("token_norm",), tensors=())) as cap:
            with pytest.raises(_Stop):
                generate(case, latents=latents)
    finally:
        handle.remove()
    return seen["hidden"], cap.s.grid


@pytest.mark.parametrize("name", FAMILIES)
def test_perturbing_one_latent_patch_changes_exactly_the_token_the_map_names(tiny, name):
    case = tiny(name)
    f, h, w = case.latent_grid
    channels = case.latent_shape[2] if case.latent_layout in ("BFCHW", "BTC") else case.latent_shape[1]
    z = torch.randn(1, channels, f, h, w, generator=torch.Generator().manual_seed(0))  # (B, C, F, H, W)
    if case.latent_layout == "BTC":  # our packing must be LTX's own
        assert torch.equal(from_cfhw(case, z), case.pipe._pack_latents(z, 1, 1))
    base, grid = _block0_input(case, from_cfhw(case, z))
    assert grid == case.token_grid, f"capturer grid {grid}, the pipeline's token grid is {case.token_grid}"
    nf, nr, nc = grid
    assert base.shape[1] == nf * nr * nc
    pt, ph, pw = case.patch_size
    positions = {(0, 0, 0), (nf - 1, nr - 1, nc - 1), (1, nr - 1, min(2, nc - 1)), (nf - 1, 0, nc - 1)}
    for fi, ri, ci in sorted(positions):
        bumped = z.clone()
        bumped[:, :, fi * pt:(fi + 1) * pt, ri * ph:(ri + 1) * ph, ci * pw:(ci + 1) * pw] += 1.0
        hidden, _ = _block0_input(case, from_cfhw(case, bumped))
        changed = (hidden - base).abs().amax(-1) > 0  # (B, token)
        expected = int(np.ravel_multi_index((fi, ri, ci), grid))
        for row in changed:
            assert row.nonzero().flatten().tolist() == [expected], f"patch {(fi, ri, ci)} of {name}"
        # the capturer's own (frame, row, col) view puts that token at the patch position
        view = changed[0].view(*grid)
        assert view[fi, ri, ci] and int(view.sum()) == 1


# ---- hooks are always removed ----------------------------------------------------------------------------------------


def _hook_counts(pipe) -> dict:
    counts = {}
    for cname, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for mname, m in comp.named_modules():
                counts[(cname, mname)] = (len(m._forward_hooks), len(m._forward_pre_hooks), "cache_context" in vars(m))
    return counts


def _assert_clean(pipe, before: dict) -> None:
    assert _hook_counts(pipe) == before
    for _, module in expert_modules(pipe):
        assert "cache_context" not in vars(module)
        assert module.cache_context.__func__ is type(module).cache_context
    assert "step" not in vars(pipe.scheduler)
    assert pipe.scheduler.step.__func__ is type(pipe.scheduler).step


def test_hooks_are_gone_after_an_exception_mid_run(observed):
    case = observed.case
    before = _hook_counts(case.pipe)

    def boom(pipe, i, t, kwargs):
        if i == 1:
            raise KeyboardInterrupt("user stopped the run")  # not an Exception: `finally` must still clean up
        return {}

    with pytest.raises(KeyboardInterrupt):
        capture(case, CaptureSpec(tokens=((0, 0),), **FULL), user=boom)
    _assert_clean(case.pipe, before)
    assert torch.equal(generate(case), observed.plain), "a fresh run after the failure differs"


def test_hooks_raising_inside_the_pipeline_are_removed_and_say_why(tiny):
    case = tiny("wan_t2v")
    before = _hook_counts(case.pipe)
    with pytest.raises(ValueError, match="one video per pipeline call"):
        capture(case, CaptureSpec(), num_videos_per_prompt=2)
    _assert_clean(case.pipe, before)


def test_an_existing_instance_patch_is_restored(tiny):
    case = tiny("wan_t2v")
    scheduler = case.pipe.scheduler

    def mine(*args, **kwargs):
        return type(scheduler).step(scheduler, *args, **kwargs)

    scheduler.step = mine
    try:
        with Capturer(case.pipe, CaptureSpec()):
            assert scheduler.step is not mine
        assert vars(scheduler)["step"] is mine
    finally:
        del scheduler.step


def test_tokens_of_a_layer_outside_the_layer_selection_are_captured(tiny):
    """`--layers 1 --tokens 0:3`: the full tokens of block 0 at step 3 are kept although block 0 is not reduced."""
    case = tiny("wan_t2v")
    seen = []
    step = [0]

    def count(pipe, i, t, kwargs):
        step[0] = i + 1
        return {}

    handle = case.pipe.transformer.blocks[0].register_forward_hook(
        lambda m, a, out: seen.append((step[0], out.detach().clone())))
    try:
        _, tensors, layout = capture(case, CaptureSpec(layers="1", tokens=((0, 3),)), user=count)
    finally:
        handle.remove()
    site = layout["sites"][SITE]
    assert site["layers"] == [1] and site["tokens"] == [[0, 3]]
    cond = next(h for s, h in seen if s == 3)  # Wan runs the cond call first
    np.testing.assert_array_equal(tensors[token_key(SITE, 0, 3, "cond")], cond[0].view(*case.token_grid, -1).numpy())
    assert tensors[act_key(SITE, "frame_mean", "cond")].shape[1] == 1, "block 0 must not enter the reductions"


# ---- bad input -------------------------------------------------------------------------------------------------------


def test_a_run_without_the_step_callback_is_refused_at_end_sample(tiny):
    case = tiny("wan_t2v")
    with Capturer(case.pipe, CaptureSpec(layers=0)) as cap:
        cap.begin_sample()
        generate(case)
        with pytest.raises(RuntimeError, match="sample ended after 0 of 4 steps; was the pipeline run with "
                                               "callback_on_step_end=cap.callback"):
            cap.end_sample()


def test_unsupported_pipeline_and_transformer_classes_are_named():
    class FluxPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="pipeline class 'FluxPipeline' is not supported; supported: .*WanPipeline"):
        Capturer(FluxPipeline(), CaptureSpec())
    fake = type("WanPipeline", (), {"transformer": torch.nn.Linear(2, 2)})()
    with pytest.raises(ValueError, match="transformer of class 'Linear'"):
        Capturer(fake, CaptureSpec())


@pytest.mark.parametrize("spec, message", [
    (dict(layers=2), "layer 2 out of range: the model has layers 0..1"),
    (dict(layers="0:5"), "bound 5 out of range 0..2"),
    (dict(layers=[0, -1]), "layer -1 out of range"),
    (dict(steps=4), "step 4 out of range: the model has steps 0..3"),
    (dict(tensor_steps="7"), "tensor step 7 out of range"),
    (dict(tokens=((5, 0),)), "token layer 5 out of range"),
    (dict(tokens=((0, 9),)), "token step 9 out of range"),
    (dict(layers=True), "a bool is not an index"),
])
def test_out_of_range_selections_are_refused_before_any_hook(tiny, spec, message):
    case = tiny("wan_t2v")
    before = _hook_counts(case.pipe)
    with pytest.raises(ValueError, match=message):
        Capturer(case.pipe, CaptureSpec(**spec), n_steps=case.n_steps)
    assert _hook_counts(case.pipe) == before


@pytest.mark.parametrize("spec, message", [
    (dict(branches=("both",)), "branch 'both' is not allowed"),
    (dict(reductions=("mean",)), "unknown reduction 'mean'"),
    (dict(reductions=("pool0",)), "pool size must be 1..4096"),
    (dict(tensors=("x0",)), "step tensor 'x0' is not allowed"),
    (dict(tokens=((1, 2, 3),)), "must be a \\(layer, step\\) pair"),
])
def test_bad_spec_values_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        CaptureSpec(**spec)


def test_float16_storage_is_the_float32_capture_rounded(tiny):
    case = tiny("wan_t2v")
    spec = CaptureSpec(reductions=("frame_mean", "token_norm"))
    out32, t32, l32 = capture(case, spec)
    out16, t16, l16 = capture(case, CaptureSpec(reductions=("frame_mean", "token_norm"), store_dtype="float16"))
    assert torch.equal(out32, out16), "the storage dtype must not change what is generated"
    assert l16["sites"][SITE]["dtype"] == "float16" and l16["tensors"]["x0_hat"]["dtype"] == "float16"
    for key, value in t32.items():
        if key == "final":
            assert t16[key].dtype == np.float32
            continue
        if key.startswith("skipped/"):  # cache flags are uint8 whatever the storage dtype
            np.testing.assert_array_equal(t16[key], value)
            continue
        assert t16[key].dtype == np.float16, key
        np.testing.assert_array_equal(t16[key], value.astype(np.float16), err_msg=key)
    with pytest.raises(ValueError, match="store_dtype 'bfloat16'"):
        CaptureSpec(store_dtype="bfloat16")
