"""Fuzzing the archive reader with hypothesis: random JSON, random bytes and mutated valid manifests as manifest.json,
random bytes, bit flips, cuts and mutated headers as a shard; random and mutated JSON as the derived manifest and as
annotations.json; bit flips and cuts of samples.parquet and of a derived table. Whatever the input, `read_manifest`,
`Archive.open`, `list_runs`, `shard_problems` and every look-up either work or raise `ArchiveError`, the reader's
documented error type; nothing else.

Examples are derandomized (the same ones on every CI run); COS_FUZZ_RANDOM=1 explores new ones and
COS_FUZZ_EXAMPLES=<n> sets how many per test (default 200).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cos_core.archive import Archive, ArchiveError, list_runs, publish_derived
from cos_core.archive.derived import read_derived_set
from cos_core.archive.manifest import read_manifest
from cos_core.archive.runs import shard_problems
from cos_core.archive.schema import ANNOTATIONS, DERIVED_MANIFEST, MANIFEST, SAMPLES, act_key, shard_name, token_key
from cos_core.archive.writer import RunWriter

FUZZ = settings(max_examples=int(os.environ.get("COS_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
                derandomize=not os.environ.get("COS_FUZZ_RANDOM"), suppress_health_check=[HealthCheck.too_slow])
SITE = "block_out"
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4),
                    max_leaves=20)


def write_run(runs: Path) -> Path:
    """Two samples with every kind of tensor (x0_hat, final, two reductions on two branches, bfloat16 tokens,
    decoded frames), written by the real RunWriter."""
    rng = np.random.default_rng(0)
    layout = {"steps": [{"step": s, "t": 999.0 - 300 * s, "sigma": 1 - s / 3, "expert": "transformer"}
                        for s in range(3)], "n_steps": 3,
              "latent": {"channels": 2, "frames": 2, "height": 2, "width": 4},
              "token_grid": {"frames": 2, "rows": 1, "cols": 2, "patch": [1, 2, 2]},
              "tensors": {"x0_hat": {"steps": [1, 2], "dtype": "float32", "shape": [2, 2, 2, 4]}},
              "sites": {SITE: {"n_layers": 2, "layers": [0, 1], "steps": [0, 2], "branches": ["cond", "uncond"],
                               "dim": 3, "dtype": "float32", "reductions": {"frame_mean": {"shape": [2, 3]},
                                                                            "token_norm": {"shape": [2, 1, 2]}},
                               "tokens": [[1, 2]], "token_dtype": "bfloat16"}},
              "decoded": {"steps": [2], "shape": [2, 4, 8, 3]}}
    writer = RunWriter(runs, "fuzz", {})
    for sample in range(2):
        tensors = {"x0_hat": rng.normal(size=(2, 2, 2, 2, 4)).astype(np.float32),
                   "final": rng.normal(size=(2, 2, 2, 4)).astype(np.float32),
                   "decoded/x0_hat": rng.integers(0, 255, (1, 2, 4, 8, 3), dtype=np.uint8),
                   "decoded/final": rng.integers(0, 255, (2, 4, 8, 3), dtype=np.uint8)}
        for branch in ("cond", "uncond"):
            tensors[act_key(SITE, "frame_mean", branch)] = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
            tensors[act_key(SITE, "token_norm", branch)] = rng.random((2, 2, 2, 1, 2)).astype(np.float32)
            tensors[token_key(SITE, 1, 2, branch)] = rng.integers(0, 2**16, (2, 1, 2, 3), dtype=np.uint16)
        writer.write_sample(sample, tensors, {"sample_id": f"s{sample}", "seed": sample, "instance": "0",
                                              "label_goal": sample, "answer": json.dumps({"goal": sample}),
                                              "score_correct": float(sample)}, layout)
    run = writer.finalize(2, {"config": {"fuzz": True}})
    grid = pd.DataFrame({"label": ["goal"] * 2, "layer": [0, 1], "step": [0, 2], "accuracy": [0.5, 1.0],
                         "chance": [0.5, 0.5], "n": [2, 2]})
    publish_derived(run, {"probe_grid": grid, "events": pd.DataFrame({"sample": [1], "kind": ["switch"],
                                                                      "step": [2]})}, producer="fuzz")
    Archive.open(run).add_annotation({"sample": 0, "sample_id": "s0", "category": "Memory", "step": 1, "note": "x",
                                      "created": ""})
    return run


FILES = (MANIFEST, shard_name(0), SAMPLES, ANNOTATIONS, f"derived/{DERIVED_MANIFEST}", "derived/probe_grid.parquet")


class Scratch:
    """One valid run plus a copy that each example overwrites: one of `FILES`, all restored after."""

    def __init__(self, root: Path):
        self.good = write_run(root / "made")
        self.runs = root / "runs"
        self.path = Path(shutil.copytree(self.good, self.runs / "fuzz"))
        self.manifest = json.loads((self.good / MANIFEST).read_text())
        self.shard = (self.good / shard_name(0)).read_bytes()
        self.files = {name: (self.good / name).read_bytes() for name in FILES}

    def restore(self) -> None:
        for name, data in self.files.items():
            (self.path / name).write_bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("fuzz"))


def attempt(call) -> None:
    try:
        call()
    except ArchiveError:
        pass


def exercise(s: Scratch) -> None:
    """Every reader entry point on the damaged run; only ArchiveError may come out."""
    try:
        attempt(lambda: read_manifest(s.path))
        list_runs(s.runs)  # reports a broken run in its second return value, never raises
        try:
            a = Archive.open(s.path)
        except ArchiveError:
            return
        repr(a)
        attempt(lambda: a.steps)
        attempt(lambda: a.samples)
        for sample in range(a.n_samples):
            attempt(lambda: a.keys(sample))
            for name in list(a.manifest["tensors"]) + ["x_t"]:
                attempt(lambda: a.tensor(name, sample=sample))
                attempt(lambda: a.tensor(name, sample=sample, step=2))
            attempt(lambda: a.read(sample, "final"))
            attempt(lambda: a.read(sample, "final", (slice(0, 1),)))
            attempt(lambda: a.decoded(sample=sample))
            attempt(lambda: a.decoded(sample=sample, step=2))
            for site in a.sites:
                for pair in a.site(site).get("tokens", []):
                    attempt(lambda: a.tokens(site, sample=sample, layer=pair[0], step=pair[1], branch="uncond"))
                for reduction in a.reductions(site):
                    for branch in a.site(site)["branches"]:
                        attempt(lambda: a.act(site, reduction, sample=sample, branch=branch))
                        attempt(lambda: a.act(site, reduction, sample=sample, layer=1, step=2, branch=branch))
                    attempt(lambda: a.stack(site, reduction, over="sample"))
                    attempt(lambda: a.stack(site, reduction, over="layer", samples=[sample], step=0))
        attempt(lambda: shard_problems(a))
        attempt(lambda: a.derived_names())
        for name in ("probe_grid", "events"):
            attempt(lambda: a.derived(name))
        attempt(lambda: read_derived_set(a.path, ["probe_grid", "events"]))
        attempt(lambda: a.annotations())
    finally:
        s.restore()


def mutate(data, value, depth: int = 0):
    """A copy of a JSON value with one random change somewhere inside: a key dropped, a value replaced by random
    JSON, or a number or list nudged to an edge (0, -1, huge, one element more or less)."""
    if isinstance(value, (dict, list)) and value and data.draw(st.integers(0, 3)) > 0:
        keys = sorted(value) if isinstance(value, dict) else list(range(len(value)))
        key = data.draw(st.sampled_from(keys))
        out = dict(value) if isinstance(value, dict) else list(value)
        if data.draw(st.integers(0, 5)) == 0:
            del out[key]
        else:
            out[key] = mutate(data, value[key], depth + 1)
        return out
    if isinstance(value, bool) or value is None:
        return data.draw(JSON)
    if isinstance(value, (int, float)):
        return data.draw(st.sampled_from([0, -1, value + 1, 2**40, -2**63, 0.5, float("nan"), str(value), [value]]))
    if isinstance(value, list):
        return data.draw(st.sampled_from([[], value * 2, value[:-1] or [None], {"0": value}]))
    return data.draw(JSON)


@FUZZ
@given(doc=JSON)
def test_random_json_as_manifest(scratch, doc):
    (scratch.path / MANIFEST).write_text(json.dumps(doc))
    exercise(scratch)


@FUZZ
@given(blob=st.binary(max_size=2000))
def test_random_bytes_as_manifest(scratch, blob):
    (scratch.path / MANIFEST).write_bytes(blob)
    exercise(scratch)


@FUZZ
@given(data=st.data())
def test_mutated_valid_manifests(scratch, data):
    manifest = scratch.manifest
    for _ in range(data.draw(st.integers(1, 3))):
        manifest = mutate(data, manifest)
    (scratch.path / MANIFEST).write_text(json.dumps(manifest))
    exercise(scratch)


@FUZZ
@given(blob=st.binary(max_size=3000))
def test_random_bytes_as_a_shard(scratch, blob):
    (scratch.path / shard_name(0)).write_bytes(blob)
    exercise(scratch)


@FUZZ
@given(data=st.data())
def test_damaged_shards(scratch, data):
    """Bit flips (mostly in the header), a cut at a random length, a rewritten length field, a mutated header."""
    blob = bytearray(scratch.shard)
    n = struct.unpack("<Q", blob[:8])[0]
    kind = data.draw(st.sampled_from(["flip", "cut", "length", "header"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, min(len(blob), n + 64) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "cut":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "length":
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    else:
        header = mutate(data, json.loads(bytes(blob[8:8 + n])))
        text = json.dumps(header).encode()
        blob = bytearray(struct.pack("<Q", len(text)) + text) + blob[8 + n:]
    (scratch.path / shard_name(0)).write_bytes(bytes(blob))
    exercise(scratch)


@FUZZ
@given(data=st.data())
def test_random_and_mutated_json_as_derived_manifest_and_labels(scratch, data):
    name = data.draw(st.sampled_from([f"derived/{DERIVED_MANIFEST}", ANNOTATIONS]))
    valid = json.loads(scratch.files[name])
    doc = data.draw(JSON) if data.draw(st.booleans()) else mutate(data, mutate(data, valid))
    (scratch.path / name).write_text(json.dumps(doc))
    exercise(scratch)


@FUZZ
@given(data=st.data())
def test_damaged_tables(scratch, data):
    """Bit flips anywhere, or a cut at a random length, of samples.parquet or a derived table."""
    name = data.draw(st.sampled_from([SAMPLES, "derived/probe_grid.parquet"]))
    blob = bytearray(scratch.files[name])
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    (scratch.path / name).write_bytes(bytes(blob))
    exercise(scratch)


def test_the_fuzzed_run_is_valid_and_fully_read(scratch):
    """The base of every example reads end to end, so the fuzz starts from a run the reader accepts."""
    a = Archive.open(scratch.path)
    assert a.n_samples == 2 and len(a.keys(0)) == 10 and not shard_problems(a)
    assert a.derived_names() == ["events", "probe_grid"] and len(a.annotations()) == 1
    assert a.samples["score_correct"].tolist() == [0.0, 1.0]
    assert a.tokens(SITE, sample=0, layer=1, step=2).dtype == np.float32  # bfloat16 bits widened
    assert a.stack(SITE, "token_norm", over="sample").shape == (2, 2, 2, 2, 1, 2)
