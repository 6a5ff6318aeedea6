"""The run archive: a capture written by `capture_run` reads back exactly what the capturer recorded, every key, shape
and dtype the manifest promises is there, the reader needs no torch, and every damaged or hostile archive is refused
with an `ArchiveError` that says what is wrong. Corruption tests work on a copy of one archive made per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cos_core.archive import Archive, ArchiveError, list_runs, publish_derived, schema
from cos_core.archive.schema import (CAPTURE, MANIFEST, REQUIRED_KEYS, SAMPLES, SCHEMA_VERSION, Manifest, act_key,
                                     shard_name, skip_key, token_key)
from cos_core.archive.writer import RunExistsError, RunWriter
from cos_core.capture import SITE, Capturer, CaptureSpec
from cos_core.capture.run import WorkItem, capture_run

REPO = Path(__file__).resolve().parent.parent
SPEC = CaptureSpec(layers="1", steps="0,2", reductions=("frame_mean", "token_norm", "pool2", "proj3"),
                   tokens=((1, 2), (0, 3)), tensor_steps="1:4")
SEEDS = (0, 1)


class Made:
    def __init__(self, path: Path, reference: dict[str, np.ndarray], case):
        self.path, self.reference, self.case = path, reference, case
        self.archive = Archive.open(path)


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory) -> Made:
    """A 2-sample archive of tiny Wan 2.1 (layer 1, steps 0 and 2, tokens, x_t/v_hat/x0_hat of steps 1-3, decoded
    steps 1 and 3), and the tensors of sample 1 recorded by a capturer run directly (the reference)."""
    case = tiny("wan_t2v")
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    items = [WorkItem(sample_id=f"demo-s{seed}", seed=seed, task="demo", instance="7", prompt="a ball rolls",
                      labels={"goal": seed + 1}) for seed in SEEDS]
    path = capture_run(case.pipe, items, SPEC, runs_dir=tmp_path_factory.mktemp("runs"), run_id="demo",
                       call_kwargs=call, source="tiny:wan_t2v", decode=True, decode_steps="1,3",
                       score=lambda item, final: {"score_mean": float(final.mean())}, command=["cos", "capture"])
    with Capturer(case.pipe, SPEC, n_steps=case.n_steps) as cap:
        cap.begin_sample()
        case.pipe(**call, output_type="latent", generator=torch.Generator("cpu").manual_seed(SEEDS[1]),
                  callback_on_step_end=cap.callback(), callback_on_step_end_tensor_inputs=["latents"])
        reference, _ = cap.end_sample()
    return Made(path, reference, case)


@pytest.fixture
def run(made, tmp_path) -> Path:
    """A private copy of the archive, free to damage."""
    return Path(shutil.copytree(made.path, tmp_path / "demo"))


def edit_manifest(run: Path, change) -> None:
    manifest = json.loads((run / MANIFEST).read_text())
    change(manifest)
    (run / MANIFEST).write_text(json.dumps(manifest))


def expected_layout(m: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} of one shard, derived from the manifest alone."""
    out = {"final": (tuple(m["latent"][k] for k in ("channels", "frames", "height", "width")), "float32")}
    for name, info in m["tensors"].items():
        out[name] = ((len(info["steps"]), *info["shape"]), info["dtype"])
    grid = tuple(m["token_grid"][k] for k in ("frames", "rows", "cols"))
    for site, info in m["sites"].items():
        for branch in info["branches"]:
            for r, red in info["reductions"].items():
                out[act_key(site, r, branch)] = ((len(info["steps"]), len(info["layers"]), *red["shape"]), "float32")
            out[skip_key(site, branch)] = ((len(info["steps"]), len(info["layers"])), "uint8")  # cache flags
            for layer, step in info["tokens"]:
                out[token_key(site, layer, step, branch)] = ((*grid, info["dim"]), "float32")
    if m["decoded"]:
        out["decoded/x0_hat"] = ((len(m["decoded"]["steps"]), *m["decoded"]["shape"]), "uint8")
        out["decoded/final"] = (tuple(m["decoded"]["shape"]), "uint8")
    return out


# ---- round trip ---------------------------------------------------------------------------------------------------


