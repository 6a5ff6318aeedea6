"""Interventions on a replayed tiny organism: noise at a step / frame off and on the data distribution, the batch
planner and per-sample noise, the layer swap, propagation distances, the commitment table and `cos intervene`."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.analysis.commitment import commitment_table  # noqa: E402
from cos_core.analysis.propagation import propagation_table  # noqa: E402
from cos_core.archive import publish_derived  # noqa: E402
from cos_core.cli import intervene as intervene_cli  # noqa: E402
from cos_core.experiments.batch import Job, plan_batches, run_batch  # noqa: E402
from cos_core.experiments.interventions import (InterventionConfig, mark_flips, partners,  # noqa: E402
                                                run_interventions, summarise)
from cos_core.experiments.noise import counter_normal, noise_key  # noqa: E402
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
    """(step, job, C, F, H, W) x̂0 of every step, and the batch result."""
    seen = {}
    out = run_batch(replay, jobs, observe=lambda i, x0: seen.__setitem__(i, x0.clone().numpy()), **kwargs)
    return np.stack([seen[i] for i in range(replay.n_steps)]), out


def step_inputs(replay, jobs, **kwargs):
    """The latents entering every step (step, job, C, F, H, W), read off the transformer's input."""
    inputs = []

    def spy(module, args, kwargs_):
        inputs.append(kwargs_["hidden_states"][:, :3].clone())  # (B, C, F, H, W): x_t without the condition

    handle = replay.pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = run_batch(replay, jobs, **kwargs)
    finally:
        handle.remove()
    return torch.stack(inputs), out


def test_clean_jobs_reproduce_the_archive(replay):
    x0, out = x0_steps(replay, [Job(i) for i in range(len(replay.items))])
    for i in range(len(replay.items)):
        for step in range(STEPS):
            np.testing.assert_allclose(x0[step, i], replay.archive.tensor("x0_hat", sample=i, step=step), atol=1e-4)
    np.testing.assert_allclose(out.finals, x0[-1], atol=1e-5)  # x̂0 at the last step is the output


def test_counter_noise_is_per_row_whatever_the_batch_and_looks_standard_normal():
    keys = torch.tensor([noise_key(0, s, "renoise_step") for s in range(6)])
    whole = counter_normal(keys, 3, (3, 8, 4), "cpu")
    torch.testing.assert_close(counter_normal(keys[[4, 1]], 3, (3, 8, 4), "cpu"), whole[[4, 1]], rtol=0, atol=0)
    assert not torch.equal(counter_normal(keys, 4, (3, 8, 4), "cpu"), whole)  # another step, another draw
    big = counter_normal(torch.arange(200), 0, (2000,), "cpu")
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    assert abs(float((big > 1.96).float().mean()) - 0.025) < 0.003
    corr = np.corrcoef(big.numpy())
    assert np.abs(corr - np.eye(200)).max() < 0.12  # rows independent (|r| < 5.4 standard errors of 1/√2000)


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
    frame, base = 3, 7
    jobs = [Job(i, "noise_frame", frame, 1.0) for i in (0, 1, 4)]
    clean, _ = step_inputs(replay, [Job(j.sample) for j in jobs], seed_base=base)
    noisy, _ = step_inputs(replay, jobs, seed_base=base)
    others = [f for f in range(clean.shape[3]) if f != frame]
    torch.testing.assert_close(noisy[0][:, :, others], clean[0][:, :, others], rtol=0, atol=0)
    keys = torch.tensor([noise_key(base, j.sample, "noise_frame") for j in jobs])
    for step in range(STEPS):  # with λ = 1 the frame entering step k is exactly the k-th draw of each row
        eps = counter_normal(keys, step, noisy.shape[2:3] + noisy.shape[4:], "cpu")
        torch.testing.assert_close(noisy[step][:, :, frame], eps, rtol=0, atol=0)
    assert (noisy[1][:, :, others] - clean[1][:, :, others]).abs().max() > 1e-4


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_renoise_keeps_the_previous_x0_and_redraws_a_fraction_of_the_noise(replay, strength):
    """On-distribution: the latent entering step s is (1−σ)·x̂0(s−1) + σ·(√(1−λ)·ε̂ + √λ·ε′); ε̂ is the noise the
    clean Euler step implies, so λ = 0 is the clean run and λ = 1 keeps nothing but x̂0."""
    step, rows = 2, [0, 3]
    clean_in, _ = step_inputs(replay, [Job(i) for i in rows])
    clean_x0, _ = x0_steps(replay, [Job(i) for i in rows])
    noisy_in, _ = step_inputs(replay, [Job(i, "renoise_step", step, strength) for i in rows])
    sigma = replay.sigmas()[step]
    torch.testing.assert_close(noisy_in[:step], clean_in[:step], rtol=0, atol=0)
    x0 = torch.from_numpy(clean_x0[step - 1])
    implied = (clean_in[step] - (1 - sigma) * x0) / sigma
    eps = counter_normal(torch.tensor([noise_key(0, i, "renoise_step") for i in rows]), step,
                         tuple(x0.shape[1:]), "cpu")
    expected = (1 - sigma) * x0 + sigma * (np.sqrt(1 - strength) * implied + np.sqrt(strength) * eps)
    torch.testing.assert_close(noisy_in[step], expected, atol=1e-5, rtol=1e-5)
    if strength == 0.0:
        torch.testing.assert_close(noisy_in, clean_in, atol=1e-5, rtol=1e-5)


