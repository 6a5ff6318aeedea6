"""The dashboard under Streamlit's AppTest: every page on real archives this module captures (a tiny random
organism on the maze task, a tiny Wan 2.2 with VAE-decoded frames and two experts, a tiny CogVideoX without decoding),
plus a run with a truncated shard and one with a bad manifest; and the shipped `cached_runs/` when it has runs.

Checks: no exception, the key elements of each page, widget changes rerun cleanly and land in the URL, URL values
seed the widgets, broken archives become error cards while good runs keep working, and the pages start without
torch. The derived tables other than `step_answers` are plotting fixtures: documented columns, random values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cos_core.analysis.compare import outcome_counts, paired_outcomes
from cos_core.analysis.layers import top_components
from cos_core.archive import Archive, ArchiveError, publish_derived
from cos_core.archive.runs import RUNS_ENV, run_path, runs_dirs
from cos_core.archive.schema import check_derived
from cos_core.frames import spread, to_uint8

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app.py"
PAGES = ["overview", "steps", "layers", "probes", "self_correction", "working_memory", "interventions", "ensemble",
         "compare", "live"]
ANALYSIS = {"probes": "probe_grid", "self_correction": "events", "working_memory": "memory",
            "interventions": "interventions", "ensemble": "ensemble"}


# ---- archives --------------------------------------------------------------------------------------------------
def _capture_organism(runs: Path, model_dir: Path, task: str, first: int = 0, ensemble: str | None = None) -> Archive:
    import torch

    from cos_core.capture import CaptureSpec
    from cos_core.capture.run import capture_run
    from cos_core.capture.sources import SourceConfig, organism_source
    from cos_core.experiments.merge import MergeSpec, merged_capture
    from cos_core.organism.pipeline import build_pipeline

    if not (model_dir / "model_index.json").is_file():
        torch.manual_seed(0)
        build_pipeline("tiny").save_pretrained(model_dir)
    merge = MergeSpec.parse(ensemble) if ensemble else None
    config = SourceConfig(task=task, instances=2, first_instance=first, num_inference_steps=4,
                          members=merge.n if merge else None)
    src = organism_source(config, device="cpu", dtype=torch.float32, seeds=[0], model_dir=model_dir)
    src = merged_capture(src, merge) if merge else src
    spec = CaptureSpec(reductions=("frame_mean", "token_norm"), steps="0:4:2", store_dtype="float16")  # as shipped
    with src.around():
        return Archive.open(capture_run(src.pipe, src.items, spec, runs_dir=runs,
                                        run_id=f"organism-{task}" + ("-ensemble" if ensemble else ""),
                                        call_kwargs=src.call_kwargs, source=src.label, score=src.score,
                                        command=["cos", "capture", "--task", task], extra=src.extra,
                                        members=src.members))


def _capture_tiny(runs: Path, family: str, decode: bool) -> Path:
    from cos_core.capture import CaptureSpec
    from cos_core.capture.run import WorkItem, capture_run
    from cos_core.capture.tiny_pipelines import build_tiny

    case = build_tiny(family)
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    call["num_inference_steps"] = 4
    return capture_run(case.pipe, [WorkItem("seed0", 0)], CaptureSpec(reductions=("frame_mean", "token_norm")),
                       runs_dir=runs, run_id=f"tiny-{family}", call_kwargs=call, source=f"tiny:{family}",
                       decode=decode, command=["cos", "capture", "--model", f"tiny:{family}"])


def plotting_fixtures(archive: Archive) -> dict[str, pd.DataFrame]:
    """Tables `cos analyze` does not write yet (or that a random organism leaves empty), with the documented columns
    and random values: they test drawing, not findings."""
    rng = np.random.default_rng(0)
    steps, layers = archive.steps["step"].tolist(), archive.site("block_out")["layers"]
    events = pd.DataFrame({"sample": [0, 0, 1], "kind": ["self_correction", "enhancement", "regression"],
                           "step": [1, 2, 3], "key_before": ["a", "b", "b"], "key_after": ["b", "b", "c"]})
    interventions = pd.DataFrame(
        [{"kind": "noise_step", "position": s, "value": rng.uniform(), "ci_low": 0.1, "ci_high": 0.9, "n": 2,
          "baseline": 0.7} for s in steps]
        + [{"kind": "noise_frame", "position": f, "value": rng.uniform(), "ci_low": 0.1, "ci_high": 0.9, "n": 2,
            "baseline": 0.7} for f in range(8)]
        + [{"kind": "layer_swap", "position": l, "value": rng.uniform(), "ci_low": 0.0, "ci_high": 1.0, "n": 2,
            "baseline": None} for l in layers])
    propagation = pd.DataFrame([{"inject_step": i, "measure_step": j, "dissimilarity": rng.uniform()}
                                for i in steps for j in steps if j >= i])
    ensemble = pd.DataFrame([{"method": m, "k": k, "n": n, "accuracy": rng.uniform(), "ci_low": 0.1, "ci_high": 0.9}
                             for m in ("mean_x_t", "noise_mean") for k in (0, 1, 2) for n in (3, 5)])
    return {"events": events, "interventions": interventions, "propagation": propagation, "ensemble": ensemble}


def make_runs(root: Path, model_dir: Path) -> Path:
    """Capture the test archives into `root` and analyse them with `cos analyze`'s code (≈ 20 s on 2 busy CPU
    cores); add a copy carrying plotting fixtures, a run with a truncated shard and one with a bad manifest."""
    from cos_core.analysis.analyze import analyze_run

    # memory: test instances 2 and 3 differ in both probed labels (identity, hidden_position), so probes can run
    for task, first in (("maze", 0), ("memory", 2)):
        analyze_run(_capture_organism(root, model_dir, task, first))
    _capture_organism(root, model_dir, "maze", ensemble="mean_x0_hat:2:2")  # base vs ensemble for Compare
    _capture_tiny(root, "wan22", decode=True)
    _capture_tiny(root, "cogvideox", decode=False)
    for name, damage in (("plot-fixtures", None), ("broken-shard", "truncate")):
        copy = root / name
        shutil.copytree(root / "organism-maze", copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, "run_id": name}))
        if damage:
            shard = copy / manifest["shards"][1]
            os.truncate(shard, shard.stat().st_size // 2)
    fixtures = Archive.open(root / "plot-fixtures")
    publish_derived(fixtures, plotting_fixtures(fixtures), producer="test fixtures")
    (root / "bad-manifest").mkdir()
    (root / "bad-manifest" / "manifest.json").write_text("{not json")
    return root


_RUNS: dict[str, Path] = {}


def session_runs(tmp_path_factory) -> Path:
    """`make_runs` once per test session, shared by this module and the browser test."""
    pytest.importorskip("torch")
    if "runs" not in _RUNS:
        base = tmp_path_factory.mktemp("dashboard")
        _RUNS["runs"] = make_runs(base / "runs", base / "organism")
    return _RUNS["runs"]


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return session_runs(tmp_path_factory)


@pytest.fixture
def app(runs_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(RUNS_ENV, str(runs_dir))
    monkeypatch.setenv("COS_ORGANISM_DIR", str(runs_dir.parent / "organism"))
    return AppTest.from_file(str(APP), default_timeout=60)


def visit(at, page: str, run: str | None = None, **query: str):
    """Open `page` (and `run`): through the URL on a session's first run, through the sidebar afterwards (in a
    session the widget's own state wins over the URL, as in the browser)."""
    started = getattr(at, "_cos_started", False)
    for key, value in (({"run": run} if run and not started else {}) | query).items():
        at.query_params[key] = value
    at._cos_started = True
    at.switch_page(f"views/{page}.py").run()  # before a first run, pages are found by file name (our url paths)
    if run and at.sidebar.selectbox(key="run").value != run:
        at.sidebar.selectbox(key="run").set_value(run).run()
    assert not at.exception, f"{page}: {[e.value for e in at.exception]}"
    return at


