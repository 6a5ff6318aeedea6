"""The latent ensemble: merge operators against their formulas and the plain run, the noise-mean control, the
wrapper's clean-up, the tables and `cos ensemble`'s refusals (tiny random organism from conftest's organism_run)."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.experiments.ensemble import EnsembleConfig, member_items, run_ensemble  # noqa: E402
from cos_core.experiments.merge import (  # noqa: E402
    MERGES, MergeSpec, group_mean, merged_capture, merged_steps, noise_mean_start)
from cos_core.experiments.replay import load_replay  # noqa: E402

ATOL = 1e-5  # batches of different sizes may take different kernels, and a mean of 3 equal floats can round


@pytest.fixture(scope="module")
def replay(organism_run):
    archive, model_dir = organism_run()
    return load_replay(archive, model_dir=model_dir)


def flow_scheduler(steps: int = 4):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def step_trace(replay, items, latents, **kwargs):
    """Final latents and the latents after every step (step, B, C, F, H, W)."""
    trace = []

    def record(pipe, i, t, tensors):
        trace.append(tensors["latents"].float().clone())
        return {}

    final = replay.run(items, latents=latents, callback=record, **kwargs)
    return final, torch.stack(trace)


@pytest.mark.parametrize("method", MERGES)
def test_operators_match_their_formulas_on_the_scheduler(method):
    torch.manual_seed(0)
    scheduler = flow_scheduler(4)
    x, v = torch.randn(4, 3, 2, 4, 4), torch.randn(4, 3, 2, 4, 4)  # two groups of n=2
    with merged_steps(scheduler, method, k=2, n=2):
        for i, t in enumerate(scheduler.timesteps):
            sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
            euler = x + (sigma_next - sigma) * v
            if i >= 2:
                expected = euler
            elif method == "mean_x_t":
                expected = group_mean(euler, 2)
            elif method == "mean_v_hat":
                expected = x + (sigma_next - sigma) * group_mean(v, 2)
            else:
                expected = (1 - sigma_next) * group_mean(x - sigma * v, 2) + sigma_next * (x + (1 - sigma) * v)
            x_next = scheduler.step(v, t, x, return_dict=False)[0]
            torch.testing.assert_close(x_next, expected, atol=1e-6, rtol=1e-6)
            x, v = x_next, torch.randn_like(v)
    assert "step" not in vars(scheduler)


@pytest.mark.parametrize("method", MERGES)
def test_copies_of_one_seed_equal_that_seeds_plain_run(replay, method):
    item = replay.items[0]
    plain = replay.run([item])  # (1, C, F, H, W)
    copies = [item] * 3
    with merged_steps(replay.pipe.scheduler, method, k=replay.n_steps, n=3):
        merged = replay.run(copies)
    for m in range(3):
        np.testing.assert_allclose(merged[m], plain[0], atol=ATOL)


@pytest.mark.parametrize("method", MERGES)
def test_k0_leaves_every_member_on_its_plain_run(replay, method):
    items = member_items(replay, [int(replay.items[0].instance)], 3, seed_base=0)
    plain = replay.run(items)
    with merged_steps(replay.pipe.scheduler, method, k=0, n=3):
        merged = replay.run(items)
    np.testing.assert_array_equal(merged, plain)
    np.testing.assert_allclose(merged[:1], replay.run(items[:1]), atol=ATOL)


def test_mean_x_t_makes_members_identical_and_keeps_groups_apart(replay):
    instances = sorted({int(it.instance) for it in replay.items})[:2]
    items = member_items(replay, instances, 2, seed_base=0)
    noise = replay.noise([it.seed for it in items])
    with merged_steps(replay.pipe.scheduler, "mean_x_t", k=2, n=2):
        final, trace = step_trace(replay, items, noise)
    for step in (0, 1):
        torch.testing.assert_close(trace[step, 0], trace[step, 1], atol=0, rtol=0)
        torch.testing.assert_close(trace[step, 2], trace[step, 3], atol=0, rtol=0)
    assert (trace[1, 0] - trace[1, 2]).abs().max() > 1e-3, "groups of different instances must not mix"
    np.testing.assert_allclose(final[0], final[1], atol=ATOL)  # identical from step 1 on, deterministic after
    _, unmerged = step_trace(replay, items, noise)
    assert (unmerged[0, 0] - unmerged[0, 1]).abs().max() > 1e-2


def test_mean_v_hat_keeps_member_differences_while_merging(replay):
    items = member_items(replay, [int(replay.items[0].instance)], 2, seed_base=0)
    noise = replay.noise([it.seed for it in items])
    k = 2
    with merged_steps(replay.pipe.scheduler, "mean_v_hat", k=k, n=2):
        _, trace = step_trace(replay, items, noise)
    start = noise[0] - noise[1]
    for step in range(k):
        torch.testing.assert_close(trace[step, 0] - trace[step, 1], start, atol=ATOL, rtol=0)
    later = trace[k, 0] - trace[k, 1]  # the first unmerged step changes the difference again
    assert (later - start).abs().max() > 1e-3


def test_noise_mean_start_has_std_one_over_sqrt_n(replay):
    for n in (1, 4, 8):
        noise = replay.noise(range(100, 100 + 4 * n))  # 4 groups of n
        start = noise_mean_start(noise, n)
        assert start.shape == (4, *noise.shape[1:])
        torch.testing.assert_close(start[1], noise[n:2 * n].mean(0))
        assert abs(float(start.std()) - 1 / np.sqrt(n)) < 0.02, (n, float(start.std()))


def test_wrapper_is_removed_even_when_the_call_raises(replay):
    scheduler = replay.pipe.scheduler

    def boom(pipe, i, t, tensors):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        with merged_steps(scheduler, "mean_x0_hat", k=2, n=1):
            replay.run(replay.items[:1], callback=boom)
    assert "step" not in vars(scheduler)
    outer = scheduler.step = lambda *a, **kw: type(scheduler).step(scheduler, *a, **kw)  # another tool's wrapper
    try:
        with merged_steps(scheduler, "mean_x_t", k=1, n=1):
            assert scheduler.step is not outer
        assert scheduler.step is outer
    finally:
        del scheduler.step


def test_refuses_schedulers_without_flow_matching_euler():
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        with merged_steps(EulerDiscreteScheduler(), "mean_x_t", k=1, n=2):
            pass
    with pytest.raises(ValueError, match="stochastic_sampling"):
        with merged_steps(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "mean_x_t", k=1, n=2):
            pass
    with pytest.raises(ValueError, match="allowed"):
        with merged_steps(flow_scheduler(), "median", k=1, n=2):
            pass


@pytest.fixture(scope="module")
def choice_replay(organism_run):
    archive, model_dir = organism_run(task="choice")  # the random organism's choice answers are readable
    return load_replay(archive, model_dir=model_dir)


@pytest.fixture(scope="module")
def sweep(choice_replay):
    config = EnsembleConfig(ks=(0, 1, 2), ns=(1, 2), batch_size=3)
    return run_ensemble(choice_replay, config)


def test_sweep_tables_are_consistent_and_intervals_hold_the_accuracy(choice_replay, sweep):
    table, samples = sweep
    replay, archive = choice_replay, choice_replay.archive
    n_inst = archive.samples["instance"].nunique()
    keys = set(zip(table["method"], table["k"], table["n"]))
    assert keys == ({("none", 0, 1), ("noise_mean", 0, 1), ("noise_mean", 0, 2)}
                    | {(m, k, n) for m in MERGES for k in (0, 1, 2) for n in (1, 2)})
    assert (table["n_instances"] == n_inst).all() and len(samples) == len(table) * n_inst
    assert ((table["ci_low"] <= table["accuracy"] + 1e-12) & (table["accuracy"] <= table["ci_high"] + 1e-12)).all()
    assert ((table["gain_ci_low"] <= table["gain"] + 1e-12) & (table["gain"] <= table["gain_ci_high"] + 1e-12)).all()
    none_acc = table.loc[table["method"] == "none", "accuracy"].item()
    np.testing.assert_allclose(table["gain"], table["accuracy"] - none_acc, atol=1e-12)
    # the baseline is the archive's seed-0 samples, re-run
    seed0 = archive.samples[archive.samples["seed"] == 0]
    seed0 = seed0.set_index(seed0["instance"].astype(int))
    base = samples[samples["method"] == "none"].set_index("instance")
    assert (base["correct"] == seed0.loc[base.index, "score_correct"].astype(bool)).all()
    np.testing.assert_allclose(base["score"], seed0.loc[base.index, "score_score"], atol=1e-4)
    assert base["answer_key"].notna().any()
    # K = 0 and n = 1 rows are member 0's plain run; merging mean_x_t ends with identical members
    for (m, k, n), part in samples.groupby(["method", "k", "n"]):
        if k == 0 and m != "noise_mean" or n == 1:
            assert (part.set_index("instance")["answer_key"].fillna("-") == base["answer_key"].fillna("-")).all()
    row = table.set_index(["method", "k", "n"])
    merged = samples[(samples["method"] == "mean_x_t") & (samples["k"] == 2) & (samples["n"] == 2)]
    readable = merged["answer_key"].notna().mean()  # identical members agree unless the answer is unreadable
    assert row.loc[("mean_x_t", 2, 2), "member_agreement"] == pytest.approx(readable)
    assert np.isnan(row.loc[("none", 0, 1), "member_agreement"])
    assert np.isnan(row.loc[("noise_mean", 0, 2), "member_agreement"])
    assert set(table["num_inference_steps"]) == {replay.n_steps} and set(table["task"]) == {"choice"}


def test_agreement_counts_other_members_with_member_0s_readable_answer():
    from cos_core.experiments.ensemble import _row

    def inst(*keys):
        return {"instance": 7, "scores": [{"correct": True, "score": 1.0, "answer_key": k} for k in keys]}

    assert _row(inst("a", "a", "b", None), "mean_v_hat", 1, 4)["agreement"] == pytest.approx(1 / 3)
    assert _row(inst("a", "a", "b", None), "mean_v_hat", 1, 2)["agreement"] == 1.0
    assert _row(inst(None, None), "mean_v_hat", 1, 2)["agreement"] == 0.0  # no answer is no agreement
    assert np.isnan(_row(inst("a"), "none", 0, 1)["agreement"])


def test_config_refuses_bad_values():
    for bad in (dict(methods=("mean_x_t", "median")), dict(ns=(0, 2)), dict(ks=(-1,)), dict(batch_size=2, ns=(4,)),
                dict(steps=0), dict(instances=0)):
        with pytest.raises(ValueError):
            EnsembleConfig(**bad)
    with pytest.raises(ValueError, match="exceed"):
        EnsembleConfig(ks=(0, 9)).check_steps(4)


def cli_args(run, model_dir, *extra):
    from cos_core.cli import ensemble as ensemble_cli

    parser = argparse.ArgumentParser()
    ensemble_cli.add_arguments(parser)
    args = parser.parse_args([str(run), "--model-dir", str(model_dir), "--device", "cpu", *extra])
    args._argv = ["ensemble", str(run), *extra]
    return ensemble_cli, args


def test_cli_writes_both_tables_and_refuses_bad_input_without_touching_them(organism_run, tmp_path, capsys):
    archive, model_dir = organism_run()
    run = tmp_path / archive.run_id
    shutil.copytree(archive.path, run)
    cli, args = cli_args(run, model_dir, "--k", "0,1", "--n", "1,2", "--methods", "mean_x0_hat,noise_mean",
                         "--instances", "2", "--first-instance", "5", "--steps", "2")
    assert cli.run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == {"ensemble": 7, "ensemble_samples": 14} and summary["steps"] == 2
    table = pd.read_parquet(run / "derived" / "ensemble.parquet")
    assert list(table.columns[:7]) == ["method", "k", "n", "accuracy", "ci_low", "ci_high", "n_instances"]
    assert {"gain", "gain_ci_low", "gain_ci_high", "mean_score", "unreadable", "member_agreement",
            "num_inference_steps", "task"} <= set(table.columns)
    samples = pd.read_parquet(run / "derived" / "ensemble_samples.parquet")
    assert {"instance", "method", "k", "n", "correct", "score", "answer_key"} <= set(samples.columns)
    from cos_core.tasks import TEST_SEEDS

    assert set(samples["instance"]) == {TEST_SEEDS[5], TEST_SEEDS[6]}
    record = json.loads(table.attrs["cos_config"])
    assert record["command"][:2] == ["cos", "ensemble"] and "--first-instance" in record["command"]
    assert record["config"]["steps"] == 2 and record["instances"] == [TEST_SEEDS[5], TEST_SEEDS[6]]
    before = {p.name: p.read_bytes() for p in (run / "derived").iterdir()}

    bad_runs = [("--methods", "median"), ("--n", "0,2"), ("--k", "0,3"), ("--k", "1,x"), ("--first-instance", "3"),
                ("--batch-size", "1")]
    for flag, value in bad_runs:
        cli, args = cli_args(run, model_dir, "--steps", "2", flag, value)
        with pytest.raises(ValueError):
            cli.run(args)
    other = tmp_path / "not-organism"
    shutil.copytree(archive.path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["source"] = "tiny:wan"
    (other / "manifest.json").write_text(json.dumps(manifest))
    cli, args = cli_args(other, model_dir)
    with pytest.raises(ValueError, match="organism"):
        cli.run(args)
    assert {p.name: p.read_bytes() for p in (run / "derived").iterdir()} == before


# ---- `cos capture --ensemble`: an ensemble's member 0 captured as an archive ------------------------------------
def _ensemble_capture(organism_run, tmp_path, ensemble: str | None, instances: int = 2):
    from cos_core.archive import Archive
    from cos_core.capture import CaptureSpec
    from cos_core.capture.run import capture_run
    from cos_core.capture.sources import SourceConfig, organism_source

    _, model_dir = organism_run()
    merge = MergeSpec.parse(ensemble) if ensemble else None
    config = SourceConfig(task="fork", instances=instances, num_inference_steps=4, members=merge.n if merge else None)
    src = organism_source(config, device="cpu", dtype=torch.float32, seeds=[0], model_dir=model_dir)
    src = merged_capture(src, merge) if merge else src
    spec = CaptureSpec(reductions=("frame_mean",), tensors=("x_t", "x0_hat"), tokens=((1, 2),))
    with src.around():
        path = capture_run(src.pipe, src.items, spec, runs_dir=tmp_path, run_id=src.default_run_id,
                           call_kwargs=src.call_kwargs, source=src.label, score=src.score, extra=src.extra,
                           members=src.members, command=["cos", "capture"])
    return Archive.open(path)


def test_an_ensemble_of_one_captures_exactly_the_plain_run(organism_run, tmp_path):
    plain = _ensemble_capture(organism_run, tmp_path, None)
    alone = _ensemble_capture(organism_run, tmp_path, "mean_x_t:2:1")
    assert alone.manifest["config"]["ensemble"]["n"] == 1 and "ensemble" not in plain.manifest["config"]
    for i in range(plain.n_samples):
        for key in plain.keys(i):
            np.testing.assert_array_equal(alone.read(i, key), plain.read(i, key), err_msg=key)


@pytest.mark.parametrize("method", MERGES)
def test_the_captured_member_is_the_ensembles_member_zero(organism_run, tmp_path, replay, method):
    archive = _ensemble_capture(organism_run, tmp_path, f"{method}:2:3")
    instances = [int(i) for i in archive.samples["instance"]]
    items = member_items(replay, instances, 3, seed_base=0)
    with merged_steps(replay.pipe.scheduler, method, k=2, n=3):
        final, trace = step_trace(replay, items, replay.noise([it.seed for it in items]))
    for j in range(len(instances)):
        np.testing.assert_allclose(archive.read(j, "final"), final[3 * j], atol=ATOL)
        # x_t recorded at step s is the latent entering it: the merged latent after step s - 1
        np.testing.assert_allclose(archive.read(j, "x_t")[1:], trace[:-1, 3 * j].numpy(), atol=ATOL)
        assert archive.read(j, "tokens/block_out/L1/S2/cond").ndim == 4
    plain = _ensemble_capture(organism_run, tmp_path / "plain", None)
    assert np.abs(archive.read(0, "x_t")[2] - plain.read(0, "x_t")[2]).max() > 1e-3, "merging changed nothing"
    scored = [replay.score(it, final[3 * j]) for j, it in enumerate(items[::3])]
    assert list(archive.samples["score_correct"].astype(bool)) == [s["correct"] for s in scored]


def test_an_ensemble_archive_is_not_replayed_as_a_plain_run(organism_run, tmp_path):
    archive = _ensemble_capture(organism_run, tmp_path, "mean_x_t:1:2")
    with pytest.raises(ValueError, match="captured member 0 of latent ensembles \\(mean_x_t, K=1, n=2\\)"):
        load_replay(archive, model_dir=organism_run()[1])


def test_capture_refuses_a_bad_ensemble(capsys):
    from cos_core.cli import main

    for flag, message in (("mean_x_t:2", "must be METHOD:K:N"), ("median:2:2", "METHOD one of"),
                          ("mean_x_t:9:2", "merges 9 steps of only 4")):
        assert main(["capture", "--task", "fork", "--num-inference-steps", "4", "--ensemble", flag,
                     "--device", "cpu", "--runs-dir", "/nonexistent/runs"]) == 2
        assert message in capsys.readouterr().err
    assert main(["capture", "--model", "tiny:wan_t2v", "--ensemble", "mean_x_t:1:2", "--device", "cpu"]) == 2
    assert "drop --model" in capsys.readouterr().err
