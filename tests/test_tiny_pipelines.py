"""Tiny pipelines: every family is the real diffusers class, runs on CPU with latent output, is deterministic, steps
through its callback once per step, lays out CFG as the adapters expect, and (Wan 2.2) switches expert at the boundary.
"""

import math

import pytest
import torch

from cos_core.capture.tiny_pipelines import (HEIGHT, NUM_FRAMES, SCHEDULERS, TI2V_HEIGHT, TI2V_WIDTH, TINY_FAMILIES,
                                             WAN_1_3B_CONFIG, WIDTH,
                                             build_tiny, wan_1_3b_transformer)

PIPELINE_CLASS = {"wan_t2v": "WanPipeline", "wan_i2v": "WanImageToVideoPipeline", "wan22": "WanPipeline",
                  "wan22_i2v": "WanImageToVideoPipeline", "cogvideox": "CogVideoXPipeline", "ltx": "LTXPipeline",
                  "hunyuan": "HunyuanVideoPipeline", "wan22_ti2v_t2v": "WanPipeline",
                  "wan22_ti2v": "WanImageToVideoPipeline"}
BLOCK_LISTS = {"cogvideox": ("transformer_blocks",), "ltx": ("transformer_blocks",),
               "hunyuan": ("transformer_blocks", "single_transformer_blocks")}  # Wan: ("blocks",)
BATCHED_CFG = {"cogvideox", "ltx"}  # one doubled batch per step (uncond half first); the rest: cond call, uncond call


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box two threads run 10-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def case(request, one_thread):
    return build_tiny(request.param)


def run(case, seed=0, **overrides):
    kwargs = {**case.call_kwargs, **overrides}
    return case.pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).frames


def denoisers(pipe):
    second = getattr(pipe, "transformer_2", None)
    return [("transformer", pipe.transformer)] + ([("transformer_2", second)] if second is not None else [])


def branch_of(case, text):
    """Which CFG branch a transformer call ran, told by the text embeddings it was given."""
    cond, uncond = case.call_kwargs["prompt_embeds"], case.call_kwargs.get("negative_prompt_embeds")
    if torch.equal(text, cond):
        return "cond"
    if uncond is not None and torch.equal(text, uncond):
        return "uncond"
    if uncond is not None and torch.equal(text, torch.cat([uncond, cond])):
        return "uncond+cond"
    raise AssertionError(f"transformer called with unknown text embeddings of shape {tuple(text.shape)}")


def record_calls(case, **overrides):
    """Run once; return [(step, expert, batch, branch)] for every transformer forward, step from the callback."""
    calls, step = [], [0]

    def on_step_end(pipe, i, t, callback_kwargs):
        assert i == step[0], f"callback step {i}, expected {step[0]}"
        step[0] += 1
        return callback_kwargs

    def pre_hook(name):
        def hook(module, args, kwargs):
            calls.append((step[0], name, kwargs["hidden_states"].shape[0],
                          branch_of(case, kwargs["encoder_hidden_states"])))
        return hook

    hooks = [module.register_forward_pre_hook(pre_hook(name), with_kwargs=True)
             for name, module in denoisers(case.pipe)]
    try:
        run(case, callback_on_step_end=on_step_end, **overrides)
    finally:
        for hook in hooks:
            hook.remove()
    assert step[0] == case.n_steps, f"callback ran {step[0]} times for {case.n_steps} steps"
    return calls


def test_builds_the_real_pipeline_class(case):
    assert type(case.pipe).__name__ == PIPELINE_CLASS[case.family]
    assert case.pipe.text_encoder is None  # bypassed by prompt_embeds
    assert case.call_kwargs["output_type"] == "latent" and case.call_kwargs["num_inference_steps"] == case.n_steps


def test_latent_output_shape_and_determinism(case):
    seen = []

    def on_step_end(pipe, i, t, callback_kwargs):
        seen.append((i, tuple(callback_kwargs["latents"].shape)))
        return callback_kwargs

    first = run(case, callback_on_step_end=on_step_end)
    assert tuple(first.shape) == case.latent_shape
    assert seen == [(i, case.latent_shape) for i in range(case.n_steps)]
    assert torch.isfinite(first).all()
    assert torch.equal(run(case), first), "same generator seed must give a bit-identical result"
    assert not torch.equal(run(case, seed=1), first), "the generator seed must matter"


def test_token_grid_matches_what_the_blocks_see(case):
    """The recorded geometry agrees with the real transformer: video tokens per block = prod(token_grid)."""
    f, h, w = case.latent_grid
    layout_dims = {"BCFHW": (f, h, w), "BFCHW": (f, h, w), "BTC": (math.prod(case.token_grid),)}[case.latent_layout]
    shape = case.latent_shape
    got = {"BCFHW": shape[2:], "BFCHW": (shape[1], *shape[3:]), "BTC": shape[1:2]}[case.latent_layout]
    assert tuple(got) == layout_dims

    tokens = []
    first_block = getattr(case.pipe.transformer, BLOCK_LISTS.get(case.family, ("blocks",))[0])[0]
    hook = first_block.register_forward_hook(
        lambda m, a, out: tokens.append((out[0] if isinstance(out, tuple) else out).shape[1]))
    try:
        run(case, num_inference_steps=2)
    finally:
        hook.remove()
    assert set(tokens) == {math.prod(case.token_grid)}


