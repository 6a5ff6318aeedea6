"""Hostile and damaged input, one test per case, each refused with a message that says what is wrong (the catalogue in
docs/reliability.md; cases already covered by test_archive.py / test_capture_cli.py / test_analyze_cli.py are listed
there, not repeated here); no code runs when an archive is loaded (a scan of the package and the dashboard); a reader
polling while `cos capture` writes, is killed and resumes sees nothing or the complete run, never a torn one; and the
dashboard shows broken runs as error cards while good runs keep working.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cos_core.archive import Archive, ArchiveError, list_runs, publish_derived
from cos_core.archive.manifest import read_manifest
from cos_core.archive.schema import MANIFEST, PARTIAL_MANIFEST, SAMPLES, act_key, shard_name, token_key
from cos_core.archive.writer import RunWriter
from cos_core.capture import SITE, CaptureSpec
from cos_core.capture.run import WorkItem, capture_run

REPO = Path(__file__).resolve().parent.parent
SPEC = CaptureSpec(reductions=("frame_mean", "token_norm"), tokens=((1, 2),))


# ---- archives ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> Path:
    """A real 2-sample capture of tiny Wan 2.1 holding every kind of tensor: x_t/v_hat/x0_hat, reductions, full
    tokens of one (layer, step), decoded frames of steps 1 and 3."""
    case = tiny("wan_t2v")
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    items = [WorkItem(sample_id=f"s{seed}", seed=seed, instance=str(seed), labels={"goal": seed}) for seed in (0, 1)]
    return capture_run(case.pipe, items, SPEC, runs_dir=tmp_path_factory.mktemp("base"), run_id="demo",
                       call_kwargs=call, source="tiny:wan_t2v", decode=True, decode_steps="1,3", command=["test"])


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A private copy of the base archive in its own runs directory, free to damage."""
    return Path(shutil.copytree(base, tmp_path / "runs" / "demo"))


def edit_manifest(run: Path, change) -> None:
    manifest = json.loads((run / MANIFEST).read_text())
    change(manifest)
    (run / MANIFEST).write_text(json.dumps(manifest))


