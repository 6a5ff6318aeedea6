"""GPU-only capture checks (skipped without CUDA): model CPU offload and bf16 on the GPU leave capture unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cos_core.capture import Capturer, CaptureSpec

pytestmark = pytest.mark.gpu


def _run(case, offload: bool):
    pipe = case.pipe
    if offload:
        pipe.enable_model_cpu_offload(device="cuda")
    else:
        pipe.to("cuda")
    call = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in case.call_kwargs.items()}
    with Capturer(pipe, CaptureSpec(tokens=((0, 1),))) as cap:
        cap.begin_sample()
        out = pipe(**call, generator=torch.Generator("cuda").manual_seed(0), callback_on_step_end=cap.callback(),
                   callback_on_step_end_tensor_inputs=["latents"])[0]
        tensors, layout = cap.end_sample()
    return out.cpu(), tensors, layout


def test_cpu_offload_captures_the_same_as_plain_gpu():
    from cos_core.capture.tiny_pipelines import build_tiny

    out_a, ta, la = _run(build_tiny("wan22"), offload=False)
    out_b, tb, lb = _run(build_tiny("wan22"), offload=True)
    assert torch.equal(out_a, out_b)
    assert la["steps"] == lb["steps"] and [s["expert"] for s in la["steps"]].count("transformer_2") > 0
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)


def test_last_step_x0_hat_is_the_final_latent_in_bf16_on_gpu():
    from cos_core.capture.tiny_pipelines import build_tiny

    case = build_tiny("wan_t2v", dtype=torch.bfloat16)
    _, tensors, _ = _run(case, offload=False)
    np.testing.assert_allclose(tensors["x0_hat"][-1], tensors["final"], atol=1e-2)