def test_cfg_layout_and_effect(case):
    calls = record_calls(case)
    expected = [(2, "uncond+cond")] if case.family in BATCHED_CFG else [(1, "cond"), (1, "uncond")]
    for step in range(case.n_steps):
        assert [(b, branch) for s, _, b, branch in calls if s == step] == expected, f"{case.family}: {calls}"
    assert case.cfg_kwarg is not None
    assert not torch.allclose(run(case), run(case, **{case.cfg_kwarg: 1.0})), "CFG must change the output"


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_without_cfg_one_branch_per_step(name):
    case = build_tiny(name, cfg=False)
    assert case.cfg_kwarg is None and "negative_prompt_embeds" not in case.call_kwargs
    calls = record_calls(case)
    assert [(s, b, branch) for s, _, b, branch in calls] == [(s, 1, "cond") for s in range(case.n_steps)]
    assert tuple(run(case).shape) == case.latent_shape


@pytest.mark.parametrize("name", ["wan22", "wan22_i2v"])
@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_two_experts_switch_at_the_boundary(name, scheduler):
    case = build_tiny(name, scheduler=scheduler)
    calls = record_calls(case)
    boundary_t = case.pipe.config.boundary_ratio * case.pipe.scheduler.config.num_train_timesteps
    timesteps = case.pipe.scheduler.timesteps
    expected = ["transformer" if t >= boundary_t else "transformer_2" for t in timesteps]
    got = [[n for s, n, _, _ in calls if s == step] for step in range(case.n_steps)]
    assert got == [[name, name] for name in expected], "cond and uncond of a step run on the same expert"
    assert expected[0] == "transformer" and expected[-1] == "transformer_2", f"both experts, high noise first: {got}"


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_vae_decodes_the_latents(name):
    case = build_tiny(name, cfg=False)
    video = run(case, output_type="pt", num_inference_steps=2)
    height, width = (TI2V_HEIGHT, TI2V_WIDTH) if name.startswith("wan22_ti2v") else (HEIGHT, WIDTH)
    assert tuple(video.shape) == (1, NUM_FRAMES, 3, height, width)
    assert torch.isfinite(video).all()


def test_builds_are_reproducible_from_the_seed():
    a, b, c = build_tiny("wan22", seed=0), build_tiny("wan22", seed=0), build_tiny("wan22", seed=1)
    for name in ("transformer", "transformer_2", "vae"):
        sa, sb, sc = (getattr(x.pipe, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not all(torch.equal(p, q) for p, q in zip(a.pipe.transformer.parameters(),
                                                      a.pipe.transformer_2.parameters())), "experts must differ"
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny("ltx")
    assert torch.equal(torch.rand(3), expected), "building must not consume the caller's global RNG"


def test_cogvideox_schedulers():
    ddim = build_tiny("cogvideox")
    assert type(ddim.pipe.scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert ddim.pipe.scheduler.config.prediction_type == "v_prediction"
    dpm = build_tiny("cogvideox", scheduler="dpm")
    assert type(dpm.pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    out = run(dpm)
    assert tuple(out.shape) == dpm.latent_shape and torch.equal(run(dpm), out)


def test_bad_names_raise_with_the_allowed_values():
    with pytest.raises(ValueError, match="wan_t2v"):
        build_tiny("wan3")
    with pytest.raises(ValueError, match="ddim"):
        build_tiny("cogvideox", scheduler="unipc")
    assert set(SCHEDULERS) == set(TINY_FAMILIES)
    assert TINY_FAMILIES["ltx"](cfg=False).cfg_kwarg is None  # the registry entries are build_tiny(name, ...)


def test_bfloat16_keeps_the_fp32_modules_and_runs():
    case = build_tiny("wan_t2v", dtype=torch.bfloat16, cfg=False)
    tf = case.pipe.transformer
    assert tf.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tf.scale_shift_table.dtype == torch.float32  # in WanTransformer3DModel._keep_in_fp32_modules
    assert torch.isfinite(run(case, num_inference_steps=2)).all()


def test_wan_1_3b_architecture():
    model = wan_1_3b_transformer(device="meta")  # structure only, no memory
    assert len(model.blocks) == 30 and model.config.num_layers == WAN_1_3B_CONFIG["num_layers"]
    assert model.config.num_attention_heads * model.config.attention_head_dim == 1536
    assert (model.config.ffn_dim, model.config.text_dim, model.config.in_channels) == (8960, 4096, 16)
    assert tuple(model.config.patch_size) == (1, 2, 2)
    assert 1.3e9 < sum(p.numel() for p in model.parameters()) < 1.5e9
    assert model.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