def test_a_propagation_run_is_the_renoise_run_of_its_strength(replay):
    propagated = run_batch(replay, [Job(2), Job(2, "propagation", 1, 0.5)])
    renoised = run_batch(replay, [Job(2, "renoise_step", 1, 0.5)])
    np.testing.assert_allclose(propagated.finals[1], renoised.finals[0], atol=1e-5)
    assert propagated.token_dist[1, 1:].min() > 0 and np.isnan(propagated.token_dist[0]).all()


def test_renoise_at_a_frame_changes_only_that_frame_of_the_first_input(replay):
    clean, _ = step_inputs(replay, [Job(0)])
    noisy, _ = step_inputs(replay, [Job(0, "renoise_frame", 5, 1.0)])
    changed = (noisy[0] - clean[0]).abs().amax(dim=(0, 1, 3, 4))  # (frame,)
    assert changed[5] > 0.1 and float(changed[[f for f in range(len(changed)) if f != 5]].max()) == 0.0


def test_a_job_gives_the_same_video_alone_and_in_a_mixed_batch(replay):
    job = Job(1, "renoise_step", 1, 0.5)
    alone = run_batch(replay, [job]).finals[0]
    mixed = run_batch(replay, [Job(0, "noise_frame", 2, 1.0), Job(2), job, Job(3, "noise_step", 2, 0.25)]).finals[2]
    np.testing.assert_allclose(mixed, alone, atol=1e-5)


def test_plan_batches_puts_every_job_beside_the_clean_rows_it_reads():
    jobs = [Job(i) for i in range(5)] + [Job(i, "propagation", s, 0.5) for i in range(5) for s in range(3)]
    jobs += [Job(i, "layer_swap", 1, 0.0, 0, (i + 1) % 5) for i in range(5)] + [Job(0, "noise_step", 1, 1.0)]
    batches = plan_batches(jobs, 4)
    assert all(len(b) <= 4 for b in batches)
    for batch in batches:
        clean = {j.sample for j in batch if j.kind == "clean"}
        assert all(set(j.needs()) <= clean for j in batch)
    ran = [j for b in batches for j in b if j.kind != "clean"]
    assert ran == [j for j in jobs if j.kind != "clean"]  # every job once, in order
    assert {j.sample for b in batches for j in b if j.kind == "clean"} == set(range(5))
    with pytest.raises(ValueError, match="batch_size 1"):
        plan_batches(jobs, 1)


def swap_finals(replay, jobs, carry="update"):
    """Finals of `jobs` (layer swaps etc.) run in batches with their donors' clean rows, in job order."""
    out = {}
    for batch in plan_batches(jobs, 16):
        res = run_batch(replay, [j if j.kind == "clean" else Job(**{**j.__dict__, "carry": carry}) for j in batch])
        for job, final in zip(batch, res.finals):
            if job.kind != "clean":
                out[job] = final
    return np.stack([out[j] for j in jobs])


