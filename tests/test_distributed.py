"""Data-parallel capture: the item split, ranks simulated by threads with a real barrier, and one real torchrun
job on the gloo backend. Reference: the same work items captured by one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cos_core.archive import Archive
from cos_core.archive.schema import PROVENANCE_KEYS
from cos_core.capture import CaptureSpec
from cos_core.capture.run import WorkItem, capture_run
from cos_core.capture.distributed import Ranks

SPEC = CaptureSpec(reductions=("frame_mean", "token_norm"), tokens=((1, 2),))


@pytest.mark.parametrize("n_items,world", [(5, 2), (7, 3), (2, 3), (9, 1)])
def test_share_covers_every_item_once_and_evenly(n_items, world):
    shares = [Ranks(r, world).share(n_items) for r in range(world)]
    flat = sorted(i for s in shares for i in s)
    assert flat == list(range(n_items))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 3 of world size 2"):
        Ranks(3, 2)


def test_context_parallel_groups_share_items_and_one_rank_writes():
    ranks = [Ranks(r, 6, cp=2) for r in range(6)]
    assert [r.share(5) for r in ranks] == [[0, 3], [0, 3], [1, 4], [1, 4], [2], [2]]
    assert [r.writes for r in ranks] == [True, False, True, False, True, False]
    with pytest.raises(ValueError, match="do not divide world size 3"):
        Ranks(0, 3, cp=2)


def test_context_parallel_refuses_what_diffusers_would_fail_on_later():
    """Checked before any collective: Ulysses over more ranks than divide the heads, ring attention on the native
    backend (no log-sum-exp), a transformer without a context-parallel plan."""
    from diffusers import CogVideoXTransformer3DModel

    from cos_core.capture.context_parallel import ContextParallel, enable
    from cos_core.capture.tiny_pipelines import build_tiny

    pipe = build_tiny("wan_t2v").pipe
    heads = pipe.transformer.config.num_attention_heads
    with pytest.raises(ValueError, match=f"{heads}\\] heads do not divide by --ulysses-degree {heads + 1}"):
        enable(pipe, ContextParallel(ulysses=heads + 1), world=heads + 1)
    with pytest.raises(ValueError, match="ring attention .* native backend"):
        enable(pipe, ContextParallel(ring=2), world=2)
    with pytest.raises(ValueError, match="multiple of 2"):
        enable(pipe, ContextParallel(ulysses=2), world=3)
    assert not getattr(CogVideoXTransformer3DModel, "_cp_plan", None), "diffusers now plans CogVideoX: pick another"
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel has no context-parallel plan"):
        enable(build_tiny("cogvideox").pipe, ContextParallel(ulysses=2), world=2)


def test_context_parallel_refuses_tokens_its_group_cannot_split_and_a_shared_gpu(capsys, monkeypatch):
    from types import SimpleNamespace

    from diffusers import ContextParallelConfig

    from cos_core.cli import main
    from cos_core.capture.context_parallel import check_tokens

    expert = SimpleNamespace(_parallel_config=SimpleNamespace(context_parallel_config=ContextParallelConfig(
        ulysses_degree=2)))
    check_tokens(expert, 24)
    check_tokens(SimpleNamespace(), 7)  # no context parallelism: anything goes
    with pytest.raises(ValueError, match="splits each video's 7 tokens over 2 ranks"):
        check_tokens(expert, 7)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any process group is made
    assert main(["capture", "--model", "tiny:wan_t2v", "--ulysses-degree", "2", "--device", "cuda:0"]) == 2
    assert "NCCL needs one GPU per rank" in capsys.readouterr().err


def test_context_parallel_needs_a_matching_world(capsys):
    from cos_core.cli import main

    assert main(["capture", "--model", "tiny:wan_t2v", "--ulysses-degree", "2", "--device", "cpu"]) == 2
    assert "multiple of 2" in capsys.readouterr().err


@dataclass(frozen=True)
class ThreadRanks(Ranks):
    """A rank whose barrier is a threading.Barrier shared by the simulated ranks."""

    shared: threading.Barrier = field(default=None, compare=False)

    def barrier(self) -> None:
        self.shared.wait(timeout=120)


def _build():
    from cos_core.capture.tiny_pipelines import build_tiny

    return build_tiny("wan_t2v")  # seeds the global RNG: build in the main thread, never concurrently


def _capture(runs_dir: Path, run_id: str, seeds, ranks=None, fail_after: int | None = None, case=None):
    case = case or _build()
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    items = [WorkItem(sample_id=f"seed{s}", seed=s) for s in seeds]
    calls = []

    def score(item, final):
        calls.append(item.sample_id)
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt("simulated kill")
        return {"score_norm": float(np.abs(final).mean())}

    return capture_run(case.pipe, items, SPEC, runs_dir=runs_dir, run_id=run_id, call_kwargs=call,
                       source="tiny:wan_t2v", score=score, command=["test"], ranks=ranks or Ranks())


def _run_threads(runs_dir: Path, run_id: str, seeds, world: int, fail_rank: int | None = None):
    barrier = threading.Barrier(world)
    errors: dict[int, BaseException] = {}
    cases = [_build() for _ in range(world)]

    def work(rank):
        try:
            _capture(runs_dir, run_id, seeds, ThreadRanks(rank, world, shared=barrier),
                     fail_after=0 if rank == fail_rank else None, case=cases[rank])
        except BaseException as err:  # noqa: BLE001 - collected and re-checked by the test
            errors[rank] = err
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def assert_same_archive(a: Archive, b: Archive) -> None:
    assert a.n_samples == b.n_samples
    for i in range(a.n_samples):
        assert a.keys(i) == b.keys(i)
        for key in a.keys(i):
            np.testing.assert_array_equal(a.read(i, key), b.read(i, key), err_msg=key)
    assert a.samples.equals(b.samples)
    skip = PROVENANCE_KEYS
    assert {k: v for k, v in a.manifest.items() if k not in skip} == \
           {k: v for k, v in b.manifest.items() if k not in skip}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return Archive.open(_capture(root, "run", range(5)))


def test_three_ranks_with_an_uneven_split_equal_one_process(single, tmp_path):
    errors = _run_threads(tmp_path, "run", range(5), world=3)
    assert not errors, errors
    multi = Archive.open(tmp_path / "run")
    assert_same_archive(multi, single)
    from cos_core.analysis.analyze import analyze_run

    tables_multi, skipped_multi = analyze_run(multi, write=False)
    tables_single, skipped_single = analyze_run(single, write=False)
    assert tables_multi and skipped_multi == skipped_single
    assert tables_multi.keys() == tables_single.keys()
    for name, table in tables_multi.items():
        pd.testing.assert_frame_equal(table, tables_single[name], obj=name)


def test_a_killed_rank_is_resumed_by_rerunning_the_job(single, tmp_path):
    errors = _run_threads(tmp_path, "run", range(5), world=2, fail_rank=1)
    assert 1 in errors and isinstance(errors[1], KeyboardInterrupt)
    assert not (tmp_path / "run").exists(), "a run with a dead rank must not be published"
    partial = tmp_path / "run.partial" / "shards"
    written = {p.name: p.stat().st_mtime_ns for p in partial.glob("sample_*.safetensors")}
    assert written, "the ranks that got through should have left finished shards"
    errors = _run_threads(tmp_path, "run", range(5), world=2)
    assert not errors, errors
    final = tmp_path / "run"
    for name, mtime in written.items():
        assert (final / "shards" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten on resume"
    assert_same_archive(Archive.open(final), single)


@pytest.mark.slow
def test_real_torchrun_two_processes_on_gloo(single, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "--no-python", sys.executable, "-m", "cos_core.cli",
           "capture", "--model", "tiny:wan_t2v", "--seeds", "0,1,2", "--runs-dir", str(tmp_path),
           "--run-id", "multi", "--tokens", "1:2", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = tmp_path / "ref"
    out = subprocess.run([sys.executable, "-m", "cos_core.cli", "capture", "--model", "tiny:wan_t2v", "--seeds",
                          "0,1,2", "--runs-dir", str(tmp_path), "--run-id", "ref", "--tokens", "1:2",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = Archive.open(tmp_path / "multi"), Archive.open(ref)
    for i in range(3):
        for key in b.keys(i):
            np.testing.assert_array_equal(a.read(i, key), b.read(i, key), err_msg=key)
    assert a.samples.equals(b.samples)


@pytest.mark.slow
def test_real_torchrun_three_processes_capture_the_organism_like_one(tmp_path):
    """The shipped organism under torchrun on gloo: 3 ranks, 4 items (an uneven split), the same archive as one
    process (every tensor, the samples table with the task scores, the manifest up to provenance and timing)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["capture", "--task", "fork", "--instances", "2", "--seeds", "0,1", "--num-inference-steps", "4",
            "--device", "cpu", "--runs-dir", str(tmp_path), "--tensors", "x0_hat", "--tokens", "3:2"]
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=3", "--no-python", sys.executable, "-m",
                           "cos_core.cli", *args, "--run-id", "multi"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "cos_core.cli", *args, "--run-id", "ref"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    multi, ref = Archive.open(tmp_path / "multi"), Archive.open(tmp_path / "ref")
    assert multi.manifest["timing"]["world_size"] == 3 and multi.n_samples == 4
    assert "score_correct" in multi.samples
    assert_same_archive(multi, ref)
    # the same job as one context-parallel group: the organism's 3 attention heads split over 3 ranks (Ulysses)
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=3", "--no-python", sys.executable, "-m",
                           "cos_core.cli", *args, "--run-id", "cp", "--ulysses-degree", "3"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cp = Archive.open(tmp_path / "cp")
    assert cp.manifest["timing"]["context_parallel"] == 3
    assert_same_archive(cp, ref)


@pytest.mark.slow
def test_real_torchrun_context_parallel_groups_capture_like_one_process(tmp_path):
    """Four ranks on gloo as two data-parallel groups of two context-parallel ranks (diffusers' Ulysses attention
    splits every video's tokens in half): block outputs are gathered before capture, so the archive equals one
    process's, full tokens included, and each sample is written once."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["capture", "--model", "tiny:wan_t2v", "--seeds", "0:3", "--runs-dir", str(tmp_path), "--tokens", "1:2",
            "--device", "cpu"]
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=4", "--no-python", sys.executable, "-m",
                           "cos_core.cli", *args, "--run-id", "cp", "--ulysses-degree", "2"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "cos_core.cli", *args, "--run-id", "ref"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cp, ref = Archive.open(tmp_path / "cp"), Archive.open(tmp_path / "ref")
    assert cp.manifest["timing"]["context_parallel"] == 2 and cp.manifest["timing"]["world_size"] == 4
    assert cp.read(0, "tokens/block_out/L1/S2/cond").shape == ref.read(0, "tokens/block_out/L1/S2/cond").shape
    assert_same_archive(cp, ref)