def charts(at) -> int:
    return len(at.get("plotly_chart"))


BROKEN = ("broken-shard", "bad-manifest")


def errors(at) -> list[str]:
    """Error cards, less the Overview's cards about the two runs that are broken on purpose."""
    return [e.value for e in at.error if not (at.title and at.title[0].value.startswith("cos-lab")
                                              and any(b in e.value for b in BROKEN))]


# ---- every page ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_every_run(app, page):
    for run in ("organism-maze", "tiny-wan22", "tiny-cogvideox"):
        at = visit(app, page, run=run)
        assert not errors(at), f"{page} on {run}: {errors(at)}"
        assert at.title, f"{page} on {run} has no title"
        assert len(at.sidebar.selectbox) >= 2, "the shared sidebar (run, sample) is missing"


def test_steps_page_shows_grid_animation_final_video_schedule_and_answers(app):
    at = visit(app, "steps", run="organism-maze")
    assert charts(at) >= 7  # grid, one step, animation, final filmstrip, sigma, answers heatmap, convergence
    assert at.image, "the final video (GIF) is missing"
    assert {"step", "correct", "answer"} <= set(at.dataframe[0].value.columns)  # this sample's answers
    at = visit(app, "steps", run="tiny-wan22")
    assert any("decoded through the VAE" in c.value for c in at.caption)
    assert any("step_answers" in i.value and "cos analyze" in i.value for i in at.info)
    at = visit(app, "steps", run="tiny-cogvideox")
    assert any("latent channels 0-2" in c.value for c in at.caption)