def test_layer_swap_with_itself_changes_nothing_and_with_a_partner_changes_the_output(replay):
    n = len(replay.items)
    clean = run_batch(replay, [Job(i) for i in range(n)]).finals
    self_swap = swap_finals(replay, [Job(i, "layer_swap", 1, 0.0, 0, i) for i in range(n)])
    np.testing.assert_allclose(self_swap, clean, atol=1e-5)
    pair = partners(replay.items)
    assert [replay.items[p].seed for p in pair] == [it.seed for it in replay.items]
    assert all(replay.items[p].instance != it.instance for p, it in zip(pair, replay.items))
    swapped = swap_finals(replay, [Job(i, "layer_swap", 1, 0.0, 0, pair[i]) for i in range(n)])
    assert np.abs(swapped - clean).max() > 1e-3


def test_under_per_instance_noise_partners_and_held_out_instances_follow_the_seed_index(replay):
    """A per-instance-noise archive (manifest config.noise): the layer-swap partner has the same `--seeds` value, and
    `--instances` builds each held-out instance x seed with its own noise seed (not the archive's seeds crossed
    with every instance)."""
    import types

    from cos_core.capture.sources import instance_noise_seed
    from cos_core.experiments.interventions import with_instances

    own = [dataclasses.replace(it, seed=instance_noise_seed(int(it.instance), it.seed)) for it in replay.items]
    archive = types.SimpleNamespace(manifest={"config": {"noise": "per_instance"}}, run_id="r")
    per = dataclasses.replace(replay, items=own, archive=archive)
    assert per.noise_mode == "per_instance" and per.seed_indexes() == [it.seed for it in replay.items]
    assert partners(per.items, per.seed_indexes()) == partners(replay.items)
    held = with_instances(per, 0, 2)
    seeds = sorted(set(replay.seed_indexes()))
    assert len(held.items) == 2 * len(seeds)
    assert [it.seed for it in held.items] == [instance_noise_seed(int(it.instance), k)
                                              for it, k in zip(held.items, seeds * 2)]
    assert held.seed_indexes() == seeds * 2 and with_instances(replay, 0, 2).seed_indexes() == seeds * 2


@pytest.mark.parametrize("carry", ["output", "update"])
def test_whole_output_swaps_are_the_same_at_every_layer_and_update_swaps_are_not(replay, carry):
    """Why `swap="update"` is the default: the organism's scene enters only through the input tokens, so carrying a
    block's whole output from scene B makes every later block compute B's step, whichever layer was swapped; carrying
    only its residual update (A's input + B's update) leaves the layers distinguishable."""
    n, n_layers = len(replay.items), len(replay.pipe.transformer.blocks)
    pair = partners(replay.items)
    finals = [swap_finals(replay, [Job(i, "layer_swap", layer, 0.0, 0, pair[i]) for i in range(n)], carry)
              for layer in range(n_layers)]
    spread = max(np.abs(f - finals[0]).max() for f in finals[1:])
    assert (spread > 1e-3) if carry == "update" else (spread < 1e-5)


def test_a_random_update_moves_each_token_as_far_as_the_donors_update(replay, monkeypatch):
    """The random null adds, per token, a random vector as long as the change the donor's update makes; a token
    region patches only its frames' tokens; a self-patch changes nothing."""
    from cos_core.experiments import batch as batch_module

    layer, step, seen = 1, 1, {}
    original = batch_module.BlockHooks.__enter__

    def enter(self):  # a spy after the patching hook: it sees the patched output
        out = original(self)

        def spy(module, args, output):
            if self.step() == step:
                seen["h"] = output.detach().clone()
        self._installed.enter_context(batch_module.hooked(self.transformer.blocks[layer], spy))
        return out

    monkeypatch.setattr(batch_module.BlockHooks, "__enter__", enter)
    patch = dict(kind="patch", position=layer, step=step, partner=1)
    run_batch(replay, [Job(0), Job(1), Job(0, carry="update", tag="patch", **patch),
                       Job(0, carry="random", tag="random", **patch), Job(0, frames=(2,), tag="region", **patch),
                       Job(0, **{**patch, "partner": 0}, tag="self")])
    h = seen["h"]  # (6, tokens, d)
    moved, random = (h[2] - h[0]).norm(dim=-1), (h[3] - h[0]).norm(dim=-1)
    torch.testing.assert_close(random, moved, atol=1e-4, rtol=1e-4)
    assert float(moved.max()) > 1e-3 and float(((h[3] - h[0]) - (h[2] - h[0])).abs().max()) > 1e-3
    per = h.shape[1] // 8
    region = (h[4] - h[0]).norm(dim=-1)
    assert float(region[2 * per:3 * per].min()) > 0 and float(region[:2 * per].max()) == 0.0
    assert torch.equal(h[5], h[0])