def rewrite_shard(run: Path, sample: int, change) -> None:
    """Rewrite one shard with `change(tensors)` applied, keeping its metadata (a shard that lies about itself)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = run / shard_name(sample)
    with safe_open(str(path), framework="np") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def raw_shard(path: Path, header: dict, body: bytes, like: Path | None = None) -> None:
    """A safetensors file from a hand-written header (8-byte little-endian length, JSON, data); `like`: a shard
    whose metadata (sample, row, ...) it carries."""
    if like is not None:
        from safetensors import safe_open

        with safe_open(str(like), framework="np") as f:
            header = {**header, "__metadata__": f.metadata()}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def refused(call, message: str) -> str:
    with pytest.raises(ArchiveError, match=message) as err:
        call()
    return str(err.value)


# ---- manifest --------------------------------------------------------------------------------------------------
def test_an_over_size_manifest_is_refused_before_it_is_read(run):
    with open(run / MANIFEST, "r+b") as f:  # sparse: 9 MiB on paper, no time to write
        f.truncate(9 * 2**20)
    refused(lambda: Archive.open(run), "is 9437184 bytes, over the 8388608-byte limit")


def test_a_deeply_nested_manifest_is_invalid_json_not_a_recursion_error(run):
    (run / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    refused(lambda: Archive.open(run), "is not valid JSON: nested too deeply")


def test_a_manifest_with_a_5000_digit_integer_is_invalid_json(run):
    (run / MANIFEST).write_text('{"schema_version": 1' + "0" * 5000 + "}")
    refused(lambda: Archive.open(run), "is not valid JSON: Exceeds the limit")


def test_a_manifest_that_is_a_folder_is_no_manifest(run):
    (run / MANIFEST).unlink()
    (run / MANIFEST).mkdir()
    refused(lambda: Archive.open(run), "is not a cos-lab archive: no manifest.json")


def test_a_manifest_symlinked_out_of_the_run_is_refused(run, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(run / MANIFEST, outside)
    (run / MANIFEST).symlink_to(outside)
    refused(lambda: Archive.open(run), "manifest.json resolves outside the run directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_manifest_is_an_archive_error(run):
    (run / MANIFEST).chmod(0)
    try:
        refused(lambda: Archive.open(run), "cannot be read: Permission denied")
    finally:
        (run / MANIFEST).chmod(0o644)


def test_schema_version_true_is_not_version_1(run):
    edit_manifest(run, lambda m: m.__setitem__("schema_version", True))
    refused(lambda: Archive.open(run), "schema_version True is not supported")


def test_an_empty_run_is_refused_by_reader_and_writer(run, tmp_path):
    edit_manifest(run, lambda m: m.update(n_samples=0, shards=[]))
    refused(lambda: Archive.open(run), "n_samples is 0: a run needs at least one sample")
    writer = RunWriter(tmp_path, "empty", {})
    refused(lambda: writer.finalize(0, {}), "cannot finalize empty: a run needs at least one sample")
    assert not (tmp_path / "empty").exists()


def test_a_run_of_0_steps_is_refused(run):
    edit_manifest(run, lambda m: m.update(n_steps=0, steps=[]))
    refused(lambda: Archive.open(run), "n_steps is 0: a run needs at least one denoising step")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(n_steps=5), "'steps' must list 5 steps"),
    (lambda m: m["steps"][1].update(step=2), "steps\\[1\\] must be \\{step: 1"),
    (lambda m: m["steps"][0].update(sigma="high"), "steps\\[0\\] must be"),
    (lambda m: m.update(sites=[SITE]), "'sites' must be an object"),
    (lambda m: m["sites"][SITE].update(branches=["both"]), "sites.block_out must give .*branches"),
    (lambda m: m["sites"][SITE].update(steps=[0, 9]), "sites.block_out must give .*steps \\(0..3\\)"),
    (lambda m: m["sites"][SITE]["reductions"].update(frame_mean=[3, 24]), "sites.block_out must give"),
    (lambda m: m["sites"][SITE].update(tokens=[[1]]), "sites.block_out must give"),
    (lambda m: m["tensors"]["x0_hat"].update(steps=[0, 4]), "tensors.x0_hat must give steps \\(0..3\\)"),
    (lambda m: m["latent"].update(channels=0), "'latent' must give integers channels \\(1..4096\\)"),
    (lambda m: m.update(token_grid="3x2x4"), "'token_grid' must give integers frames"),
    (lambda m: m.update(decoded={"steps": "all"}), "'decoded' must be null or"),
    (lambda m: m.update(run_id=7), "run_id must be a string"),
    (lambda m: m.update(n_samples=True, shards=["shards/sample_000000.safetensors"]), "n_samples is True"),
], ids=["n_steps-vs-steps", "step-order", "sigma-type", "sites-list", "branch", "site-steps", "reduction",
        "token-pair", "tensor-steps", "latent", "token-grid", "decoded", "run-id", "n_samples-bool"])
def test_manifest_fields_of_the_wrong_type_are_refused_at_open(run, change, message):
    edit_manifest(run, change)
    refused(lambda: Archive.open(run), message)


# ---- samples table ---------------------------------------------------------------------------------------------
def test_a_samples_table_symlinked_out_of_the_run_is_refused(run, tmp_path):
    shutil.move(run / SAMPLES, tmp_path / "elsewhere.parquet")
    (run / SAMPLES).symlink_to(tmp_path / "elsewhere.parquet")
    refused(lambda: Archive.open(run).samples, "samples.parquet resolves outside the run directory")


def test_a_samples_table_whose_rows_are_not_the_samples_in_order_is_refused(run):
    table = pd.read_parquet(run / SAMPLES)
    table.iloc[::-1].to_parquet(run / SAMPLES)
    refused(lambda: Archive.open(run).samples, "column 'sample' must number the rows 0..1 in order")


# ---- shards ----------------------------------------------------------------------------------------------------
def test_a_shard_tensor_of_the_wrong_dtype_is_refused(run):
    key = act_key(SITE, "frame_mean", "cond")
    rewrite_shard(run, 0, lambda t: t.__setitem__(key, t[key].astype(np.float64)))
    a = Archive.open(run)
    refused(lambda: a.act(SITE, "frame_mean", sample=0), "is stored as float64 \\[4, 2, 3, 24\\], the manifest "
                                                            "promises float32 \\[4, 2, 3, 24\\]")
    assert a.act(SITE, "frame_mean", sample=1).dtype == np.float32  # the other sample still reads


def test_a_bfloat16_tensor_where_float32_is_promised_is_refused(run):
    final = Archive.open(run).read(0, "final")
    bits = (final.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # the same values as bfloat16
    raw_shard(run / shard_name(0), {"final": {"dtype": "BF16", "shape": list(final.shape),
                                              "data_offsets": [0, len(bits)]}}, bits)
    refused(lambda: Archive.open(run).read(0, "final"), "final is stored as bfloat16 \\[16, 3, 4, 8\\], the manifest "
                                                          "promises float32 \\[16, 3, 4, 8\\]")


def test_a_float8_tensor_under_an_unknown_key_is_an_archive_error(run, tmp_path):
    shutil.copy(run / shard_name(0), tmp_path / "own.safetensors")
    raw_shard(run / shard_name(0), {"extra": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0",
              like=tmp_path / "own.safetensors")
    edit_manifest(run, lambda m: m.pop("checksums"))  # as an archive from before checksums
    refused(lambda: Archive.open(run).read(0, "extra"), "tensor 'extra' cannot be read as numpy")


@pytest.mark.parametrize("key, change", [
    ("x0_hat", lambda v: v[:2]),  # two steps where the manifest promises four
    ("decoded/final", lambda v: v.astype(np.float32)),
    ("decoded/x0_hat", lambda v: v[:, :, :16]),
    (token_key(SITE, 1, 2, "uncond"), lambda v: v[..., :12]),
    (act_key(SITE, "token_norm", "uncond"), lambda v: v.astype(np.int32)),
], ids=["x0_hat-steps", "decoded-dtype", "decoded-shape", "tokens-dim", "token_norm-int"])
def test_every_kind_of_tensor_is_checked_against_the_manifest(base, run, key, change):
    rewrite_shard(run, 1, lambda t: t.__setitem__(key, np.ascontiguousarray(change(t[key]))))
    a = Archive.open(run)
    refused(lambda: a.read(1, key), f"sample 1: {key} is stored as .*, the manifest promises")
    np.testing.assert_array_equal(a.read(0, key), Archive.open(base).read(0, key))  # sample 0 still reads


def test_a_shard_missing_a_promised_tensor_says_which(run):
    key = act_key(SITE, "token_norm", "cond")
    rewrite_shard(run, 0, lambda t: t.pop(key))
    refused(lambda: Archive.open(run).act(SITE, "token_norm", sample=0), f"sample 0 has no tensor '{key}'")


def test_a_shard_of_another_run_is_caught_by_its_shapes(run, tmp_path):
    writer = RunWriter(tmp_path, "other", {})
    writer.write_sample(0, {"final": np.zeros((4, 1, 2, 2), np.float32)}, {"sample_id": "x"}, {})
    shutil.copy(writer.shard_path(0), run / shard_name(1))
    refused(lambda: Archive.open(run).read(1, "final"), "final is stored as float32 \\[4, 1, 2, 2\\], the manifest "
                                                          "promises float32 \\[16, 3, 4, 8\\]")


@pytest.mark.parametrize("header, body, message", [
    ({"final": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}, b"\0" * 64,
     "incomplete metadata, file not fully covered"),
    ({"final": {"dtype": "F32", "shape": [2 ** 62, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "overflow"),
    ({"final": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid JSON in header"),
    ({"__metadata__": {"row": 5}}, b"", "invalid JSON in header"),
], ids=["huge-declared-size", "shape-overflow", "negative-dim", "metadata-not-strings"])
def test_a_shard_header_that_lies_about_sizes_is_damaged(run, header, body, message):
    raw_shard(run / shard_name(0), header, body)
    refused(lambda: Archive.open(run).read(0, "final"), f"damaged or not a safetensors file: .*{message}")


def test_a_shard_header_length_far_beyond_the_file_is_damaged(run):
    (run / shard_name(0)).write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    refused(lambda: Archive.open(run).keys(0), "damaged or not a safetensors file: .*header too large")


def test_a_shard_that_is_a_folder_is_refused_unopened(run):
    (run / shard_name(0)).unlink()
    (run / shard_name(0)).mkdir()
    refused(lambda: Archive.open(run).read(0, "final"), "sample_000000.safetensors is a folder, not a regular file")


# ---- runs directory, derived tables, annotations ----------------------------------------------------------------
def test_list_runs_reports_a_non_archive_folder_and_ignores_files_and_hidden_folders(run):
    runs = run.parent
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run")
    (runs / "README.txt").write_text("a file")
    (runs / ".cache").mkdir()
    good, bad = list_runs(runs)
    assert [a.run_id for a in good] == ["demo"]
    assert list(bad) == ["notes"] and "is not a cos-lab archive: no manifest.json" in bad["notes"]


def test_list_runs_never_follows_a_run_symlinked_from_outside(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(run, outside / "secret")
    runs = run.parent
    (runs / "escape").symlink_to(outside / "secret")
    (runs / "alias").symlink_to(run)  # a link that stays inside the runs directory is a run like any other
    good, bad = list_runs(runs)
    assert sorted(a.path.name for a in good) == ["alias", "demo"]
    assert list(bad) == ["escape"] and "links outside the runs directory" in bad["escape"]


def test_derived_tables_and_annotations_linked_out_of_the_run_are_refused(run, tmp_path):
    a = Archive.open(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pd.DataFrame({"x": [1]}).to_parquet(elsewhere / "probe_grid.parquet")
    (run / "derived").symlink_to(elsewhere)
    refused(lambda: a.derived("probe_grid"), "derived/ resolves outside the run directory")
    refused(lambda: publish_derived(a, {"probe_grid": pd.DataFrame({"x": [2]})}, producer="test"),
            "derived/ resolves outside")
    assert pd.read_parquet(elsewhere / "probe_grid.parquet")["x"].tolist() == [1], "wrote through the link"
    (tmp_path / "labels.json").write_text("[]")
    (run / "annotations.json").symlink_to(tmp_path / "labels.json")
    refused(lambda: a.annotations(), "annotations.json resolves outside the run directory")


def test_damaged_annotations_are_an_archive_error(run):
    (run / "annotations.json").write_text("[" * 100_000)
    refused(lambda: Archive.open(run).annotations(), "annotations.json is not valid JSON")


def test_two_shards_swapped_within_a_run_are_refused_not_read_as_each_other(run):
    a, b = run / shard_name(0), run / shard_name(1)
    a.rename(run / "x")
    b.rename(a)
    (run / "x").rename(b)
    archive = Archive.open(run)
    refused(lambda: archive.read(0, "final"), "shard for sample 0 .* holds sample '1', not sample 0: shards were "
                                              "swapped")
    refused(lambda: archive.keys(1), "holds sample '0', not sample 1")


def test_a_shard_of_another_run_with_the_same_shapes_is_refused_by_its_sample_id(run):
    """Shard 0 of another run of the same configuration (same index and shapes, another instance)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = run / shard_name(0)
    with safe_open(str(path), framework="np") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata={**meta, "row": json.dumps({**json.loads(meta["row"]), "sample_id": "t0"})})
    refused(lambda: Archive.open(run).read(0, "final"), "holds sample_id 't0', samples.parquet says 's0' for sample 0")