def test_every_key_shape_and_dtype_is_what_the_manifest_promises(made):
    a = made.archive
    m = a.manifest
    assert (m["schema_version"], m["complete"], m["n_samples"], m["n_steps"]) == (SCHEMA_VERSION, True, 2, 4)
    site = m["sites"][SITE]
    assert (site["layers"], site["steps"], site["tokens"]) == ([1], [0, 2], [[0, 3], [1, 2]])
    assert site["branches"] == ["cond", "uncond"] and set(site["reductions"]) == set(SPEC.reductions)
    assert m["tensors"]["x_t"]["steps"] == [1, 2, 3] and m["decoded"]["steps"] == [1, 3]
    layout = expected_layout(m)
    for sample in range(a.n_samples):
        assert set(a.keys(sample)) == set(layout), f"sample {sample}"
        for key, (shape, dtype) in layout.items():
            value = a.read(sample, key)
            assert (value.shape, str(value.dtype)) == (shape, dtype), key


def test_the_archive_holds_exactly_what_the_capturer_recorded(made):
    a = made.archive
    assert set(made.reference) == set(a.keys(1)) - {"decoded/x0_hat", "decoded/final"}
    for key, value in made.reference.items():
        np.testing.assert_array_equal(a.read(1, key), value, err_msg=key)
    assert not np.array_equal(a.read(0, "final"), a.read(1, "final")), "the two seeds must differ"


def test_look_ups_slice_the_stored_arrays(made):
    a = made.archive
    full = a.read(1, act_key(SITE, "pool2", "uncond"))  # (step, layer, frame, k, k, d)
    np.testing.assert_array_equal(a.act(SITE, "pool2", sample=1, branch="uncond"), full)
    np.testing.assert_array_equal(a.act(SITE, "pool2", sample=1, step=2, branch="uncond"), full[1])
    np.testing.assert_array_equal(a.act(SITE, "pool2", sample=1, layer=1, branch="uncond"), full[:, 0])
    np.testing.assert_array_equal(a.act(SITE, "pool2", sample=1, layer=1, step=0, branch="uncond"), full[0, 0])
    x0 = a.read(0, "x0_hat")
    np.testing.assert_array_equal(a.tensor("x0_hat", sample=0), x0)
    np.testing.assert_array_equal(a.tensor("x0_hat", sample=0, step=3), x0[2])
    np.testing.assert_array_equal(a.tokens(SITE, sample=0, layer=0, step=3),
                                  a.read(0, token_key(SITE, 0, 3, "cond")))
    np.testing.assert_array_equal(a.decoded(sample=1, step=3), a.read(1, "decoded/x0_hat")[1])


def test_stack_over_sample_layer_and_step(made):
    a = made.archive
    per_sample = [a.act(SITE, "frame_mean", sample=i) for i in range(2)]
    np.testing.assert_array_equal(a.stack(SITE, "frame_mean", over="sample"), np.stack(per_sample))
    np.testing.assert_array_equal(a.stack(SITE, "frame_mean", over="sample", samples=[1], step=2, layer=1),
                                  per_sample[1][1, 0][None])
    by_layer = a.stack(SITE, "token_norm", over="layer", samples=[0], step=2)  # (layer, frame, row, col)
    np.testing.assert_array_equal(by_layer, a.read(0, act_key(SITE, "token_norm", "cond"))[1])
    by_step = a.stack(SITE, "token_norm", over="step", samples=[0], layer=1)  # (step, frame, row, col)
    np.testing.assert_array_equal(by_step, a.read(0, act_key(SITE, "token_norm", "cond"))[:, 0])
    for kwargs, message in [(dict(over="layer", samples=[0]), "needs a step"),
                            (dict(over="step", samples=[0]), "needs a layer"),
                            (dict(over="layer", step=0), "pass samples=\\[i\\]"),
                            (dict(over="frame", samples=[0]), "over='frame' is not allowed"),
                            (dict(over="sample", samples=[]), "no samples to stack")]:
        with pytest.raises(ArchiveError, match=message):
            a.stack(SITE, "token_norm", **kwargs)


def test_decoded_frames_are_uint8_video_of_the_latents(made):
    a = made.archive
    frames = a.decoded(sample=0)  # (frame, H, W, 3)
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 64, 3)
    # x̂0 at the last step is the final latent, so its frames are the final video's (to rounding)
    last = a.decoded(sample=0, step=3)
    assert np.abs(last.astype(int) - frames.astype(int)).max() <= 1
    assert np.abs(a.decoded(sample=0, step=1).astype(int) - frames.astype(int)).max() > 10, "steps must differ"


