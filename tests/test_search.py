"""Test-time scaling at equal compute: the selection rules by hand, NFE accounting, `run_search` and `cos search` on
the tiny organism (with a task whose answer reads the video, so answers differ between seeds)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.cli import search as search_cli  # noqa: E402
from cos_core.experiments.ensemble import member_items  # noqa: E402
from cos_core.experiments.replay import load_replay  # noqa: E402
from cos_core.experiments.search import (SearchConfig, consensus, majority, run_search,  # noqa: E402
                                         selection_rows, summary_table)
from test_patching import SideFork  # noqa: E402


@pytest.fixture(scope="module")
def replay(organism_run):
    archive, model_dir = organism_run(task="fork", instances=4, seeds=(0,), steps=3)
    return dataclasses.replace(load_replay(archive, model_dir=model_dir), task=SideFork())


def test_majority_and_consensus_by_hand():
    assert majority(["a", "b", "b", None]) == 1
    assert majority(["a", "b", None, None]) == 0  # a tie goes to the earliest member
    assert majority([None, None]) == 0 and majority([None, "c"]) == 1
    assert consensus(["x", None, "y", "y"]) == 2


def test_selection_rows_count_forward_passes():
    run = {"instance": 7, "scores": [dict(correct=c, answer_key=k) for c, k in
                                     [(False, "a"), (True, "b"), (True, "b"), (False, None)]],
           "early": {1: ["b", "a", "a", None], 2: ["a", "b", "b", "b"]}}
    rows = pd.DataFrame(selection_rows([run], SearchConfig(ns=(1, 4), prune_steps=(1, 2)), steps=16))
    got = {(r.method, r.n, r.k): (r.nfe, r.correct, r.member) for r in rows.itertuples()}
    assert got[("single", 1, 0)] == (16, False, 0)
    assert got[("majority", 4, 0)] == (64, True, 1)
    assert got[("oracle_any", 4, 0)][:2] == (64, True)
    assert got[("early_search", 4, 1)] == (4 * 1 + 15, True, 1)  # early answers: a, a agree (members 1, 2)
    assert got[("early_search", 4, 2)] == (4 * 2 + 14, True, 1)


def test_summary_table_pairs_gains_with_single():
    samples = pd.DataFrame([dict(instance=i, method=m, n=n, k=0, nfe=n * 4, correct=c, answer_key="x")
                            for i in range(6) for m, n, c in (("single", 1, i < 3), ("majority", 4, i < 5))])
    table = summary_table(samples, n_boot=200).set_index("method")
    assert table.loc["single", "accuracy"] == 0.5 and table.loc["majority", "accuracy"] == pytest.approx(5 / 6)
    assert table.loc["majority", "gain"] == pytest.approx(2 / 6) and table.loc["majority", "nfe"] == 16
    assert table.loc["single", "gain"] == 0


def test_a_member_runs_alike_in_a_batch_of_seeds_and_alone(replay):
    """Why the early search reads its output from the independent run: with a deterministic sampler the kept seed's
    continuation is the same trajectory it had in the batch of n seeds."""
    items = member_items(replay, [1_000_000_001], 4, 0)
    together = replay.run(items, num_inference_steps=3)
    alone = replay.run(items[2:3], num_inference_steps=3)
    np.testing.assert_allclose(together[2], alone[0], atol=1e-5)


def test_per_instance_noise_gives_members_their_own_seeds_and_the_cli_passes_it(replay):
    """noise="per_instance": member m of every instance draws its own noise (no two instances share one), the same
    members in every method (paired), and `cos search --noise per-instance` sets it; shared (default) is seed_base + m."""
    from cos_core.capture.sources import instance_noise_seed

    shared = member_items(replay, [7, 8], 2, 5)
    own = member_items(replay, [7, 8], 2, 5, "per_instance")
    assert [it.seed for it in shared] == [5, 6, 5, 6]
    assert [it.seed for it in own] == [instance_noise_seed(i, 5 + m) for i in (7, 8) for m in range(2)]
    assert len({it.seed for it in own}) == 4 and [it.sample_id for it in own] == [it.sample_id for it in shared]
    with pytest.raises(ValueError, match="noise"):
        member_items(replay, [7], 1, 0, "per-sample")
    with pytest.raises(ValueError, match="noise"):
        SearchConfig(noise="x")
    p = argparse.ArgumentParser()
    search_cli.add_arguments(p)
    args = p.parse_args([str(replay.archive.path), "--noise", "per-instance", "--device", "cpu"])
    assert search_cli.config_from_args(args, "cpu").noise == "per_instance"
    table, samples = run_search(replay, SearchConfig(ns=(1, 2), prune_steps=(1,), merges=(), ks=(1,), n_boot=20,
                                                     noise="per_instance"))
    assert set(table["method"]) >= {"single", "majority"} and (table["n_instances"] == 4).all()


def test_run_search_tables(replay):
    cfg = SearchConfig(ns=(1, 2, 4), prune_steps=(1,), merges=("mean_x0_hat", "noise_mean"), ks=(1,),
                       step_counts=(1, 2), n_boot=100, batch_size=8)
    table, samples = run_search(replay, cfg)
    methods = set(table["method"])
    assert methods == {"single", "majority", "oracle_any", "early_search", "ensemble_mean_x0_hat", "noise_mean",
                       "steps"}
    assert (table["n_instances"] == 4).all() and (table["regime"] == "noise-picked").all()
    nfe = table.set_index(["method", "n", "k"])["nfe"]
    assert nfe[("single", 1, 0)] == 3 and nfe[("majority", 4, 0)] == 12 and nfe[("early_search", 4, 1)] == 4 + 2
    assert nfe[("ensemble_mean_x0_hat", 2, 1)] == 6 and nfe[("noise_mean", 4, 0)] == 3 and nfe[("steps", 1, 2)] == 2
    acc = table.set_index(["method", "n", "k"])["accuracy"]
    assert acc[("oracle_any", 4, 0)] >= max(acc[("majority", 4, 0)], acc[("single", 1, 0)])
    single = samples[samples["method"] == "single"].set_index("instance")
    majority_of_one = samples[(samples["method"] == "early_search") & (samples["n"] == 2)].set_index("instance")
    assert len(single) == 4 and set(majority_of_one["member"]) <= {0, 1}
    assert ((table["ci_low"] <= table["accuracy"]) & (table["accuracy"] <= table["ci_high"])).all()


def test_cos_search_writes_both_tables_and_refuses_bad_input(replay, monkeypatch, capsys):
    import cos_core.experiments.replay as replay_module

    monkeypatch.setattr(replay_module, "load_replay", lambda *a, **k: replay)
    p = argparse.ArgumentParser()
    search_cli.add_arguments(p)
    args = p.parse_args([str(replay.archive.path), "--n", "1,2", "--prune-steps", "1", "--merges", "", "--device",
                         "cpu"])
    args._argv = ["search", str(replay.archive.path)]
    assert search_cli.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["written"]["search"] == len(replay.archive.derived("search")) and out["steps"] == 3
    meta = json.loads(replay.archive.derived("search").attrs["cos_config"])
    assert meta["command"][:2] == ["cos", "search"] and meta["regime"] == "noise-picked"
    for argv, message in ((["--prune-steps", "9"], "exceed the 3 sampling steps"), (["--merges", "x"], "merges"),
                          (["--n", "0"], ">= 1"), (["--first-instance", "2"], "--first-instance needs")):
        args = p.parse_args([str(replay.archive.path), "--device", "cpu", *argv])
        with pytest.raises(ValueError, match=message):
            search_cli.run(args)