def test_a_bit_flip_in_tensor_data_fails_the_content_checksum(run):
    path = run / shard_name(1)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x10  # inside the last tensor's data: the header stays valid
    path.write_bytes(bytes(blob))
    archive = Archive.open(run)
    refused(lambda: archive.read(1, "final"), "shard for sample 1 .*content checksum .* differs from the manifest's")
    assert archive.read(0, "final").shape == (16, 3, 4, 8)  # sample 0 still reads
    edit_manifest(run, lambda m: m.pop("checksums"))  # an archive from before checksums opens and reads as before
    assert Archive.open(run).read(1, "final").shape == (16, 3, 4, 8)


def test_the_content_checksum_does_not_depend_on_header_order(run):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from cos_core.archive.shards import array_digest, file_digest

    path = run / shard_name(0)
    with safe_open(str(path), framework="np") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    want = json.loads((run / MANIFEST).read_text())["checksums"][0]
    assert array_digest(tensors) == want
    save_file(dict(reversed(list(tensors.items()))), str(path), metadata=dict(reversed(list(meta.items()))))
    with open(path, "rb") as f:
        assert file_digest(f) == want
    assert Archive.open(run).read(0, "final").shape == (16, 3, 4, 8)


def test_shards_tables_and_manifest_get_the_mode_every_file_gets(base):
    from cos_core.archive.files import FILE_MODE

    modes = {str(p.relative_to(base)): p.stat().st_mode & 0o777 for p in base.rglob("*") if p.is_file()}
    assert FILE_MODE == 0o666 & ~os.umask(os.umask(0o022))
    assert set(modes.values()) == {FILE_MODE}, modes


@pytest.mark.parametrize("kind", ["fifo", "socket", "dangling", "folder"])
def test_a_shard_that_is_not_a_regular_file_is_refused_without_opening_it(run, kind, monkeypatch):
    import socket

    from cos_core.archive.runs import shard_problems

    path = run / shard_name(1)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        monkeypatch.chdir(path.parent)  # a socket's path must be short: bind it by its relative name
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path.name)
    elif kind == "dangling":
        path.symlink_to(run / "nowhere.safetensors")
    else:
        path.mkdir()
    expect = {"fifo": "is a FIFO, not a regular file", "socket": "is a socket, not a regular file",
              "dangling": "shard for sample 1 is missing \\(a dangling symlink\\)",
              "folder": "is a folder, not a regular file"}[kind]
    archive = Archive.open(run)
    done = threading.Event()
    found: dict = {}
    worker = threading.Thread(target=lambda: (found.update(shard_problems(archive)), done.set()), daemon=True)
    worker.start()
    assert done.wait(20), "shard_problems blocked on the shard"  # a FIFO opened for reading blocks for ever
    assert list(found) == [1] and re.search(expect, found[1]), found
    refused(lambda: archive.read(1, "final"), expect)
    assert archive.read(0, "final").shape == (16, 3, 4, 8)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["config"].update(ensemble={}), "config.ensemble must be null or \\{method"),
    (lambda m: m.update(model="x"), "'model' must be an object, found 'x'"),
    (lambda m: m.update(command=["cos", 1]), "'command' must be a list of strings"),
    (lambda m: m["decoded"].update(shape=[2, 8]), "'decoded' must be null or \\{steps, shape \\[frames"),
    (lambda m: m["latent"].update(frames=10**12), "'latent' must give integers .*frames \\(1..4096\\)"),
    (lambda m: m.update(run_id="[x](https://evil.example)![](https://evil.example/p.png)"),
     "run_id '\\[x\\]\\(https.* is not allowed"),
    (lambda m: m["model"].update(device="cuda](https://evil.example)"), "model.device must name a torch device"),
    (lambda m: m["sites"].update({"<img src=x>": m["sites"].pop(SITE)}), "site and reduction names must be"),
    (lambda m: m["tensors"]["x0_hat"].update(shape=[16, 3, 4, 9]), "tensors.x0_hat.shape .* must be the latent's"),
    (lambda m: m.update(checksums=["md5:0"] * 2), "'checksums' must list one 'sha256:"),
    (lambda m: m["config"].update(task=["maze"]), "config.task must be a string"),
], ids=["ensemble-empty", "model-string", "command-int", "decoded-short", "latent-frames-1e12", "run-id-markdown",
        "device-markdown", "site-name-html", "x0-shape-vs-latent", "checksums", "task-list"])
def test_manifest_fields_pages_use_are_checked_at_open(run, change, message):
    edit_manifest(run, change)
    refused(lambda: Archive.open(run), message)