def test_samples_steps_and_provenance(made):
    a = made.archive
    table = a.samples
    assert table["sample"].tolist() == [0, 1] and table["seed"].tolist() == list(SEEDS)
    assert table["sample_id"].tolist() == ["demo-s0", "demo-s1"]
    assert table["shard"].tolist() == [shard_name(0), shard_name(1)]
    assert (table["task"] == "demo").all() and (table["instance"] == "7").all()
    assert table["label_goal"].tolist() == [1, 2]
    np.testing.assert_allclose(table["score_mean"], [a.read(i, "final").mean() for i in range(2)], rtol=1e-6)
    steps = a.steps
    assert steps["step"].tolist() == [0, 1, 2, 3] and (steps["expert"] == "transformer").all()
    assert steps["t"].is_monotonic_decreasing and steps["sigma"].is_monotonic_decreasing
    m = a.manifest
    assert m["command"] == ["cos", "capture"] and m["versions"]["torch"] == torch.__version__
    assert m["model"]["pipeline_class"] == "WanPipeline"
    assert m["model"]["scheduler_class"] == type(made.case.pipe.scheduler).__name__
    assert m["model"]["scheduler_config"]["flow_shift"] == made.case.pipe.scheduler.config.flow_shift
    assert m["model"]["transformer_config"]["num_layers"] == 2
    assert m["config"]["spec"]["layers"] == [1] and m["config"]["items"] == [["demo-s0", 0], ["demo-s1", 1]]