def test_widget_changes_rerun_and_land_in_the_url(app):
    at = visit(app, "steps", run="organism-maze")
    at.select_slider(key="step").set_value(2).run()
    assert not at.exception and at.query_params["step"] == "2"
    at.sidebar.selectbox(key="sample").set_value(1).run()
    assert not at.exception and at.query_params["sample"] == "1"
    at.select_slider(key="rows").set_value(2).run()
    assert not at.exception and charts(at) >= 5
    at = visit(app, "layers", run="tiny-wan22")  # CFG: cond and uncond branches
    at.selectbox(key="branch").set_value("uncond").run()
    at.select_slider(key="step").set_value(3).run()
    at.radio(key="pca_color").set_value("step").run()
    assert not at.exception and at.query_params["branch"] == "uncond" and at.query_params["step"] == "3"
    at = visit(app, "probes", run="organism-maze")
    at.selectbox(key="label").set_value("path_len_bin").run()
    at.selectbox(key="metric").set_value("selectivity").run()
    at.selectbox(key="probe_layer").set_value(1).run()
    assert not at.exception and charts(at) == 2 and at.query_params["label"] == "path_len_bin"
    at = visit(app, "compare")
    at.selectbox(key="run_b").set_value("tiny-cogvideox").run()
    assert not at.exception and charts(at) == 3 and "rows" in at.query_params


def test_compare_pairs_a_run_with_its_ensemble_sample_by_sample(app, runs_dir):
    at = visit(app, "compare", run="organism-maze", sample="1")
    at.selectbox(key="run_b").set_value("organism-maze-ensemble").run()
    assert not at.exception and not errors(at)
    assert at.selectbox(key="sample_b").value == 1  # the same instance and seed as sample A
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["shared samples"] == "2"
    base, ens = Archive.open(runs_dir / "organism-maze"), Archive.open(runs_dir / "organism-maze-ensemble")
    changed = sum(json.loads(x).get("path") != json.loads(y).get("path")  # maze's discrete answer is its path
                  for x, y in zip(base.samples["answer"], ens.samples["answer"]))
    assert metrics["answer changed"] == str(changed)
    assert "mean_x0_hat, K=2, n=2" in at.dataframe[0].value.to_string()  # the facts table names the ensemble
    assert any("Both runs drew their noise on cpu" in c.value for c in at.caption)
    assert base.noise_device == "cpu" and Archive.open(runs_dir / "tiny-wan22").noise_device == "cpu"
    at.sidebar.selectbox(key="sample").set_value(0).run()
    assert at.selectbox(key="sample_b").value == 0, "sample B follows sample A to the same instance and seed"