# ---- samples and derived tables: sizes and column kinds ------------------------------------------------------------
def bomb(path: Path, rows: int = 60_000_000) -> None:
    """A parquet file of `rows` zeros: a few hundred KB on disk, GBs once decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sample": pa.array(np.zeros(rows, np.int64))}), path, compression="zstd")


def test_a_parquet_bomb_is_refused_from_its_footer_before_decoding(run, monkeypatch):
    import pyarrow.parquet as pq

    (run / "derived").mkdir()
    bomb(run / "derived" / "step_answers.parquet")
    assert (run / "derived" / "step_answers.parquet").stat().st_size < 600_000

    def decoding(*args, **kwargs):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", decoding)  # bench/reader_limits.py measures the memory
    refused(lambda: Archive.open(run).derived("step_answers"), "declares 60000000 rows, over the 2000000-row limit "
                                                               "\\(refused before decoding\\)")


def test_a_table_declaring_more_decoded_bytes_than_the_limit_is_refused(run, monkeypatch):
    from cos_core.archive import tables

    monkeypatch.setattr(tables, "MAX_DECODED_BYTES", 100)
    refused(lambda: Archive.open(run).samples, "declares .* bytes of decoded data, over the 100-byte limit")


def test_an_over_size_table_file_is_refused_before_it_is_read(run):
    (run / "derived").mkdir()
    with open(run / "derived" / "events.parquet", "wb") as f:
        f.truncate(257 * 2**20)  # sparse
    refused(lambda: Archive.open(run).derived("events"), "is 269484032 bytes, over the 268435456-byte limit")


@pytest.mark.parametrize("column, values, message", [
    ("score_correct", ["yes", "no"], "column 'score_correct' must hold numbers, found large_string"),
    ("answer", ['{"path": [1, 2]}', "{not json"], "column 'answer' row 1 is not valid JSON"),
    ("sample_id", [1, 2], "column 'sample_id' must hold text, found int64"),
    ("seed", [0.5, 1.5], "column 'seed' must hold integers, found double"),
    ("sample", [-1, 0], "column 'sample' must hold integers >= 0"),
], ids=["score-strings", "answer-not-json", "sample-id-ints", "seed-floats", "sample-negative"])
def test_samples_table_columns_of_the_wrong_kind_are_refused(run, column, values, message):
    table = pd.read_parquet(run / SAMPLES)
    table[column] = values
    table.to_parquet(run / SAMPLES)
    refused(lambda: Archive.open(run).samples, message)


@pytest.mark.parametrize("name, message", [
    ("samples-abort.parquet", "cannot be read as parquet: Definition level histogram size mismatch"),
    ("samples-bad-utf8.parquet", "column 'answer' cannot be read: 'utf-8' codec can't decode"),
])
def test_damaged_tables_the_fuzzer_found_are_archive_errors_not_a_dead_process(name, message):
    """Two samples tables with bit flips found by the exploring fuzz: reading one column's chunk metadata from Python
    aborted the process (pyarrow 26 throws an uncaught C++ exception), the other held bytes that are not UTF-8. Read
    in a child process, so that an abort fails this test instead of killing the suite."""
    import subprocess
    import sys

    path = REPO / "tests" / "fault" / "data" / name
    code = ("import sys; from pathlib import Path; from cos_core.archive import ArchiveError; "
            "from cos_core.archive.schema import SAMPLE_KINDS; from cos_core.archive.tables import read_parquet\n"
            "try:\n    read_parquet(Path(sys.argv[1]).parent, Path(sys.argv[1]), 'samples.parquet', SAMPLE_KINDS)\n"
            "except ArchiveError as err:\n    print(err)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and re.search(message, out.stdout), (out.returncode, out.stdout, out.stderr[-500:])


def plant_derived(run: Path, name: str, table: pd.DataFrame) -> Path:
    """A derived table written by hand (as an older cos-lab or a hostile user would), not through publish_derived."""
    (run / "derived").mkdir(exist_ok=True)
    path = run / "derived" / f"{name}.parquet"
    table.to_parquet(path, index=False)
    return path


EVENTS = pd.DataFrame({"sample": [0], "kind": ["switch"], "step": [2]})
GRID = pd.DataFrame({"label": ["goal"] * 4, "layer": [0, 0, 1, 1], "step": [0, 1, 0, 1],
                     "accuracy": [0.5, 0.6, 0.7, 0.9], "chance": [0.5] * 4, "n": [8] * 4})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.assign(accuracy=["high"] * 4), "column 'accuracy' must hold numbers, found large_string"),
    (lambda t: t.assign(layer=[0.0, 0.0, 1.5, 1.5]), "column 'layer' must hold integers, found double"),
    (lambda t: t.assign(step=[0, None, 0, 1]), "column 'step' must hold integers >= 0, found double"),
    (lambda t: t.drop(columns="chance"), "lacks column\\(s\\) \\['chance'\\]"),
    (lambda t: t.assign(label=[1, 2, 3, 4]), "column 'label' must hold text, found int64"),
], ids=["accuracy-strings", "layer-floats", "step-missing", "no-chance", "label-ints"])
def test_derived_columns_of_the_wrong_kind_are_refused(run, change, message):
    plant_derived(run, "probe_grid", change(GRID))
    refused(lambda: Archive.open(run).derived("probe_grid"), message)


@pytest.mark.parametrize("kind", ["fifo", "dangling", "folder"])
def test_a_derived_entry_that_is_not_a_regular_file_is_not_listed_and_refused(run, kind):
    plant_derived(run, "step_answers", pd.DataFrame({"sample": [0], "step": [0], "correct": [True]}))
    path = run / "derived" / "convergence.parquet"
    {"fifo": os.mkfifo, "dangling": lambda p: p.symlink_to(run / "gone.parquet"), "folder": os.mkdir}[kind](path)
    a = Archive.open(run)
    assert a.derived_names() == ["step_answers"]
    refused(lambda: a.derived("convergence"), {"fifo": "is a FIFO", "dangling": "missing \\(a dangling symlink\\)",
                                               "folder": "is a folder"}[kind])
    refused(lambda: publish_derived(a, {"events": pd.DataFrame({"sample": [0], "kind": ["x"], "step": [1]})},
                                    producer="test"), "convergence.parquet")
    assert a.derived_names() == ["step_answers"], "a refused publish changed the set"


# ---- the derived set -------------------------------------------------------------------------------------------------
def test_a_publish_keeps_the_tables_it_does_not_replace_and_records_who_wrote_each(run):
    from cos_core.archive.derived import read_set

    old = plant_derived(run, "events", EVENTS)
    (run / "derived" / f".events.parquet.tmp-{dead_pid()}").write_bytes(b"half")  # an older cos-lab's orphan
    grid = GRID.copy()
    grid.attrs["cos_config"] = json.dumps({"probe": {"alpha": 0.1}})
    publish_derived(Archive.open(run), {"probe_grid": grid}, producer="cos analyze")
    body = read_set(run)
    assert sorted(body["tables"]) == ["events", "probe_grid"] and sorted(os.listdir(run / "derived")) == \
        ["events.parquet", "manifest.json", "probe_grid.parquet"], "the orphan temp file was carried over"
    assert body["tables"]["probe_grid"]["producer"] == "cos analyze"
    assert body["tables"]["probe_grid"]["config"] == {"probe": {"alpha": 0.1}}
    assert body["tables"]["events"]["producer"].startswith("unknown") and body["versions"]["pandas"]
    assert Archive.open(run).derived("events")["kind"].tolist() == ["switch"] and old.stat().st_nlink == 1


def test_a_derived_table_changed_behind_the_manifest_is_refused(run):
    publish_derived(Archive.open(run), {"probe_grid": GRID}, producer="test")
    GRID.assign(accuracy=0.99).to_parquet(run / "derived" / "probe_grid.parquet", index=False)
    refused(lambda: Archive.open(run).derived("probe_grid"), "is not the table derived/manifest.json records")


@pytest.mark.parametrize("text, message", [
    ("{half", "manifest.json is not valid JSON"),
    ('{"format": 1, "tables": {"../x": {"file": "../x.parquet", "rows": 1, "sha256": "s"}}}',
     "derived table '../x' is not allowed"),
    ('{"format": 1, "tables": {"x": {"file": "y.parquet", "rows": 1, "sha256": "s"}}}',
     "must give file '<name>.parquet'"),
    ('{"format": 2, "tables": {}}', "must be \\{format: 1"),
])
def test_a_damaged_derived_manifest_is_refused(run, text, message):
    publish_derived(Archive.open(run), {"probe_grid": GRID}, producer="test")
    (run / "derived" / "manifest.json").write_text(text)
    refused(lambda: Archive.open(run).derived_names(), message)


def test_a_publisher_refuses_a_table_the_reader_would_refuse_and_keeps_the_old_set(run):
    publish_derived(Archive.open(run), {"probe_grid": GRID}, producer="test")
    before = (run / "derived" / "manifest.json").read_bytes()
    with pytest.raises(ArchiveError, match="cos analyze made a 'probe_grid' table the reader would refuse: .*"
                                           "column 'accuracy' must hold numbers"):
        publish_derived(Archive.open(run), {"probe_grid": GRID.assign(accuracy="x")}, producer="cos analyze")
    assert (run / "derived" / "manifest.json").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".derived.tmp-")]


def test_derived_a_file_or_a_foreign_file_inside_it_stops_a_publish_and_loses_nothing(run):
    (run / "derived").write_text("my notes")
    refused(lambda: publish_derived(Archive.open(run), {"probe_grid": GRID}, producer="test"),
            "derived is a file, not a folder: move it away")
    assert (run / "derived").read_text() == "my notes"
    (run / "derived").unlink()
    publish_derived(Archive.open(run), {"probe_grid": GRID}, producer="test")
    (run / "derived" / "notes.txt").write_text("mine")
    refused(lambda: publish_derived(Archive.open(run), {"events": EVENTS}, producer="test"),
            "notes.txt is not a table of the derived set; move it out")
    assert (run / "derived" / "notes.txt").read_text() == "mine"


def dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_stale_temporaries_are_removed_only_when_their_owner_is_dead(tmp_path):
    import subprocess
    import sys

    from cos_core.archive.files import HOST, owner_alive, remove_stale

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead": f".s.tmp-{HOST}-{dead_pid()}-00ff", "legacy-dead": f".s.tmp-{dead_pid()}",
                 "live": f".s.tmp-{HOST}-{live.pid}-00ff", "legacy-live": f".s.tmp-{live.pid}",
                 "mine": f".s.tmp-{HOST}-{os.getpid()}-00ff", "other-host": f".s.tmp-00000000-{dead_pid()}-00ff",
                 "not-a-temp": ".keep"}
        for name in names.values():
            (tmp_path / name).write_text("x")
        reused = tmp_path / f".s.tmp-{HOST}-{live.pid}-0100"  # written an hour before `live` started: its pid was
        reused.write_text("x")
        os.utime(reused, (time.time() - 3600, time.time() - 3600))  # another, dead process's (pid reuse)
        removed = {p.name for p in remove_stale(tmp_path)}
        assert removed == {names["dead"], names["legacy-dead"], reused.name}, removed
        assert owner_alive(tmp_path / names["live"]) and owner_alive(tmp_path / names["other-host"])
    finally:
        live.kill()
        live.wait()


TINY_LAYOUT = {"steps": [{"step": 0, "t": 999.0, "sigma": 1.0, "expert": "transformer"}], "n_steps": 1,
               "latent": {"channels": 2, "frames": 1, "height": 2, "width": 2},
               "token_grid": {"frames": 1, "rows": 1, "cols": 1, "patch": [1, 2, 2]}, "tensors": {}, "sites": {},
               "decoded": None}


def test_a_resuming_capture_never_deletes_a_live_process_temporary(tmp_path):
    import subprocess
    import sys

    from cos_core.archive.files import HOST

    writer = RunWriter(tmp_path, "w", {"a": 1})
    writer.write_sample(0, {"final": np.ones((2, 1, 2, 2), np.float32)}, {"sample_id": "x"}, TINY_LAYOUT)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = writer.partial_dir / "shards" / f".sample_000001.safetensors.tmp-{HOST}-{live.pid}-0a0b"
        busy.write_bytes(b"being written")
        dead = writer.partial_dir / "shards" / f".sample_000002.safetensors.tmp-{HOST}-{dead_pid()}-0a0b"
        dead.write_bytes(b"left by a kill")
        again = RunWriter(tmp_path, "w", {"a": 1})
        assert busy.exists() and not dead.exists()
        refused(lambda: again.finalize(1, {}), "holds \\['.sample_000001.safetensors.tmp-.*written by a process "
                                               "that is still running")
        assert busy.read_bytes() == b"being written"
    finally:
        live.kill()
        live.wait()
    assert again.finalize(1, {}).is_dir() and not busy.exists()  # its owner is gone now


# ---- runs directory ---------------------------------------------------------------------------------------------
def test_a_run_folder_whose_name_is_not_utf8_is_listed_as_a_problem(run):
    os.mkdir(os.fsencode(run.parent) + b"/caf\xe9-run")
    good, bad = list_runs(run.parent)
    assert [a.run_id for a in good] == ["demo"]
    assert list(bad) == ["caf\\xe9-run"] and "not UTF-8" in bad["caf\\xe9-run"]
    json.dumps(bad).encode("utf-8")  # every name and message is text a page can send


def without_root_powers() -> list[str] | None:
    """A command prefix under which file permissions apply (root reads anything): none for another user, `setpriv`
    dropping root's capabilities to bypass them for root; None when neither is possible."""
    if os.name != "posix":
        return None
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"] if setpriv else None


