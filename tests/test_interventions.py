"""Interventions on a replayed tiny organism: noise at a step / frame, propagation map, layer swap, `cos intervene`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.cli import intervene as intervene_cli  # noqa: E402
from cos_core.experiments.interventions import (InterventionConfig, Job, mark_flips, noise_seed,  # noqa: E402
                                                partners, run_batch, run_interventions, summarise)
from cos_core.analysis.propagation import propagation_table  # noqa: E402
from cos_core.archive import publish_derived  # noqa: E402
from cos_core.experiments.replay import load_replay  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def model_dir(organism_run):
    return organism_run(task="fork", instances=3, seeds=(0, 1), steps=STEPS)[1]


@pytest.fixture(scope="module")
def replay(organism_run, model_dir):
    archive, _ = organism_run(task="fork", instances=3, seeds=(0, 1), steps=STEPS)
    return load_replay(archive, model_dir=model_dir)


def x0_steps(replay, jobs, **kwargs):
    """(step, job, C, F, H, W) x̂0 of every step, and the final latents."""
    seen = {}
    out = run_batch(replay, jobs, observe=lambda i, x0: seen.__setitem__(i, x0.clone().numpy()), **kwargs)
    return np.stack([seen[i] for i in range(replay.n_steps)]), out


def test_clean_jobs_reproduce_the_archive(replay):
    x0, out = x0_steps(replay, [Job(i) for i in range(len(replay.items))])
    for i in range(len(replay.items)):
        for step in range(STEPS):
            np.testing.assert_allclose(x0[step, i], replay.archive.tensor("x0_hat", sample=i, step=step), atol=1e-4)
    np.testing.assert_allclose(out.finals, x0[-1], atol=1e-5)  # x̂0 at the last step is the output


@pytest.mark.parametrize("step", [STEPS - 1, 2, 0])
def test_noise_at_a_step_leaves_earlier_steps_and_changes_that_one(replay, step):
    jobs = [Job(i) for i in range(2)]
    clean, _ = x0_steps(replay, jobs)
    noisy, out = x0_steps(replay, [Job(i, "noise_step", step, 1.0) for i in range(2)])
    np.testing.assert_allclose(noisy[:step], clean[:step], atol=1e-6)
    for s in range(step, STEPS):
        assert np.abs(noisy[s] - clean[s]).max() > 1e-3, f"step {s} unchanged after noise at step {step}"
    again, out2 = x0_steps(replay, [Job(i, "noise_step", step, 1.0) for i in range(2)])
    np.testing.assert_array_equal(out.finals, out2.finals)  # seeded per sample: reruns are identical


def test_noise_at_a_frame_replaces_that_frame_at_every_step_input(replay):
    frame, strength, base = 3, 1.0, 7
    jobs = [Job(i, "noise_frame", frame, strength) for i in (0, 1, 4)]
    inputs = {"clean": [], "noisy": []}

    def spy(name):
        def hook(module, args, kwargs):
            inputs[name].append(kwargs["hidden_states"][:, :3].clone())  # (B, C, F, H, W) latents entering a step
        return hook

    transformer = replay.pipe.transformer
    for name, batch in (("clean", [Job(j.sample) for j in jobs]), ("noisy", jobs)):
        handle = transformer.register_forward_pre_hook(spy(name), with_kwargs=True)
        try:
            run_batch(replay, batch, seed_base=base)
        finally:
            handle.remove()
    assert len(inputs["noisy"]) == STEPS
    others = [f for f in range(inputs["clean"][0].shape[2]) if f != frame]
    torch.testing.assert_close(inputs["noisy"][0][:, :, others], inputs["clean"][0][:, :, others], rtol=0, atol=0)
    for row, job in enumerate(jobs):  # with λ = 1 the frame entering step k is exactly the k-th ε draw
        gen = torch.Generator().manual_seed(noise_seed(base, job.sample, "noise_frame"))
        for step in range(STEPS):
            eps = torch.randn(tuple(inputs["noisy"][step][row, :, frame].shape), generator=gen)
            torch.testing.assert_close(inputs["noisy"][step][row, :, frame], eps, rtol=0, atol=0)
    assert (inputs["noisy"][1][:, :, others] - inputs["clean"][1][:, :, others]).abs().max() > 1e-4


def test_layer_swap_with_itself_changes_nothing_and_with_a_partner_changes_the_output(replay):
    n = len(replay.items)
    keep = [(layer, 0) for layer in range(len(replay.pipe.transformer.blocks))]
    clean = run_batch(replay, [Job(i) for i in range(n)], keep=keep)
    sources = {(i, layer, step, branch): t[i] for (layer, step, branch), t in clean.kept.items() for i in range(n)}
    self_swap = run_batch(replay, [Job(i, "layer_swap", 1, 0.0, 0, i) for i in range(n)], sources=sources)
    np.testing.assert_allclose(self_swap.finals, clean.finals, atol=1e-5)
    pair = partners(replay.items)
    assert [replay.items[p].seed for p in pair] == [it.seed for it in replay.items]
    assert all(replay.items[p].instance != it.instance for p, it in zip(pair, replay.items))
    swapped = run_batch(replay, [Job(i, "layer_swap", 1, 0.0, 0, pair[i]) for i in range(n)], sources=sources)
    assert np.abs(swapped.finals - clean.finals).max() > 1e-3


@pytest.mark.parametrize("delta", [False, True])
def test_whole_output_swaps_are_the_same_at_every_layer_and_update_swaps_are_not(replay, delta):
    """Why `swap="update"` is the default: the organism's scene enters only through the input tokens, so carrying a
    block's whole output from scene B makes every later block compute B's step, whichever layer was swapped; carrying
    only its residual update (A's input + B's update) leaves the layers distinguishable, and a self-swap still
    changes nothing."""
    n, n_layers = len(replay.items), len(replay.pipe.transformer.blocks)
    keep = [(layer, 0) for layer in range(n_layers)]
    clean = run_batch(replay, [Job(i) for i in range(n)], keep=keep, delta=delta)
    sources = {(i, layer, step, branch): t[i] for (layer, step, branch), t in clean.kept.items() for i in range(n)}
    pair = partners(replay.items)
    finals = [run_batch(replay, [Job(i, "layer_swap", layer, 0.0, 0, pair[i]) for i in range(n)], sources=sources,
                        delta=delta).finals for layer in range(n_layers)]
    spread = max(np.abs(f - finals[0]).max() for f in finals[1:])
    assert (spread > 1e-3) if delta else (spread < 1e-5)
    self_swap = run_batch(replay, [Job(i, "layer_swap", 0, 0.0, 0, i) for i in range(n)], sources=sources,
                          delta=delta)
    np.testing.assert_allclose(self_swap.finals, clean.finals, atol=1e-5)


def test_self_swap_flips_nothing_in_the_tables(replay, monkeypatch):
    monkeypatch.setattr("cos_core.experiments.interventions.partners", lambda items: list(range(len(items))))
    tables = run_interventions(replay, InterventionConfig(which=("layer_swap",), n_boot=50))
    summary = tables["interventions"]
    assert set(summary["kind"]) == {"layer_swap"} and (summary["value"] == 0).all()
    assert (summary["metric"] == "flip_rate").all()
    assert (summary["adopt_rate"] == 0).all()  # keeping its own answer is no adoption


def test_flips_adoptions_and_the_summary_by_hand():
    key = {0: '"a"', 1: '"b"', 2: None, 3: '"a"'}
    clean = [dict(kind="clean", position=-1, step=-1, sample=i, partner=-1, answer_key=key[i], correct=i != 2,
                  score=1.0, instance=str(i // 2), strength=0.0) for i in range(4)]
    swap = [dict(kind="layer_swap", position=5, step=0, sample=i, partner=(i + 2) % 4, answer_key=k, correct=True,
                 score=0.5, instance=str(i // 2), strength=0.0) for i, k in enumerate(['"a"', '"a"', '"b"', None])]
    table = mark_flips(pd.DataFrame(clean + swap))
    rows = table[table["kind"] == "layer_swap"]
    assert rows["flipped"].tolist() == [False, True, True, True]  # 0 kept "a"; 3 became unreadable
    assert rows["adopted"].tolist() == [False, True, False, False]  # partners answered None, "a", "a", "b"
    table.loc[4, "answer_key"] = None  # sample 0 now flips to unreadable; its partner's None is no adoption
    assert mark_flips(table.drop(columns=["flipped", "adopted"]))["adopted"].tolist()[4:] == [False, True, False, False]
    summary = summarise(table, n_boot=200).iloc[0]
    assert summary["value"] == summary["flip_rate"] == 0.75 and summary["baseline"] == 0.75
    assert summary["n"] == 4 and summary["n_instances"] == 2 and summary["ci_low"] <= 0.75 <= summary["ci_high"]


def test_hooks_are_removed_even_when_the_run_raises(replay):
    transformer = replay.pipe.transformer
    bad = {(1, 1, 0, "cond"): torch.zeros(3, 5)}  # the wrong token shape
    with pytest.raises(ValueError, match="equal token shapes"):
        run_batch(replay, [Job(0, "layer_swap", 1, 0.0, 0, 1)], sources=bad, means=True)
    assert all(not block._forward_hooks for block in transformer.blocks)
    assert "cache_context" not in vars(transformer)


def test_propagation_of_no_noise_is_zero_and_of_full_noise_is_positive(replay):
    zero = run_interventions(replay, InterventionConfig(which=("propagation",), steps=(1,), propagation_strength=0.0))
    table = zero["propagation"]
    assert set(zero) == {"propagation"}
    assert sorted(table["measure_step"].unique()) == [1, 2, 3] and set(table["layer"]) == {-1, 0, 1}
    np.testing.assert_allclose(table["dissimilarity"], 0.0, atol=1e-6)
    full = run_interventions(replay, InterventionConfig(which=("propagation",), steps=(1,), propagation_strength=1.0))
    table = full["propagation"]
    at_inject = table[(table["measure_step"] == 1) & (table["layer"] == -1)]["dissimilarity"]
    assert len(at_inject) == 1 and at_inject.iloc[0] > 1e-3
    assert json.loads(table.attrs["cos_config"])["config"]["steps"] == [1]


def test_propagation_table_matches_cka_by_hand_and_refuses_few_samples():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(6, 3, 2, 5))
    perturbed = clean.copy()
    perturbed[:, 2, 1] = rng.normal(size=(6, 5))  # only step 2, layer 1 changes
    table = propagation_table(clean, {1: perturbed}).set_index(["measure_step", "layer"])["dissimilarity"]
    assert abs(table[(1, -1)]) < 1e-12 and abs(table[(2, 0)]) < 1e-12 and table[(2, 1)] > 0.05
    assert table[(2, -1)] == pytest.approx(table[(2, 1)] / 2)
    with pytest.raises(ValueError, match=">= 4"):
        propagation_table(clean[:3], {0: perturbed[:3]})


def cli(replay, model_dir, *argv):
    argv = [str(replay.archive.path), "--model-dir", str(model_dir), "--device", "cpu", *argv]
    p = argparse.ArgumentParser()
    intervene_cli.add_arguments(p)
    args = p.parse_args(argv)
    args._argv = ["intervene", *argv]  # what `cos` records
    return intervene_cli.run(args)


def test_cli_writes_the_documented_tables(replay, model_dir, capsys):
    argv = ["--steps", "0,3", "--frames", "2", "--layers", "1", "--batch-size", "5"]
    assert cli(replay, model_dir, *argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = len(replay.items)
    # samples: clean + 2 noise steps + 1 frame + 1 layer; propagation: (4 + 1 measure steps) x (2 layers + mean)
    assert summary["written"] == {"interventions_samples": n * 5, "interventions": 4, "propagation": (4 + 1) * 3}
    table = replay.archive.derived("interventions")
    assert {"kind", "position", "value", "ci_low", "ci_high", "n", "baseline", "metric", "mean_score",
            "flip_rate", "adopt_rate", "step"} <= set(table.columns)
    assert sorted(zip(table["kind"], table["position"])) == [("layer_swap", 1), ("noise_frame", 2),
                                                             ("noise_step", 0), ("noise_step", 3)]
    assert ((table["ci_low"] <= table["value"]) & (table["value"] <= table["ci_high"])).all()
    samples = replay.archive.derived("interventions_samples")
    assert {"kind", "position", "sample", "correct", "answer_key", "flipped"} <= set(samples.columns)
    clean = samples[samples["kind"] == "clean"].sort_values("sample")
    assert (clean["correct"].to_numpy() == replay.archive.samples["score_correct"].to_numpy()).all()
    propagation = replay.archive.derived("propagation")
    assert {"inject_step", "measure_step", "dissimilarity", "n", "layer"} <= set(propagation.columns)
    config = json.loads(table.attrs["cos_config"])
    assert config["command"][:2] == ["cos", "intervene"] and "--steps" in config["command"]
    assert config["config"]["frames"] == [2] and config["table"] == "interventions"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "4"], r"steps \[4\] out of range"),
    (["--frames", "8"], r"frames \[8\] out of range"),
    (["--layers", "0,2"], r"layers \[2\] out of range"),
    (["--which", "noise"], "noise_step"),
    (["--strength", "1.5"], r"\[0, 1\]"),
    (["--instances", "1", "--which", "propagation"], ">= 4 samples"),
])
def test_cli_refuses_bad_input_and_keeps_existing_tables(replay, model_dir, argv, message):
    sentinel = pd.DataFrame({"kind": ["noise_step"], "position": [0], "value": [0.5]})
    publish_derived(replay.archive, {"interventions": sentinel}, producer="test")
    path = replay.archive.path / "derived" / "interventions.parquet"
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        cli(replay, model_dir, *argv)
    assert path.read_bytes() == before