def test_compare_warns_when_the_runs_drew_noise_on_different_devices(runs_dir, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    for name in ("organism-maze", "organism-maze-ensemble"):
        shutil.copytree(runs_dir / name, tmp_path / name)
    manifest = json.loads((tmp_path / "organism-maze" / "manifest.json").read_text())
    manifest["model"]["device"] = "cuda:0"  # as if made on a GPU: seed 0 is another draw there
    (tmp_path / "organism-maze" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    at = visit(AppTest.from_file(str(APP), default_timeout=60), "compare", run="organism-maze")
    at.selectbox(key="run_b").set_value("organism-maze-ensemble").run()
    assert not at.exception
    assert any("on cuda, run B on cpu" in w.value for w in at.warning)


def test_paired_outcomes_match_on_sample_id_only():
    def fork(goal, trace):  # the discrete answer is the goal; the trace cells may differ without changing it
        return json.dumps({"goal": goal, "cells": trace})

    a = pd.DataFrame({"sample_id": ["x", "y", "z"], "task": "fork", "instance": ["1", "2", "3"], "seed": [0, 0, 0],
                      "answer": [fork(0, [1]), fork(1, [2]), fork(1, [3])], "score_correct": [1.0, 0.0, 1.0]})
    b = pd.DataFrame({"sample_id": ["y", "z", "w"], "task": "fork", "instance": ["2", "3", "9"], "seed": [0, 0, 0],
                      "answer": [fork(0, [2]), fork(1, [3, 4]), fork(None, [])], "score_correct": [1.0, 1.0, 0.0]})
    paired = paired_outcomes(a, b)
    assert paired["sample_id"].tolist() == ["y", "z"] and paired["changed"].tolist() == [True, False]
    assert paired["answer_a"].tolist() == ["1", "1"] and paired["answer_b"].tolist() == ["0", "1"]
    assert outcome_counts(paired) == {"shared samples": 2, "accuracy A": 0.5, "accuracy B": 1.0,
                                      "fixed by B": 1, "broken by B": 0, "answer changed": 1}
    assert paired_outcomes(a.drop(columns="answer"), b).empty
    b.loc[1, "score_correct"] = float("nan")  # z unscored in B: paired, but left out of accuracy and flips
    counts = outcome_counts(paired_outcomes(a, b))
    assert counts["shared samples"] == 2 and counts["accuracy A"] == 0.0 and counts["fixed by B"] == 1


def test_url_seeds_the_widgets_and_stale_keys_are_dropped(app):
    at = visit(app, "steps", run="tiny-wan22", sample="0", step="1")
    assert at.sidebar.selectbox(key="run").value == "tiny-wan22"
    assert at.select_slider(key="step").value == 1
    at = visit(app, "overview")
    assert "step" not in at.query_params and at.query_params["run"] == "tiny-wan22"


def test_invalid_url_values_fall_back_to_defaults(app):
    app.query_params.update(run="no-such-run", sample="7", step="999", rows="x")
    at = app.switch_page("views/steps.py").run()
    assert not at.exception and not errors(at)
    assert at.sidebar.selectbox(key="run").value == "broken-shard"  # the first run in name order
    assert at.query_params["run"] == "broken-shard" and at.query_params["step"] == "3"


def test_analysis_pages_plot_their_tables_or_say_which_table_they_need(app):
    expect = {  # page: (run whose tables it plots, figures at least)
        "probes": ("organism-maze", 2), "self_correction": ("organism-maze", 1),
        "working_memory": ("organism-memory", 3), "interventions": ("plot-fixtures", 3),
        "ensemble": ("plot-fixtures", 1)}
    for page, (run, n) in expect.items():
        at = visit(app, page, run=run)
        assert charts(at) >= n and not errors(at), (page, charts(at), errors(at))
        at = visit(app, page, run="tiny-wan22")
        assert charts(at) == 0 and any(f"derived/{ANALYSIS[page]}" in i.value for i in at.info), page
    at = visit(app, "self_correction", run="organism-maze")  # the random organism never changes its mind
    assert any("No events were detected" in i.value for i in at.info)
    at = visit(app, "self_correction", run="plot-fixtures")
    assert charts(at) >= 3


def test_self_correction_labels_are_saved_into_the_archive(app, runs_dir):
    at = visit(app, "self_correction", run="tiny-cogvideox")
    at.selectbox(key="label_category").set_value("Self-correction")
    at.selectbox(key="label_step").set_value(2)
    at.text_input(key="label_note").input("fixed at step 2")
    at.button[0].click().run()
    assert not at.exception and at.success
    saved = Archive.open(runs_dir / "tiny-cogvideox").annotations()
    assert saved[-1]["category"] == "Self-correction" and saved[-1]["step"] == 2


def test_broken_archives_are_error_cards_and_good_runs_keep_working(app):
    at = visit(app, "overview")
    text = " ".join(e.value for e in at.error)
    assert "bad-manifest" in text and "not valid JSON" in text
    assert "broken-shard" in text and "1 of 2 sample shards" in text
    assert any("cannot be read" in w.value for w in at.sidebar.warning)
    at = visit(app, "steps", run="broken-shard")
    at.sidebar.selectbox(key="sample").set_value(1).run()
    assert not at.exception and errors(at) and "damaged" in errors(at)[0]
    at.sidebar.selectbox(key="sample").set_value(0).run()
    assert not at.exception and not errors(at) and charts(at) >= 5
    at = visit(app, "steps", run="organism-maze")
    assert not errors(at) and charts(at) >= 5


def test_live_page_runs_the_organism_into_a_temporary_run(app):
    at = visit(app, "live")
    at.number_input(key="live_seeds").set_value(1)
    at.number_input(key="live_steps").set_value(2)
    at.button[0].click().run(timeout=120)
    assert not at.exception and not errors(at), errors(at)
    assert charts(at) == 2
    run = Path(at.session_state["live_run"])
    assert run.name == "live-maze-0" and Archive.open(run).n_steps == 2
    shutil.rmtree(run.parent)  # the page's temporary runs directory


def test_pages_start_without_torch(runs_dir):
    """Every page renders with torch and diffusers made unimportable, as on a Space without them."""
    script = f"""
import sys
sys.modules["torch"] = None; sys.modules["diffusers"] = None
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(APP)!r}, default_timeout=60).run()
for page in {PAGES!r}:
    at.switch_page(f"views/{{page}}.py").run()
    assert not at.exception, (page, [e.value for e in at.exception])
    bad = [e.value for e in at.error if not any(b in e.value for b in {BROKEN!r})]
    assert not bad, (page, bad)
assert any("torch" in i.value for i in at.info), "the Live page should say how to enable it"
heavy = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "diffusers")]
assert not heavy, heavy
print("ok")
"""
    env = {**os.environ, RUNS_ENV: str(runs_dir)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(not any(runs_dirs(REPO, "")[0].glob("*/manifest.json")), reason="cached_runs/ has no runs yet")
def test_shipped_runs_render_on_every_page(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv(RUNS_ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    runs = at.sidebar.selectbox(key="run").options
    for run in runs:
        for page in PAGES:
            at.query_params["run"] = run
            at.switch_page(f"views/{page}.py").run()
            assert not at.exception and not at.error, (run, page, errors(at))


# ---- pure helpers ----------------------------------------------------------------------------------------------
def test_run_path_refuses_escapes(tmp_path):
    root = tmp_path / "runs"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert run_path(root, "ok") == (root / "ok").resolve()
    for name in ("link", "../outside", "a/b", ".hidden"):
        with pytest.raises(ArchiveError):
            run_path(root, name)


def test_runs_dirs_and_spread(tmp_path):
    assert runs_dirs(tmp_path, "") == [(tmp_path / "cached_runs").resolve()]
    assert runs_dirs(tmp_path, f"a{os.pathsep}/x") == [(tmp_path / "a").resolve(), Path("/x")]
    assert spread(list(range(50)), 5) == [0, 12, 24, 37, 49]
    assert spread([3, 4], 9) == [3, 4] and spread([1, 2, 3], 1) == [3]


def test_pixel_rendering_and_derived_checks():
    video = np.stack([np.full((2, 4, 4), v, np.float32) for v in (-1.0, 0.0, 1.0)])  # (C, F, H, W)
    rgb = to_uint8(video, "pixel")
    assert rgb.shape == (2, 4, 4, 3) and tuple(rgb[0, 0, 0]) == (0, 128, 255)
    with pytest.raises(ArchiveError, match=r"lacks column\(s\) \['chance'\]"):
        check_derived("probe_grid", pd.DataFrame({"label": ["a"], "layer": [0], "step": [0], "accuracy": [1.0]}))
    with pytest.raises(ValueError, match="unknown derived table"):
        check_derived("nope", pd.DataFrame())


def test_top_components_match_a_full_svd():
    rng = np.random.default_rng(1)
    points = rng.standard_normal((300, 2)) @ np.diag([5.0, 2.0]) @ rng.standard_normal((2, 64))
    points += 0.1 * rng.standard_normal((300, 64))
    coords, ratio = top_components(points, 2)
    centred = points - points.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(centred @ vt[:2].T), atol=1e-8)
    np.testing.assert_allclose(ratio, sv[:2] ** 2 / (sv**2).sum(), rtol=1e-10)
    assert top_components(np.ones((5, 3)))[1].tolist() == [0.0, 0.0]  # no variance: zeros, no NaN