def test_a_run_folder_the_reader_may_not_enter_is_a_problem_of_that_run_only(base, tmp_path):
    """A run folder of mode 000: `list_runs`, in a process without root's powers, reports it and lists the other."""
    import subprocess
    import sys

    prefix = without_root_powers()
    if prefix is None:
        pytest.skip("needs a POSIX user without root's permissions (or setpriv)")
    for name in ("ok", "locked"):
        shutil.copytree(base, tmp_path / "runs" / name)
    (tmp_path / "runs" / "locked").chmod(0)
    code = ("import json, sys; from cos_core.archive import list_runs; good, bad = list_runs(sys.argv[1]); "
            "print(json.dumps([[a.path.name for a in good], bad]))")
    page = ("import json, sys; from streamlit.testing.v1 import AppTest; "
            "at = AppTest.from_file(sys.argv[1], default_timeout=120).run(); "
            "print(json.dumps([[str(e.value) for e in at.exception], [e.value for e in at.error], "
            "list(at.dataframe[0].value['run']) if at.dataframe else []]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COS_RUNS_DIR": str(tmp_path / "runs")}
    try:
        out = [subprocess.run([*prefix, sys.executable, "-c", script, str(arg)], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=env)
               for script, arg in ((code, tmp_path / "runs"), (page, REPO / "app.py"))]
    finally:
        (tmp_path / "runs" / "locked").chmod(0o755)
    assert out[0].returncode == 0 and out[1].returncode == 0, out[0].stderr[-2000:] + out[1].stderr[-2000:]
    good, bad = json.loads(out[0].stdout)
    assert good == ["ok"] and list(bad) == ["locked"] and "Permission denied" in bad["locked"], (good, bad)
    exceptions, cards, listed = json.loads(out[1].stdout.strip().splitlines()[-1])
    assert not exceptions and listed == ["demo"], (exceptions, listed)  # the Overview serves the run it can read
    assert any("**`locked`**" in card and "Permission denied" in card for card in cards), cards


# ---- labels --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"sample": 0}, "must hold a JSON list of labels, found dict"),
    (["a label"], "label 0 must be an object"),
    ([{"sample": "0", "category": "Memory"}], "label 0: sample must be an integer >= 0"),
    ([{"sample": 0, "step": 1, "note": ["x"]}], "label 0: note must be a string"),
    ([{"sample": 0, "step": 1, "note": "x" * 3000}], "note must be a string of at most 2000 characters"),
], ids=["object", "string", "sample-string", "note-list", "note-long"])
def test_labels_that_are_not_a_list_of_label_objects_are_refused(run, data, message):
    (run / "annotations.json").write_text(json.dumps(data))
    refused(lambda: Archive.open(run).annotations(), message)


