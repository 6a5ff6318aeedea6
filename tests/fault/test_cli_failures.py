"""Every way the machine can say no to `cos capture` / `cos analyze` (issue 19) ends in one line naming the file and the
fix, exit code 2, and nothing lost: a disk that fills up mid-capture and mid-publish (a small tmpfs), a read-only
runs directory (a read-only tmpfs), a `derived` that is a file, a damaged shard and a stray file inside `.partial`.
Mounting needs root; without it those cases are skipped (the others run anywhere).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from cos_core.archive import Archive, publish_derived
from cos_core.archive.schema import PARTIAL_SUFFIX, shard_name
from cos_core.cli import main

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def capture_args(runs: Path, run_id: str, seeds: str = "0,1,2") -> list[str]:
    return ["capture", "--model", "tiny:wan_t2v", "--seeds", seeds, "--runs-dir", str(runs), "--run-id", run_id,
            "--num-inference-steps", "4", "--layers", "0"]


def one_line(capsys, command: str, code: int, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"cos {command}: error: ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and re.search(pattern, lines[0]), err
    return lines[0]


@contextmanager
def tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted under tmp_path (root only), unmounted after."""
    where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave: int) -> Path:
    """A file taking all of `where`'s free space but `leave` bytes."""
    free = shutil.disk_usage(where).free
    filler = where / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Archive:
    runs = tmp_path_factory.mktemp("whole")
    assert main(capture_args(runs, "whole")) == 0
    return Archive.open(runs / "whole")


def test_a_disk_that_fills_up_mid_capture_is_one_line_and_the_rerun_resumes(whole, tmp_path, capsys):
    shard = (whole.path / shard_name(0)).stat().st_size
    with tmpfs(tmp_path, "8m") as mnt:
        runs = mnt / "runs"
        filler = fill(mnt, int(1.6 * shard))  # room for the first shard, not the second
        line = one_line(capsys, "capture", main(capture_args(runs, "full")),
                        "sample_00000[12].safetensors: No space left on device \\(the disk is full: free space")
        partial = runs / f"full{PARTIAL_SUFFIX}"
        kept = sorted(p.name for p in (partial / "shards").iterdir())
        assert kept == ["sample_000000.safetensors"], (kept, line)  # finished work kept, no temp file left
        filler.unlink()
        assert main(capture_args(runs, "full")) == 0
        again = Archive.open(runs / "full")
        for sample in range(3):
            np.testing.assert_array_equal(again.read(sample, "x0_hat"), whole.read(sample, "x0_hat"))


def test_a_disk_that_fills_up_mid_publish_keeps_the_old_derived_set(whole, tmp_path):
    rng = np.random.default_rng(0)  # random values: the table does not compress below the space left
    table = pd.DataFrame({"sample": np.arange(200_000) % 3, "step": np.arange(200_000) % 4,
                          "dist_final": rng.random(200_000)})
    with tmpfs(tmp_path, "8m") as mnt:
        run = Path(shutil.copytree(whole.path, mnt / "run"))
        publish_derived(run, {"events": pd.DataFrame({"sample": [0], "kind": ["switch"], "step": [1]})}, producer="a")
        before = sorted(os.listdir(run / "derived")), (run / "derived" / "manifest.json").read_bytes()
        fill(mnt, 100_000)
        with pytest.raises(OSError, match="No space left on device"):
            publish_derived(run, {"convergence": table}, producer="b")
        assert (sorted(os.listdir(run / "derived")), (run / "derived" / "manifest.json").read_bytes()) == before
        assert Archive.open(run).derived("events")["kind"].tolist() == ["switch"]
        assert not [p for p in run.iterdir() if p.name.startswith(".derived.tmp-")]


def test_a_read_only_runs_directory_is_one_line_for_capture_and_analyze(whole, tmp_path, capsys):
    with tmpfs(tmp_path, "8m") as mnt:
        shutil.copytree(whole.path, mnt / "runs" / "whole")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        one_line(capsys, "capture", main(capture_args(mnt / "runs", "new")),
                 "cannot create the run directory .*new.partial: Read-only file system \\(choose a writable "
                 "--runs-dir\\)")
        one_line(capsys, "analyze", main(["analyze", str(mnt / "runs" / "whole"), "--which", "convergence"]),
                 "whole/.derived.lock: Read-only file system \\(the file system is read-only: choose a writable "
                 "--runs-dir, or work on a writable copy of the run\\)")


def test_a_derived_that_is_a_file_is_one_line_and_left_alone(whole, tmp_path, capsys):
    run = Path(shutil.copytree(whole.path, tmp_path / "run"))
    (run / "derived").write_text("my notes")
    one_line(capsys, "analyze", main(["analyze", str(run), "--which", "convergence"]),
             "run/derived is a file, not a folder: move it away")
    assert (run / "derived").read_text() == "my notes"


def interrupted(tmp_path: Path, monkeypatch) -> Path:
    """A `.partial` run whose three shards are written and whose finalize never ran."""
    from cos_core.archive.writer import RunWriter

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "finalize", stop)
    with pytest.raises(KeyboardInterrupt):
        main(capture_args(tmp_path, "r"))
    monkeypatch.undo()
    return tmp_path / f"r{PARTIAL_SUFFIX}"


def test_a_damaged_shard_inside_partial_is_named_and_the_fix_works(tmp_path, capsys, monkeypatch):
    partial = interrupted(tmp_path, monkeypatch)
    shard = partial / shard_name(1)
    os.truncate(shard, shard.stat().st_size // 3)
    one_line(capsys, "capture", main(capture_args(tmp_path, "r")),
             "r.partial/shards/sample_000001.safetensors is damaged or not a cos-lab shard \\(SafetensorError: .*\\); "
             "delete it and rerun the same command")
    assert (partial / shard_name(0)).is_file() and (partial / shard_name(2)).is_file()  # nothing else lost
    shard.unlink()
    assert main(capture_args(tmp_path, "r")) == 0 and Archive.open(tmp_path / "r").read(1, "final").shape


def test_a_stray_file_in_the_shards_of_partial_is_named(tmp_path, capsys, monkeypatch):
    partial = interrupted(tmp_path, monkeypatch)
    stray = partial / "shards" / "sample_000001 (copy).safetensors"
    shutil.copy(partial / shard_name(1), stray)
    one_line(capsys, "capture", main(capture_args(tmp_path, "r")),
             "sample_000001 \\(copy\\).safetensors is not a shard name cos-lab writes .*; move it out of the run")
    stray.unlink()
    assert main(capture_args(tmp_path, "r")) == 0