def test_hooks_are_removed_even_when_the_run_raises(replay):
    transformer = replay.pipe.transformer
    with pytest.raises(IndexError):
        run_batch(replay, [Job(1), Job(0, "patch", 1, step=0, partner=1, frames=(99,))], means=True)
    assert all(not block._forward_hooks for block in transformer.blocks)
    assert "cache_context" not in vars(transformer)


def test_flips_adoptions_and_the_summary_by_hand():
    key = {0: '"a"', 1: '"b"', 2: None, 3: '"a"'}
    clean = [dict(kind="clean", position=-1, step=-1, sample=i, partner=-1, answer_key=key[i], correct=i != 2,
                  score=1.0, instance=str(i // 2), strength=0.0, distribution="") for i in range(4)]
    swap = [dict(kind="layer_swap", position=5, step=0, sample=i, partner=(i + 2) % 4, answer_key=k, correct=True,
                 score=0.5, instance=str(i // 2), strength=0.0, distribution="")
            for i, k in enumerate(['"a"', '"a"', '"b"', None])]
    table = mark_flips(pd.DataFrame(clean + swap))
    rows = table[table["kind"] == "layer_swap"]
    assert rows["flipped"].tolist() == [False, True, True, True]  # 0 kept "a"; 3 became unreadable
    assert rows["adopted"].tolist() == [False, True, False, False]  # partners answered None, "a", "a", "b"
    assert mark_flips(pd.DataFrame(clean + swap), adopt_on=None)["adopted"].iloc[4:].isna().all()
    summary = summarise(table, n_boot=200).iloc[0]
    assert summary["value"] == summary["flip_rate"] == 0.75 and summary["baseline"] == 0.75
    assert summary["n"] == 4 and summary["n_instances"] == 2 and summary["ci_low"] <= 0.75 <= summary["ci_high"]


def test_commitment_table_by_hand():
    """4 samples (2 instances); clean answers a, b, None, a (sample 3 wrong). Re-noised at step 1: 3 keeps a,
    1 changes, 0 keeps: same_rate over the 3 readable = 2/3, same_wrong = 1/1 (sample 3)."""
    clean = [dict(kind="clean", sample=i, instance=str(i // 2), answer_key=k, correct=ok, strength=0.0, step=-1)
             for i, (k, ok) in enumerate([("a", True), ("b", True), (None, False), ("a", False)])]
    renoised = [dict(kind="renoise_step", sample=i, instance=str(i // 2), answer_key=k, correct=k == "a",
                     strength=1.0, step=1) for i, k in enumerate(["a", "c", None, "a"])]
    table = commitment_table(pd.DataFrame(clean + renoised), type("T", (), {"name": "maze"})(), n_boot=200)
    row = table.iloc[0]
    assert (row["step"], row["strength"], row["n"], row["n_readable"], row["n_wrong"]) == (1, 1.0, 4, 3, 1)
    assert row["same_rate"] == pytest.approx(2 / 3) and row["same_wrong"] == 1.0
    assert row["accuracy"] == 0.5 and row["unreadable"] == 0.25 and row["regime"] == "unique"
    assert row["ci_low"] <= row["same_rate"] <= row["ci_high"]


def test_propagation_of_no_noise_is_zero_and_of_full_noise_is_positive(replay):
    zero = run_interventions(replay, InterventionConfig(which=("propagation",), steps=(1,), propagation_strength=0.0,
                                                        n_boot=50))
    assert set(zero) == {"propagation", "propagation_samples", "sensitivity"}
    table = zero["propagation"]
    assert sorted(table["measure_step"].unique()) == [1, 2, 3] and set(table["layer"]) == {-1, 0, 1}
    np.testing.assert_allclose(table["dissimilarity"], 0.0, atol=1e-6)
    np.testing.assert_allclose(table["distance"], 0.0, atol=1e-6)
    np.testing.assert_allclose(zero["propagation_samples"]["token_distance"], 0.0, atol=1e-6)
    assert (zero["sensitivity"]["flip_rate"] == 0).all()
    full = run_interventions(replay, InterventionConfig(which=("propagation",), steps=(1, 2),
                                                        propagation_strength=1.0, n_boot=50))
    table = full["propagation"]
    at_inject = table[(table["measure_step"] == 1) & (table["layer"] == -1)]
    assert len(at_inject) == 1 and at_inject["dissimilarity"].iloc[0] > 1e-3 and at_inject["distance"].iloc[0] > 1e-2
    samples = full["propagation_samples"]
    assert len(samples) == len(replay.items) * (3 + 2) * 2 and (samples["frame_distance"] > 0).all()
    curve = full["sensitivity"].set_index("inject_step")
    assert list(curve.index) == [1, 2] and (curve["final_distance"] > 0).all()
    assert (curve["distance_last_ci_low"] <= curve["distance_last"]).all()
    assert json.loads(table.attrs["cos_config"])["config"]["steps"] == [1, 2]


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
    argv = ["--steps", "0,3", "--frames", "2", "--layers", "1", "--batch-size", "5", "--strengths", "0.5,1"]
    assert cli(replay, model_dir, *argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = len(replay.items)
    # per sample: clean + (2 steps x 2 λ) x 2 step kinds + (1 frame x 2 λ) x 2 frame kinds + 1 layer swap
    assert summary["written"] == {"interventions_samples": n * 14, "interventions": 13, "commitment": 4,
                                  "propagation": (4 + 1) * 3, "propagation_samples": n * (4 + 1) * 2,
                                  "sensitivity": 2}
    table = replay.archive.derived("interventions")
    assert {"kind", "position", "value", "ci_low", "ci_high", "n", "baseline", "metric", "mean_score",
            "flip_rate", "adopt_rate", "step", "strength", "distribution", "regime"} <= set(table.columns)
    assert set(table["regime"]) == {"noise-picked"}
    assert set(zip(table["kind"], table["distribution"].fillna(""))) == {
        ("noise_step", "off"), ("noise_frame", "off"), ("renoise_step", "on"), ("renoise_frame", "on"),
        ("layer_swap", "")}
    assert ((table["ci_low"] <= table["value"]) & (table["value"] <= table["ci_high"])).all()
    assert table.loc[table["kind"] == "layer_swap", "adopt_rate"].isna().all()  # fork's goal index does not transfer
    samples = replay.archive.derived("interventions_samples")
    clean = samples[samples["kind"] == "clean"].sort_values("sample")
    assert (clean["correct"].to_numpy() == replay.archive.samples["score_correct"].to_numpy()).all()
    commitment = replay.archive.derived("commitment")
    assert sorted(zip(commitment["step"], commitment["strength"])) == [(0, 0.5), (0, 1.0), (3, 0.5), (3, 1.0)]
    config = json.loads(table.attrs["cos_config"])
    assert config["command"][:2] == ["cos", "intervene"] and "--steps" in config["command"]
    assert config["config"]["frames"] == [2] and config["table"] == "interventions"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "4"], r"steps \[4\] out of range"),
    (["--frames", "8"], r"frames \[8\] out of range"),
    (["--layers", "0,2"], r"layers \[2\] out of range"),
    (["--which", "noise"], "noise_step"),
    (["--strengths", "1.5"], r"\[0, 1\]"),
    (["--strengths", "x"], "comma list of numbers"),
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