def test_an_over_size_labels_file_is_refused_before_it_is_read(run):
    with open(run / "annotations.json", "wb") as f:
        f.truncate(9 * 2**20)
    refused(lambda: Archive.open(run).annotations(), "is 9437184 bytes, over the 8388608-byte limit")


def test_csv_exports_neutralise_formula_prefixes_and_keep_numbers():
    from cos_core.archive.labels import csv_text

    table = pd.DataFrame({"note": ["=HYPERLINK(\"http://evil\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "fine"],
                          "score": [-1.5, 2, 3, 4, 5, 6, 7]})
    import csv
    import io

    rows = list(csv.reader(io.StringIO(csv_text(table), newline="")))
    assert [r[0] for r in rows[1:]] == ["'=HYPERLINK(\"http://evil\")", "'+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx",
                                        "fine"]
    assert [r[1] for r in rows[1:]] == ["-1.5", "2.0", "3.0", "4.0", "5.0", "6.0", "7.0"]


# ---- capture ---------------------------------------------------------------------------------------------------
def test_duplicate_sample_ids_in_the_work_items_are_refused_before_anything_is_written(tiny, tmp_path):
    case = tiny("wan_t2v")
    call = {k: v for k, v in case.call_kwargs.items() if k != "output_type"}
    items = [WorkItem("same", 0), WorkItem("same", 1)]
    with pytest.raises(ValueError, match="duplicate sample ids in the work items: \\['same'\\]"):
        capture_run(case.pipe, items, SPEC, runs_dir=tmp_path, run_id="dup", call_kwargs=call, source="tiny")
    assert not list(tmp_path.iterdir())


def test_a_damaged_resume_key_refuses_to_resume_and_keeps_the_shards(tmp_path):
    writer = RunWriter(tmp_path, "r", {"a": 1})
    writer.write_sample(0, {"final": np.zeros((2, 1, 2, 2), np.float32)}, {"sample_id": "x"}, {})
    (writer.partial_dir / PARTIAL_MANIFEST).write_text("{half")
    refused(lambda: RunWriter(tmp_path, "r", {"a": 1}), "cannot resume .*manifest.partial.json unreadable")
    assert writer.finished() == {0}


# ---- analysis ----------------------------------------------------------------------------------------------------
def analysis_run(runs: Path, run_id: str, *, labels=lambda instance: instance % 2, act_bad=None,
                 x0_bad=None) -> Archive:
    """A small archive for the analyses: 4 instances x 2 seeds, frame_mean (step, layer, frame, d) with the label
    planted at layer 1, x0_hat per step; `act_bad` = (sample, layer, step, value) or `x0_bad` = (sample, step)."""
    rng = np.random.default_rng(0)
    n_steps, dim = 3, 4
    writer = RunWriter(runs, run_id, {})
    layout = {"steps": [{"step": s, "t": 1000.0 - 300 * s, "sigma": 1 - s / 3, "expert": "transformer"}
                        for s in range(n_steps)], "n_steps": n_steps,
              "latent": {"channels": 3, "frames": 2, "height": 4, "width": 4},
              "token_grid": {"frames": 2, "rows": 2, "cols": 2, "patch": [1, 2, 2]},
              "tensors": {"x0_hat": {"steps": list(range(n_steps)), "dtype": "float32", "shape": [3, 2, 4, 4]}},
              "sites": {SITE: {"n_layers": 2, "layers": [0, 1], "steps": list(range(n_steps)), "branches": ["cond"],
                               "dim": dim, "dtype": "float32", "reductions": {"frame_mean": {"shape": [2, dim]}},
                               "tokens": []}}, "decoded": None}
    for sample in range(8):
        instance = sample // 2
        acts = rng.normal(size=(n_steps, 2, 2, dim)).astype(np.float32)
        acts[:, 1, :, 0] += 3.0 * labels(instance)
        x0 = rng.normal(size=(n_steps, 3, 2, 4, 4)).astype(np.float32)
        if act_bad is not None and act_bad[0] == sample:
            acts[act_bad[2], act_bad[1]] = act_bad[3]
        if x0_bad is not None and x0_bad[0] == sample:
            x0[x0_bad[1]] = np.nan
        row = {"sample_id": f"i{instance}-s{sample % 2}", "seed": sample % 2, "task": "demo",
               "instance": str(instance), "label_goal": int(labels(instance))}
        writer.write_sample(sample, {"x0_hat": x0, "final": x0[-1], act_key(SITE, "frame_mean", "cond"): acts}, row,
                            layout)
    return Archive.open(writer.finalize(8, {"config": {}}))


def test_inf_in_activations_names_the_cells_in_the_probe_grid(tmp_path):
    from cos_core.analysis.analyze import AnalyzeConfig, probe_grid

    archive = analysis_run(tmp_path, "inf", act_bad=(5, 1, 2, np.inf))
    with pytest.raises(ValueError, match="NaN/inf in 1 of 6 \\(layer, step\\) cells: \\(layer 1, step 2: "
                                         "samples \\[5\\]\\)"):
        probe_grid(archive, AnalyzeConfig(probe={"engine": "sklearn", "n_boot": 100}))


def test_labels_with_one_class_only_are_refused_by_the_probe_grid(tmp_path):
    from cos_core.analysis.analyze import AnalyzeConfig, probe_grid

    archive = analysis_run(tmp_path, "one-class", labels=lambda instance: 1)
    with pytest.raises(ValueError, match="no label has two classes in any task; nothing to probe"):
        probe_grid(archive, AnalyzeConfig(probe={"engine": "sklearn", "n_boot": 100}))


def test_nan_in_x0_hat_names_the_sample_and_step_in_convergence(tmp_path):
    from cos_core.analysis.dynamics import run_convergence

    archive = analysis_run(tmp_path, "nan-x0", x0_bad=(3, 1))
    with pytest.raises(ValueError, match="nan-x0 sample 3: x0_hat holds NaN/inf at step 1"):
        run_convergence(archive)


# ---- no code execution on load ----------------------------------------------------------------------------------
SCANNED = [REPO / "cos_core", REPO / "app.py", REPO / "pages", REPO / "views"]


def unsafe_calls(source: str, name: str = "<string>") -> list[str]:
    """Places where loading data could run code: pickle (and its relatives), torch.load without weights_only=True,
    np.load with allow_pickle=True, pandas read_pickle, yaml.load / unsafe_load, builtin eval / exec."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [f"{where} imports {m}" for m in modules
                    if m.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal")]
        if not isinstance(node, ast.Call):
            continue
        func, kwargs = node.func, {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            out.append(f"{where} calls {func.id}()")
        if not isinstance(func, ast.Attribute):
            continue
        owner = func.value.id if isinstance(func.value, ast.Name) else ""
        true = lambda k: isinstance(kwargs.get(k), ast.Constant) and kwargs[k].value is True  # noqa: E731
        if owner == "torch" and func.attr == "load" and not true("weights_only"):
            out.append(f"{where} calls torch.load without weights_only=True")
        if owner in ("np", "numpy") and func.attr == "load" and "allow_pickle" in kwargs and \
                not (isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False):
            out.append(f"{where} calls {owner}.load with allow_pickle other than False")
        if func.attr == "read_pickle" or (owner == "yaml" and func.attr in ("load", "unsafe_load", "full_load")):
            out.append(f"{where} calls {owner}.{func.attr}")
        if owner in ("pickle", "dill", "cloudpickle", "marshal", "joblib") and func.attr in ("load", "loads"):
            out.append(f"{where} calls {owner}.{func.attr}")
    return out


def test_the_scanner_finds_what_it_looks_for():
    planted = """
import pickle
from dill import loads
eval("1")
exec("x = 1")
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
pd.read_pickle(path)
yaml.load(text)
model.eval()
torch.load(path, weights_only=True)
np.load(path, allow_pickle=False)
np.load(path)
"""
    found = unsafe_calls(planted)
    assert len(found) == 9, found
    assert not any(":12 " in f or ":13 " in f or ":14 " in f or ":15 " in f for f in found), found


def test_no_code_runs_on_load_anywhere_in_the_package_or_the_dashboard():
    files = [p for root in SCANNED if root.exists() for p in ([root] if root.is_file() else root.rglob("*.py"))]
    assert len(files) > 20 and any(p.name == "reader.py" for p in files)
    found = [hit for p in files for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert not found, "\n".join(found)


# ---- concurrency -------------------------------------------------------------------------------------------------
def digest(archive: Archive) -> dict[str, str]:
    """sha256 of every tensor of every sample and of the samples table (what a reader would show)."""
    out = {"samples": hashlib.sha256(archive.samples.to_csv(index=False).encode()).hexdigest()}
    for sample in range(archive.n_samples):
        for key in archive.keys(sample):
            out[f"{sample}/{key}"] = hashlib.sha256(archive.read(sample, key).tobytes()).hexdigest()
    return out


class Poller(threading.Thread):
    """Polls list_runs and Archive.open on the live run's two directories until stopped; records what it saw."""

    def __init__(self, runs: Path, run_id: str):
        super().__init__(daemon=True)
        self.runs, self.run_id = runs, run_id
        self.stop, self.polls, self.seen, self.problems = threading.Event(), 0, [], []
        self.nothing = self.complete = 0

    def run(self):
        while not self.stop.is_set():
            self.polls += 1
            try:
                good, bad = list_runs(self.runs)
                if self.run_id in bad:
                    self.problems.append(f"list_runs: {bad[self.run_id]}")
                listed = [a for a in good if a.path.name == self.run_id]
                for archive in listed:
                    self.seen.append(("list_runs", digest(archive)))
                self.complete += bool(listed)
                self.nothing += not listed
                partial = self.runs / f"{self.run_id}.partial"
                try:
                    self.seen.append(("partial", digest(Archive.open(partial))))
                except ArchiveError:
                    pass  # no manifest yet, or the directory was renamed while we read: nothing
            except Exception as err:  # noqa: BLE001 - anything but nothing-or-complete is a torn read
                self.problems.append(f"{type(err).__name__}: {err}")
            time.sleep(0.005)


def test_a_reader_sees_nothing_or_the_complete_run_while_capture_writes_dies_and_resumes(base, tmp_path):
    from fault.harness import KillHarness, KillPoint

    h = KillHarness(tmp_path, n_seeds=5)
    other = Path(shutil.copytree(base, h.runs / "other"))  # a finished run next to the one being written
    before = digest(Archive.open(other))
    poller = Poller(h.runs, "live")
    poller.start()
    try:
        killed = h.start("live", KillPoint("shard.done", nth=3))
        assert killed.wait(h.timeout) == -9, killed.output()
        resumed = h.start("live")
        assert resumed.wait(h.timeout) == 0, resumed.output()
        deadline = time.monotonic() + 5
        while poller.complete < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        poller.stop.set()
        poller.join(10)
    assert not poller.problems, poller.problems[:5]
    assert poller.nothing > 10 and poller.complete >= 3, (poller.nothing, poller.complete)
    final = digest(Archive.open(h.runs / "live"))
    torn = [where for where, seen in poller.seen if seen != final]
    assert not torn and len(final) > 5, torn[:5]
    assert digest(Archive.open(other)) == before and "other" in [a.path.name for a in list_runs(h.runs)[0]]


# ---- the dashboard: broken runs are error cards, good runs keep working -----------------------------------------
def _deep(run: Path) -> None:
    (run / MANIFEST).write_text("[" * 100_000)


def _oversize(run: Path) -> None:
    with open(run / MANIFEST, "r+b") as f:
        f.truncate(9 * 2**20)


def _escaping_manifest(run: Path) -> None:
    outside = run.parent.parent / "outside-manifest.json"
    shutil.move(run / MANIFEST, outside)
    (run / MANIFEST).symlink_to(outside)


BROKEN = {  # run name: (damage to a copy of the base run, what its error card must say)
    "future-schema": (lambda r: edit_manifest(r, lambda m: m.update(schema_version=2)), "schema_version 2 is not"),
    "empty-run": (lambda r: edit_manifest(r, lambda m: m.update(n_samples=0, shards=[])), "at least one sample"),
    "zero-steps": (lambda r: edit_manifest(r, lambda m: m.update(n_steps=0, steps=[])), "at least one denoising"),
    "missing-keys": (lambda r: edit_manifest(r, lambda m: m.pop("sites")), "misses required keys: sites"),
    "wrong-types": (lambda r: edit_manifest(r, lambda m: m.update(sites=[])), "'sites' must be an object"),
    "not-json": (lambda r: (r / MANIFEST).write_text("{"), "is not valid JSON"),
    "deep-json": (_deep, "nested too deeply"),
    "oversize": (_oversize, "over the 8388608-byte limit"),
    "escaping-manifest": (_escaping_manifest, "manifest.json resolves outside the run directory"),
    "bad-shard-path": (lambda r: edit_manifest(r, lambda m: m["shards"].__setitem__(0, "../x.safetensors")),
                       "shard entry '../x.safetensors' is not allowed"),
    "notes": (lambda r: [p.unlink() if p.is_file() else shutil.rmtree(p) for p in list(r.iterdir())],
              "is not a cos-lab archive"),
    # fields the reader did not check, each of which crashed the Overview for every run (issue 19)
    "ensemble-empty": (lambda r: edit_manifest(r, lambda m: m["config"].update(ensemble={})),
                       "config.ensemble must be null or"),
    "model-string": (lambda r: edit_manifest(r, lambda m: m.update(model="x")), "'model' must be an object"),
    "command-int": (lambda r: edit_manifest(r, lambda m: m.update(command=["cos", 1])),
                    "'command' must be a list of strings"),
    "decoded-short": (lambda r: edit_manifest(r, lambda m: m["decoded"].update(shape=[2, 8])),
                      "'decoded' must be null or"),
    "frames-1e12": (lambda r: edit_manifest(r, lambda m: m["latent"].update(frames=10**12)),
                    "'latent' must give integers"),
    "markdown-run-id": (lambda r: edit_manifest(r, lambda m: m.update(run_id=HOSTILE)), "is not allowed"),
}
HOSTILE = "x`](https://evil.example) ![](https://evil.example/p.png) :red[alarm]"


def _samples_column(run: Path, column: str, values: list) -> None:
    table = pd.read_parquet(run / SAMPLES)
    table[column] = values
    table.to_parquet(run / SAMPLES)


# runs whose manifest opens but whose files are hostile: (damage, what the page that reads them must say)
HOSTILE_FILES = {
    "fifo-shard": lambda r: ((r / shard_name(1)).unlink(), os.mkfifo(r / shard_name(1))),
    "string-scores": lambda r: _samples_column(r, "score_correct", ["yes", "no"]),
    "bad-answer": lambda r: _samples_column(r, "answer", ['{"a": 1}', "{not json"]),
    "hostile-tables": lambda r: (plant_derived(r, "probe_grid", GRID.assign(accuracy=["high"] * 4)),
                                 (r / "annotations.json").write_text('{"sample": 0}'),
                                 (r / "derived" / "step_answers.parquet").symlink_to(r / "gone.parquet"),
                                 os.mkfifo(r / "derived" / "convergence.parquet")),
    "bomb": lambda r: ((r / "derived").mkdir(), bomb(r / "derived" / "probe_grid.parquet")),
    "analysed": lambda r: publish_derived(r, {"probe_grid": GRID, "events": EVENTS}, producer="test"),
}


@pytest.fixture(scope="module")
def dashboard_runs(base, tmp_path_factory) -> Path:
    """A runs directory: one good run, one whose sample 1 lies about its dtypes, every BROKEN run, every HOSTILE_FILES
    run, a folder whose name is not UTF-8, a run linked in from outside, and an unfinished `.partial` run (which must
    not show at all)."""
    root = tmp_path_factory.mktemp("dashboard")
    runs = root / "runs"
    for name in ("good", "bad-dtype", *BROKEN, *HOSTILE_FILES, "unfinished.partial"):
        shutil.copytree(base, runs / name)
        edit_manifest(runs / name, lambda m: m.update(run_id=name))
    for name, (damage, _) in BROKEN.items():
        damage(runs / name)
    for name, damage in HOSTILE_FILES.items():
        damage(runs / name)
    for key in ("x0_hat", "decoded/x0_hat"):
        rewrite_shard(runs / "bad-dtype", 1, lambda t: t.__setitem__(key, t[key].astype(np.float64)))
    shutil.copytree(base, root / "outside")
    (runs / "linked-outside").symlink_to(root / "outside")
    shutil.copytree(base, os.fsdecode(os.fsencode(runs) + b"/caf\xe9"))  # not UTF-8
    return runs


def literal_in(card: str, text: str) -> bool:
    """`text` is in `card` inside a markdown code span (shown as it is, not rendered)."""
    return any(text in part for part in re.findall(r"(`+)(.+?)\1", card) for part in part[1:])


@pytest.fixture
def app(dashboard_runs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("COS_RUNS_DIR", str(dashboard_runs))
    return AppTest.from_file(str(REPO / "app.py"), default_timeout=120)


def test_the_overview_shows_every_broken_run_as_an_error_card_and_lists_the_good_ones(app):
    at = app.switch_page("views/overview.py").run()
    assert not at.exception, [e.value for e in at.exception]
    cards = {name: [e.value for e in at.error if f"**`{name}`**" in e.value]
             for name in (*BROKEN, "linked-outside", "unfinished.partial", "caf\\xe9")}
    for name, (_, message) in BROKEN.items():
        assert len(cards[name]) == 1 and literal_in(cards[name][0], message), (name, cards[name])
    assert literal_in(cards["markdown-run-id"][0], "https://evil.example/p.png"), "a hostile run id was rendered"
    assert len(cards["linked-outside"]) == 1 and "links outside the runs directory" in cards["linked-outside"][0]
    assert len(cards["caf\\xe9"]) == 1 and "not UTF-8" in cards["caf\\xe9"][0]
    assert not cards["unfinished.partial"], "an unfinished run was shown"
    assert sorted(at.dataframe[0].value["run"]) == sorted(["bad-dtype", "good", *HOSTILE_FILES])
    assert any(f"{len(BROKEN) + 2} run(s) in this directory cannot be read" in w.value for w in at.sidebar.warning)
    shards = [e.value for e in at.error if e.value.startswith("**fifo-shard**")]
    assert len(shards) == 1 and "1 of 2 sample shards cannot be read" in shards[0] and "is a FIFO" in shards[0]


def test_a_sample_whose_shard_lies_is_an_error_card_while_its_other_sample_and_other_runs_show(app):
    app.query_params["run"] = "bad-dtype"
    at = app.switch_page("views/steps.py").run()
    at.sidebar.selectbox(key="sample").set_value(1).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.error and "sample 1: decoded/x0_hat is stored as float64" in at.error[0].value, \
        [e.value for e in at.error]
    at.sidebar.selectbox(key="sample").set_value(0).run()
    assert not at.exception and not at.error and at.get("plotly_chart"), [e.value for e in at.error]
    at.sidebar.selectbox(key="run").set_value("good").run()
    at.sidebar.selectbox(key="sample").set_value(1).run()
    assert not at.exception and not at.error and at.get("plotly_chart"), [e.value for e in at.error]


def test_a_fifo_shard_is_a_card_on_steps_while_the_other_sample_shows(app):
    app.query_params["run"] = "fifo-shard"
    at = app.switch_page("views/steps.py").run()
    at.sidebar.selectbox(key="sample").set_value(1).run()
    assert not at.exception and at.error and "is a FIFO, not a regular file" in at.error[0].value
    at.sidebar.selectbox(key="sample").set_value(0).run()
    assert not at.exception and not at.error and at.get("plotly_chart"), [e.value for e in at.error]


def test_a_samples_table_of_the_wrong_kind_is_a_sidebar_card_and_other_runs_still_show(app):
    app.query_params["run"] = "string-scores"
    at = app.switch_page("views/steps.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("column 'score_correct' must hold numbers" in e.value for e in at.sidebar.error)
    assert any("No readable run is selected" in e.value for e in at.error)
    at.sidebar.selectbox(key="run").set_value("good").run()
    assert not at.exception and not at.error and at.get("plotly_chart"), [e.value for e in at.error]


def test_compare_against_a_run_whose_answers_are_not_json_is_a_card(app):
    app.query_params["run"] = "good"
    app.query_params["run_b"] = "bad-answer"
    at = app.switch_page("views/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.error and "column 'answer' row 1 is not valid JSON" in at.error[0].value


@pytest.mark.parametrize("page, run, message", [
    ("probes", "hostile-tables", "column 'accuracy' must hold numbers"),
    ("probes", "bomb", "declares 60000000 rows, over the 2000000-row limit"),
    ("self_correction", "hostile-tables", "must hold a JSON list of labels"),
    ("steps", "hostile-tables", "derived/step_answers.parquet is missing \\(a dangling symlink\\)"),
])
def test_hostile_tables_are_cards_on_the_page_that_reads_them(app, page, run, message):
    app.query_params["run"] = run
    at = app.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(re.search(message, e.value) for e in at.error), [e.value for e in at.error]
    if page == "steps":  # what comes before the broken table still shows
        assert at.get("plotly_chart")


def test_the_same_pages_render_a_run_with_good_tables(app):
    app.query_params["run"] = "analysed"
    for page in ("probes", "self_correction"):
        at = app.switch_page(f"views/{page}.py").run()
        assert not at.exception and not at.error and at.get("plotly_chart"), (page, [e.value for e in at.error])
