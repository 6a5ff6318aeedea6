"""docs/findings.md is a function of archived tables: the shipped document agrees with the shipped tables (`--check`),
a changed number or a new table makes the check fail, every section renders from whatever tables exist, and the
accuracy-vs-steps table and the figure builders of the new tables work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cos_core import plots
from cos_core.analysis import findings
from cos_core.analysis.commitment import commitment_table
from cos_core.analysis.effects import patching_table
from cos_core.analysis.steps import steps_table
from cos_core.cli.main import main

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_document_agrees_with_the_shipped_tables(capsys):
    assert main(["report", "--check"]) == 0, capsys.readouterr().err[-3000:]
    text = findings.DOC.read_text(encoding="utf-8")
    for table in findings.load().tables.values():  # every shipped table is cited with its command
        assert f"`tables/{table.path.name}`" in text and table.command in " ".join(text.split())


def test_a_changed_number_or_a_new_table_fails_the_check(tmp_path, capsys):
    doc = tmp_path / "findings.md"
    shutil.copy(findings.DOC, doc)
    text = doc.read_text(encoding="utf-8")
    assert "75.5 %" in text  # maze at 16 steps, from the model card
    doc.write_text(text.replace("75.5 %", "76.5 %", 1), encoding="utf-8")
    assert main(["report", "--check", "--out", str(doc)]) == 1
    assert "76.5 %" in capsys.readouterr().err
    tables = tmp_path / "tables"
    shutil.copytree(findings.TABLES, tables) if findings.TABLES.is_dir() else tables.mkdir()
    doc.write_text(text, encoding="utf-8")
    assert main(["report", "--check", "--out", str(doc), "--tables", str(tables)]) == 0
    commitment(tables / "extra-run.commitment.parquet")
    assert main(["report", "--check", "--out", str(doc), "--tables", str(tables)]) == 1
    assert main(["report", "--out", str(doc), "--tables", str(tables)]) == 0  # regenerate: agrees again
    assert main(["report", "--check", "--out", str(doc), "--tables", str(tables)]) == 0
    assert "extra-run" in doc.read_text(encoding="utf-8")


def commitment(path: Path, instances: int = 4) -> pd.DataFrame:
    """A commitment table from a hand-made per-sample table (instances x 2 seeds, steps 0 and 4)."""
    rows = []
    for s in range(2 * instances):
        rows.append(dict(kind="clean", sample=s, instance=str(s // 2), answer_key="a", correct=True, strength=0.0,
                         step=-1))
        for step, key in ((0, "b" if s % 2 else "a"), (4, "a")):
            rows.append(dict(kind="renoise_step", sample=s, instance=str(s // 2), answer_key=key, correct=key == "a",
                             strength=1.0, step=step))
    table = commitment_table(pd.DataFrame(rows), type("T", (), {"name": "maze"})(), n_boot=100)
    table.attrs["cos_config"] = json.dumps({"command": ["cos", "intervene", "extra-run", "--which", "renoise_step"]})
    table.to_parquet(path, index=False)
    return table


def test_every_section_renders_from_whatever_exists(tmp_path):
    empty = findings.render(findings.load(tmp_path / "none", card=None))
    assert empty.count("*Not measured yet:*") == 8 and "(no tables yet)" in empty
    tables = tmp_path / "tables"
    tables.mkdir()
    commitment(tables / "run-a.commitment.parquet", instances=30)
    commitment(tables / "run-b.commitment.parquet", instances=3)
    text = " ".join(findings.render(findings.load(tables, card=None)).split())
    assert "### maze (unique answer), run `run-a`, λ = 1" in text
    assert "Committed (the lower bound of P(same) stays ≥ 90 %) from step 4 on" in text  # run-a: 30 instances
    assert "3 instances: too few for a claim" in text and text.count("Committed (") == 1  # run-b: no claim
    assert "`cos intervene extra-run --which renoise_step`" in text and "reproducible-only" in text
    assert text.count("*Not measured yet:*") == 7


def step_answers(path: Path, early: bool, instances: int = 40) -> None:
    """A hand-made step_answers table of maze (instances x 2 seeds, 4 steps): x̂0 reads the final path from step 0
    (`early`) or only from step 2; exactness comes at step 3 either way; seed 1 is never exact."""
    rows = []
    for s in range(2 * instances):
        for step in range(4):
            key = "p" if early or step >= 2 else None
            rows.append(dict(sample=s, step=step, answer_key=key, correct=step == 3 and s % 2 == 0, final_key="p",
                             matches_final=key == "p", sigma=1 - step / 4, task="maze", instance=s // 2, seed=s % 2))
    table = pd.DataFrame(rows)
    table.attrs["cos_config"] = json.dumps({"command": ["cos", "analyze", "run", "--which", "dynamics"]})
    table.to_parquet(path, index=False)


@pytest.mark.parametrize("early", [True, False])
def test_the_readout_section_tells_refinement_from_an_answer_that_forms(tmp_path, early):
    tables = tmp_path / "tables"
    tables.mkdir()
    step_answers(tables / "run-m.step_answers.parquet", early)
    text = " ".join(findings.render(findings.load(tables, card=None)).split())
    assert "### maze (unique answer), run `run-m`" in text
    assert ("refinement more than the paper's Chain-of-Steps" in text) is early
    assert ("the answer forms along the steps" in text) is not early
    assert "seed 0: 100.0 % [100.0, 100.0]; seed 1: 0.0 % [0.0, 0.0]" in text  # per noise seed, at the last step
    if not early:
        assert "from step 2 on the lower bound stays ≥ 90 %" in text


def test_the_readout_section_survives_odd_tables(tmp_path):
    """One step, nothing readable, no instance/task/seed columns, per-instance seeds: a sentence, never a crash."""
    tables = tmp_path / "tables"
    tables.mkdir()
    base = dict(sample=0, step=0, answer_key=None, correct=False, matches_final=False)
    pd.DataFrame([base | dict(sample=s) for s in range(40)]).to_parquet(tables / "one.step_answers.parquet")
    pd.DataFrame([base | dict(sample=s, step=k, instance=s, seed=1000 * s, task="fork") for s in range(40)
                  for k in range(3)]).to_parquet(tables / "none.step_answers.parquet")
    text = " ".join(findings.render(findings.load(tables, card=None)).split())
    assert "One step only: no steps to compare." in text
    assert "No final answer is readable" in text and "### fork (noise-picked answer), run `none`" in text
    assert "per noise seed" not in text  # per-instance seeds share nothing


def test_steps_table_intervals_match_the_evaluations_own():
    card = json.loads(findings.CARD.read_text(encoding="utf-8"))
    table = steps_table(card["accuracy_vs_steps"], card["answer_is_unique"])
    whole = table[table["difficulty"] == "all"].set_index(["task", "n_steps"])
    for task, per_k in card["accuracy_vs_steps"].items():
        for k, cell in per_k.items():
            np.testing.assert_allclose(whole.loc[(task, int(k)), ["ci_low", "ci_high"]].to_numpy(dtype=float),
                                       cell["accuracy_ci"], atol=1e-5)  # z = 1.95996 vs 1.96
    assert set(whole["regime"]) == {"unique", "noise-picked"}
    assert whole.loc[("maze", 16), "accuracy"] == 0.755 and whole.loc[("maze", 1), "regime"] == "unique"


def test_figure_builders_of_the_new_tables(tmp_path):
    card = json.loads(findings.CARD.read_text(encoding="utf-8"))
    figures = [plots.accuracy_vs_steps(steps_table(card["accuracy_vs_steps"], card["answer_is_unique"])),
               plots.commitment_curve(commitment(tmp_path / "c.parquet"))]
    rows = [dict(sample=s, instance=s // 2, layer=layer, step=0, tag=tag, flipped=bool((s + layer) % 2),
                 adopted=float((s + layer) % 2 and tag == "patch")) for s in range(6) for layer in range(3)
            for tag in ("patch", "random")]
    figures.append(plots.patching_grid(patching_table(pd.DataFrame(rows), n_boot=50), "random", "flip"))
    noise = pd.DataFrame([dict(kind=k, position=p, strength=lam, value=0.5, ci_low=0.4, ci_high=0.6)
                          for k in ("noise_step", "renoise_frame") for p in range(3) for lam in (0.5, 1.0)])
    figures.append(plots.strength_sweep(noise))
    curve = pd.DataFrame({"inject_step": [0, 1], **{f"{n}{s}": [0.1, 0.2] for n in ("distance_last", "final_distance",
                                                                                   "flip_rate")
                                                     for s in ("", "_ci_low", "_ci_high")}})
    figures.append(plots.sensitivity_curve(curve))
    search = pd.DataFrame([dict(method=m, n=n, k=0, nfe=n * 16, accuracy=0.5, ci_low=0.4, ci_high=0.6)
                           for m in ("single", "majority", "oracle_any") for n in (1, 4)])
    figures.append(plots.scaling_curves(search))
    prop = pd.DataFrame([dict(inject_step=i, measure_step=m, layer=-1, distance=0.1 * m, dissimilarity=0.01)
                         for i in range(3) for m in range(i, 3)])
    figures.append(plots.propagation_matrix(prop))
    for fig in figures:
        assert fig.data and fig.layout.title.text  # every builder draws something, with a title or subplot titles
    assert "distance" in figures[-1].layout.title.text or "|Δh|" in figures[-1].layout.title.text


def test_cos_steps_tabulates_the_card_and_refuses_a_card_without_the_record(tmp_path, capsys):
    out = tmp_path / "steps.parquet"
    assert main(["steps", "--from-card", str(findings.CARD), "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert set(table["task"]) == {"maze", "arrows", "fork", "recall", "dispatch"}
    assert json.loads(table.attrs["cos_config"])["command"][:2] == ["cos", "steps"]
    bad = tmp_path / "eval.json"
    bad.write_text("{}", encoding="utf-8")
    assert main(["steps", "--from-card", str(bad), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "no accuracy_vs_steps record" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()


def test_the_measurement_tables_have_a_schema_and_the_shipped_ones_pass_it(tmp_path):
    """commitment / sensitivity / patching / search are documented in archive.schema.DERIVED (the columns and kinds
    the dashboard reads), and every shipped research table with a spec passes the validating reader."""
    from cos_core.archive.derived import read_parquet
    from cos_core.archive.schema import DERIVED
    assert {"commitment", "sensitivity", "patching", "search", "interventions", "propagation"} <= set(DERIVED)
    checked = 0
    for table in findings.load().tables.values():
        spec = DERIVED.get(table.name)
        if spec is None:
            continue
        run = tmp_path / table.run / table.name
        (run / "derived").mkdir(parents=True)
        shutil.copy(table.path, run / "derived" / f"{table.name}.parquet")
        read_parquet(run, run / "derived" / f"{table.name}.parquet", f"derived/{table.name}.parquet", spec.kinds,
                     spec.required)
        checked += 1
    assert checked >= 10