def test_the_reader_needs_no_torch(made):
    code = f"""
import sys
from cos_core.archive import Archive
a = Archive.open({str(made.path)!r})
x = a.act("block_out", "frame_mean", sample=1, layer=1, step=2)
t = a.tokens("block_out", sample=0, layer=1, step=2, branch="uncond")
n = len(a.samples); d = a.decoded(sample=0)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "streamlit"))
assert not heavy, heavy
print(x.shape, t.shape, n, d.dtype)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(3,", "24)", "(3,", "2,", "4,", "24)", "2", "uint8"]


@pytest.mark.parametrize("call, message", [
    (lambda a: a.act(SITE, "frame_mean", sample=0, layer=0), "layer 0 was not captured; captured layers: \\[1\\]"),
    (lambda a: a.act(SITE, "frame_mean", sample=0, step=1), "step 1 was not captured; captured steps: \\[0, 2\\]"),
    (lambda a: a.act(SITE, "pool4", sample=0), "reduction 'pool4' of site 'block_out' was not captured"),
    (lambda a: a.act("attn", "frame_mean", sample=0), "site 'attn' was not captured"),
    (lambda a: a.act(SITE, "frame_mean", sample=2), "sample 2 out of range: demo has samples 0..1"),
    (lambda a: a.act(SITE, "frame_mean", sample=0, branch="both"), "branch 'both' was not captured"),
    (lambda a: a.tokens(SITE, sample=0, layer=1, step=0), "full tokens for layer 1, step 0 were not captured"),
    (lambda a: a.tensor("latents", sample=0), "tensor 'latents' was not captured"),
    (lambda a: a.tensor("x_t", sample=0, step=0), "step 0 was not captured"),
    (lambda a: a.decoded(sample=0, step=2), "decoded step 2 was not captured"),
    (lambda a: a.read(0, "acts/none"), "has no tensor 'acts/none'"),
    (lambda a: a.derived("probe"), "no derived table 'probe'"),
    (lambda a: a.derived("../x"), "not allowed"),
])
def test_bad_look_ups_name_what_exists(made, call, message):
    with pytest.raises(ArchiveError, match=message):
        call(made.archive)


# ---- damaged and hostile archives -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_schema_version_mismatch_is_refused_clearly(run, version):
    edit_manifest(run, lambda m: m.__setitem__("schema_version", version))
    with pytest.raises(ArchiveError, match=f"schema_version {version!r} is not supported by this cos-lab "
                                           f"\\(reads {SCHEMA_VERSION}\\)"):
        Archive.open(run)


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                           ("\udcff", "is not valid JSON"), ("", "is not valid JSON")])
def test_a_manifest_that_is_not_a_json_object_is_refused(run, text, message):
    (run / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ArchiveError, match=message):
        Archive.open(run)


@pytest.mark.parametrize("key", [k for k in REQUIRED_KEYS if k != "schema_version"])
def test_a_manifest_missing_a_required_key_is_refused(run, key):
    edit_manifest(run, lambda m: m.pop(key))
    with pytest.raises(ArchiveError, match=f"misses required keys: {key}$"):
        Archive.open(run)


@pytest.mark.parametrize("key", [f.name for f in fields(Manifest) if f.metadata["producer"] == CAPTURE
                                 and f.name in REQUIRED_KEYS])
def test_the_manifest_builder_refuses_a_producer_that_omits_a_required_key(key, tmp_path):
    layout = {k: v for k, v in _layout().items() if k != key}
    with pytest.raises(ArchiveError, match=f"the capture misses required manifest key\\(s\\): {key}"):
        Manifest.build(run_id="r", n_samples=1, layout=layout, record={})
    writer = RunWriter(tmp_path, "r", {})  # the writer builds before it publishes anything
    writer.write_sample(0, {"final": np.zeros((2, 1, 2, 2), np.float32)}, {"sample_id": "x"}, layout)
    with pytest.raises(ArchiveError, match="misses required manifest key"):
        writer.finalize(1, {"command": ["test"]})
    assert not (writer.partial_dir / MANIFEST).exists() and not (tmp_path / "r").exists()


def test_the_manifest_builder_refuses_keys_the_schema_does_not_declare():
    with pytest.raises(ArchiveError, match=r"the capture run filled manifest key\(s\) \['seed_of_the_day'\]"):
        Manifest.build(run_id="r", n_samples=1, layout=_layout(), record={"seed_of_the_day": 7})
    with pytest.raises(ArchiveError, match=r"the capture filled manifest key\(s\) \['created'\]"):
        Manifest.build(run_id="r", n_samples=1, layout={**_layout(), "created": "now"}, record={})
    built = Manifest.build(run_id="r", n_samples=2, layout=_layout(), record={"command": ["cos"]}).to_json()
    assert built["shards"] == [shard_name(0), shard_name(1)] and built["schema_version"] == SCHEMA_VERSION
    assert "created" not in built and "x0_rule" not in built, "keys nobody filled are left out, not written as null"


def test_every_manifest_key_is_documented_and_shipped_runs_hold_only_declared_keys():
    doc = schema.__doc__
    undocumented = [f.name for f in fields(Manifest) if not re.search(rf"\b{f.name}\b", doc)]
    assert not undocumented, f"Manifest keys missing from the schema docstring: {undocumented}"
    declared = {f.name for f in fields(Manifest)}
    for path in sorted((REPO / "cached_runs").glob("*/manifest.json")):
        keys = set(json.loads(path.read_text()))
        assert keys <= declared, f"{path}: keys {sorted(keys - declared)} are not declared in the schema"
        assert set(REQUIRED_KEYS) <= keys, path


def test_an_unfinished_or_absent_run_is_refused(run, tmp_path):
    edit_manifest(run, lambda m: m.__setitem__("complete", False))
    with pytest.raises(ArchiveError, match="not marked complete"):
        Archive.open(run)
    (run / MANIFEST).unlink()
    with pytest.raises(ArchiveError, match="no manifest.json"):
        Archive.open(run)
    with pytest.raises(ArchiveError, match="no run directory"):
        Archive.open(tmp_path / "nowhere")


@pytest.mark.parametrize("entry", ["../demo/shards/sample_000000.safetensors", "/etc/passwd",
                                   "shards/../../x/sample_000000.safetensors", "shards/sample_000001.safetensors",
                                   "shards/sample_0.safetensors", "shards/sample_000000.safetensors/", 0, None])
def test_shard_paths_must_stay_inside_the_run(run, entry):
    edit_manifest(run, lambda m: m["shards"].__setitem__(0, entry))
    with pytest.raises(ArchiveError, match="is not allowed"):
        Archive.open(run)


def test_a_shard_or_shard_folder_symlinked_out_of_the_run_is_refused(run, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(run / shard_name(0), outside)
    (run / shard_name(0)).unlink()
    (run / shard_name(0)).symlink_to(outside)
    a = Archive.open(run)  # opening reads the manifest only; the link is checked when the shard is read
    with pytest.raises(ArchiveError, match="shard for sample 0 links outside the run directory"):
        a.read(0, "final")
    assert a.read(1, "final").shape == (16, 3, 4, 8)
    shutil.move(run / "shards", tmp_path / "elsewhere")
    (run / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArchiveError, match="shards/ resolves outside the run directory"):
        Archive.open(run)


def test_shard_count_must_match_the_samples(run):
    edit_manifest(run, lambda m: m["shards"].pop())
    with pytest.raises(ArchiveError, match="one file per sample"):
        Archive.open(run)


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.0])
def test_a_truncated_shard_fails_on_read(run, keep):
    path = run / shard_name(1)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    a = Archive.open(run)  # opening reads the manifest only
    assert a.read(0, "final").shape == (16, 3, 4, 8)  # the other sample still reads
    with pytest.raises(ArchiveError, match="damaged or not a safetensors file"):
        a.act(SITE, "frame_mean", sample=1)
    with pytest.raises(ArchiveError, match="damaged or not a safetensors file"):
        a.keys(1)


def test_a_missing_shard_or_samples_table_is_reported(run):
    (run / shard_name(1)).unlink()
    a = Archive.open(run)
    with pytest.raises(ArchiveError, match="shard for sample 1 is missing"):
        a.read(1, "final")
    (run / SAMPLES).write_bytes(b"PAR1 not really")
    with pytest.raises(ArchiveError, match="cannot be read as parquet"):
        Archive.open(run).samples
    (run / SAMPLES).unlink()
    with pytest.raises(ArchiveError, match="samples.parquet is missing"):
        Archive.open(run).samples


def test_a_samples_table_that_disagrees_with_the_manifest_is_refused(run):
    table = pd.read_parquet(run / SAMPLES)
    table.iloc[:1].to_parquet(run / SAMPLES)
    with pytest.raises(ArchiveError, match="has 1 rows, the manifest says 2 samples"):
        Archive.open(run).samples
    pd.concat([table.iloc[:1]] * 2).to_parquet(run / SAMPLES)
    with pytest.raises(ArchiveError, match="duplicate sample_id 'demo-s0'"):
        Archive.open(run).samples


def test_a_manifest_promising_another_shape_is_caught_on_read(run):
    edit_manifest(run, lambda m: m["sites"][SITE]["reductions"]["frame_mean"].__setitem__("shape", [3, 25]))
    with pytest.raises(ArchiveError, match="the manifest promises"):
        Archive.open(run).act(SITE, "frame_mean", sample=0)


def test_list_runs_separates_good_broken_and_unfinished(run, tmp_path):
    runs = run.parent
    broken = runs / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text("{")
    (runs / "other.partial").mkdir()
    good, bad = list_runs(runs)
    assert [a.run_id for a in good] == ["demo"]
    assert list(bad) == ["broken"] and "not valid JSON" in bad["broken"]
    assert list_runs(tmp_path / "none") == ([], {})


def test_derived_tables_and_annotations_round_trip(run):
    a = Archive.open(run)
    table = pd.DataFrame({"step": [0, 1], "acc": [0.5, 0.75]})
    publish_derived(a, {"probe_acc": table}, producer="test")
    pd.testing.assert_frame_equal(Archive.open(run).derived("probe_acc"), table)
    assert a.derived_names() == ["probe_acc"]
    labels = [{"sample": 0, "step": 2, "label": "flip"}]
    a.write_annotations(labels)
    assert Archive.open(run).annotations() == labels
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name], "temporary files left behind"


# ---- the writer on its own ----------------------------------------------------------------------------------------


def _layout(dim: int = 4) -> dict:
    return {"steps": [{"step": 0, "t": 999.0, "sigma": 1.0, "expert": "transformer"}], "n_steps": 1,
            "latent": {"channels": 2, "frames": 1, "height": 2, "width": 2},
            "token_grid": {"frames": 1, "rows": 1, "cols": 2, "patch": [1, 2, 1]},
            "tensors": {}, "sites": {SITE: {"n_layers": 1, "layers": [0], "steps": [0], "branches": ["cond"],
                                            "dim": dim, "dtype": "float32",
                                            "reductions": {"token_norm": {"shape": [1, 1, 2]}},
                                            "tokens": [[0, 0]], "token_dtype": "bfloat16"}}, "decoded": None}


def test_writer_round_trip_is_exact_including_bfloat16_tokens(tmp_path):
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.standard_normal((1, 1, 2, 4)).astype(np.float32)).bfloat16()
    writer = RunWriter(tmp_path, "w", {"a": 1})
    arrays = []
    for sample in range(2):
        arr = {"final": rng.standard_normal((2, 1, 2, 2)).astype(np.float32),
               act_key(SITE, "token_norm", "cond"): rng.random((1, 1, 1, 1, 2)).astype(np.float32),
               token_key(SITE, 0, 0, "cond"): tokens.view(torch.int16).numpy().view(np.uint16)}
        writer.write_sample(sample, arr, {"sample_id": f"x{sample}", "seed": sample}, _layout())
        arrays.append(arr)
    path = writer.finalize(2, {"command": ["test"]})
    assert path == tmp_path / "w" and not (tmp_path / "w.partial").exists()
    a = Archive.open(path)
    for sample, arr in enumerate(arrays):
        for key, value in arr.items():
            np.testing.assert_array_equal(a.read(sample, key), value)
    np.testing.assert_array_equal(a.tokens(SITE, sample=0, layer=0, step=0), tokens.float().numpy())
    assert a.samples["sample_id"].tolist() == ["x0", "x1"]


def test_writer_refuses_what_would_break_an_archive(tmp_path):
    ok = {"final": np.zeros((2, 1, 2, 2), np.float32)}
    writer = RunWriter(tmp_path, "w", {"a": 1})
    writer.write_sample(0, ok, {"sample_id": "x"}, _layout())
    before = (writer.shard_path(0).stat().st_ino, writer.shard_path(0).stat().st_mtime_ns)
    with pytest.raises(ArchiveError, match="already written; finished shards are final"):
        writer.write_sample(0, ok, {"sample_id": "x"}, _layout())
    assert (writer.shard_path(0).stat().st_ino, writer.shard_path(0).stat().st_mtime_ns) == before
    with pytest.raises(ArchiveError, match=r"samples \[1\] not written yet"):
        writer.finalize(2, {})
    writer.write_sample(1, ok, {"sample_id": "y"}, _layout(dim=8))
    with pytest.raises(ArchiveError, match="different layout than sample 0"):
        writer.finalize(2, {})
    dup = RunWriter(tmp_path, "dup", {})
    for i in range(2):
        dup.write_sample(i, ok, {"sample_id": "same"}, _layout())
    with pytest.raises(ArchiveError, match="duplicate sample_id"):
        dup.finalize(2, {})
    for bad in ("../escape", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(ArchiveError, match="is not allowed"):
            RunWriter(tmp_path, bad, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.partial", "w.partial"]


def test_writer_never_touches_an_existing_run_or_foreign_directory(run):
    runs = run.parent
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(RunExistsError, match="a complete run already exists"):
        RunWriter(runs, "demo", {})
    (runs / "foreign").mkdir()
    (runs / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="is not a cos-lab run; refusing to touch it"):
        RunWriter(runs, "foreign", {})
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert (runs / "foreign" / "notes.txt").read_text() == "mine" and not (runs / "foreign.partial").exists()


def test_writer_resume_drops_a_half_written_shard_and_keeps_finished_ones(tmp_path):
    ok = {"final": np.ones((2, 1, 2, 2), np.float32)}
    writer = RunWriter(tmp_path, "w", {"a": 1})
    writer.write_sample(0, ok, {"sample_id": "x"}, _layout())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = writer.partial_dir / "shards" / f".sample_000001.safetensors.tmp-{int(gone.stdout)}"  # owner exited
    stale.write_bytes(b"half a shard")
    again = RunWriter(tmp_path, "w", {"a": 1})
    assert again.resumed and again.finished() == {0} and not stale.exists()
    with pytest.raises(ArchiveError, match="different configuration \\(differs in: a\\)"):
        RunWriter(tmp_path, "w", {"a": 2})
