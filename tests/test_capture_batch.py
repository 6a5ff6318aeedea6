"""Batched capture: B work items per pipeline call, each with its own seed, labels and shard. On a CPU (per-item
transformer rows) the archive equals the unbatched one bit for bit, for the organism and every diffusers family, with
uneven last batches and across a resume with another batch size; a joint forward agrees to float rounding; a pipeline
that cannot batch falls back to one item per call and says why.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from cos_core.archive import Archive
from cos_core.archive.schema import PARTIAL_SUFFIX, PROVENANCE_KEYS
from cos_core.capture import CaptureSpec, WorkItem, capture_run
from cos_core.capture.batching import call_kwargs, groups, item_rows, rows

SPEC = CaptureSpec(reductions=("frame_mean", "token_norm", "proj4"), tokens=((1, 1),))


def assert_same_archive(a: Archive, b: Archive, atol: float = 0.0) -> None:
    assert a.n_samples == b.n_samples
    for sample in range(a.n_samples):
        assert a.keys(sample) == b.keys(sample)
        for key in a.keys(sample):
            x, y = a.read(sample, key), b.read(sample, key)
            if atol:
                np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=f"{sample} {key}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{sample} {key}")
    pd.testing.assert_frame_equal(a.samples, b.samples)
    ignore = set(PROVENANCE_KEYS) | ({"checksums"} if atol else set())  # content checksums differ at rounding
    assert {k: v for k, v in a.manifest.items() if k not in ignore} == \
        {k: v for k, v in b.manifest.items() if k not in ignore}


@pytest.fixture(scope="module")
def organism(tmp_path_factory, one_torch_thread):
    """A tiny random organism (seeded) and its work items: 2 instances x 3 seeds of the fork task, 3 steps."""
    from cos_core.capture.sources import SourceConfig, organism_source
    from cos_core.organism.pipeline import build_pipeline
    from cos_core.tasks import TASK_NAMES

    model_dir = tmp_path_factory.mktemp("organism") / "model"
    torch.manual_seed(0)
    build_pipeline("tiny", task_names=TASK_NAMES).save_pretrained(model_dir)
    config = SourceConfig(task="fork", instances=2, num_inference_steps=3, guidance_scale=2.0)
    return organism_source(config, device="cpu", dtype=torch.float32, seeds=[0, 1, 2], model_dir=model_dir)


def capture_organism(source, runs, run_id, **kwargs):
    return Archive.open(capture_run(source.pipe, source.items, SPEC, runs_dir=runs, run_id=run_id,
                                    call_kwargs=source.call_kwargs, source=source.label, score=source.score,
                                    command=["test"], extra=source.extra, **kwargs))


@pytest.fixture(scope="module")
def unbatched(organism, tmp_path_factory):
    return capture_organism(organism, tmp_path_factory.mktemp("runs"), "one")


@pytest.mark.parametrize("size", [2, 4, 6])
def test_a_batched_organism_archive_equals_the_unbatched_one_bit_for_bit(organism, unbatched, tmp_path, size):
    batched = capture_organism(organism, tmp_path, f"b{size}", batch_size=size)
    assert batched.manifest["timing"]["batch_size"] == size
    assert batched.manifest["timing"]["batch_forward"] == "per_item"
    assert_same_archive(batched, unbatched)


def test_shards_written_by_threads_while_the_next_call_runs_are_the_same(organism, unbatched, tmp_path):
    assert_same_archive(capture_organism(organism, tmp_path, "threads", batch_size=4, writers=2), unbatched)


def test_a_joint_forward_agrees_to_rounding_and_starts_from_the_same_noise(organism, unbatched, tmp_path):
    joint = capture_organism(organism, tmp_path, "joint", batch_size=6, batch_forward="joint")
    assert joint.manifest["timing"]["batch_forward"] == "joint"
    for sample in range(joint.n_samples):
        np.testing.assert_array_equal(joint.read(sample, "x_t")[0], unbatched.read(sample, "x_t")[0])
    assert_same_archive(joint, unbatched, atol=1e-3)


def test_a_resume_with_another_batch_size_gives_the_same_archive(organism, unbatched, tmp_path):
    def crashing(item, final):
        if item.sample_id == organism.items[3].sample_id:
            raise RuntimeError("scorer crashed on the fourth item")
        return organism.score(item, final)

    with pytest.raises(RuntimeError, match="fourth item"):
        capture_run(organism.pipe, organism.items, SPEC, runs_dir=tmp_path, run_id="r",
                    call_kwargs=organism.call_kwargs, source=organism.label, score=crashing, command=["test"],
                    extra=organism.extra, batch_size=2)
    assert len(list((tmp_path / f"r{PARTIAL_SUFFIX}" / "shards").glob("*.safetensors"))) == 3
    assert_same_archive(capture_organism(organism, tmp_path, "r", batch_size=5), unbatched)


# ---- diffusers families ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wan_t2v", "wan_i2v", "wan22", "wan22_ti2v", "cogvideox", "ltx", "hunyuan"])
def test_batched_diffusers_captures_equal_unbatched_ones(tiny, tmp_path, name):
    case = tiny(name)
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    work = [WorkItem(sample_id=f"seed{s}", seed=s, instance="0") for s in (0, 1, 2)]
    spec = CaptureSpec(reductions=("frame_mean", "token_norm"), tokens=((0, 1),))

    def capture(run_id, size):
        return Archive.open(capture_run(case.pipe, work, spec, runs_dir=tmp_path, run_id=run_id, call_kwargs=call,
                                        source=f"tiny:{name}", command=["test"], batch_size=size))

    one, batched = capture("one", 1), capture("three", 3)
    assert batched.manifest["timing"]["batch_size"] == 3
    assert_same_archive(batched, one)
    assert not np.array_equal(one.read(0, "final"), one.read(1, "final")), "items must differ by their seed"


def test_a_pipeline_under_a_diffusers_cache_falls_back_to_one_item_per_call(tmp_path, caplog, one_torch_thread):
    from diffusers import FirstBlockCacheConfig

    from cos_core.capture.tiny_pipelines import build_tiny

    case = build_tiny("wan_t2v")
    case.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    work = [WorkItem(sample_id=f"seed{s}", seed=s) for s in (0, 1)]
    with caplog.at_level(logging.WARNING, logger="cos_core.capture.run"):
        path = capture_run(case.pipe, work, CaptureSpec(layers=0), runs_dir=tmp_path, run_id="cached",
                           call_kwargs=call, source="tiny", command=["test"], batch_size=2)
    assert "WanPipeline cannot run several items per call: its transformer carries diffusers hooks" in caplog.text
    assert Archive.open(path).manifest["timing"]["batch_size"] == 1


# ---- the pieces ----------------------------------------------------------------------------------------------------


def test_rows_name_each_items_first_member_per_branch():
    assert rows(True, None, 12, 3, 2) == [("uncond", slice(0, 6, 2)), ("cond", slice(6, 12, 2))]
    assert rows(False, "uncond", 6, 3, 2) == [("uncond", slice(0, 6, 2))]
    with pytest.raises(ValueError, match="batch 5 in context 'cond', expected 3 items x 2 videos"):
        rows(False, "cond", 5, 3, 2)
    assert [r.tolist() for r in item_rows(True, 8, 2, 2)] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_groups_break_where_an_unmergeable_input_changes():
    kwargs = {0: {"image": "a", "prompt": "x"}, 1: {"image": "a", "prompt": "y"}, 2: {"image": "b", "prompt": "z"},
              3: {"image": "b", "prompt": "z"}, 4: {"image": "b", "prompt": "z"}}
    assert groups(range(5), kwargs.get, 2) == [[0, 1], [2, 3], [4]]
    merged = call_kwargs({"prompt_embeds": torch.zeros(1, 3), "negative_prompt": "bad"},
                         [{"prompt": "x", "latents": torch.ones(1, 2)}, {"prompt": "y", "latents": torch.ones(1, 2)}])
    assert merged["prompt"] == ["x", "y"] and merged["negative_prompt"] == ["bad", "bad"]
    assert merged["prompt_embeds"].shape == (2, 3) and merged["latents"].shape == (2, 2)
