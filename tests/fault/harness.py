"""Kill harness: run `cos capture` in a child process, SIGKILL it at a named writer point or at a random moment,
check what a reader sees, resume, and compare the result with an uninterrupted run.

Owns `KillPoint`, `KillHarness` and the checks (nothing reported complete unless it equals the uninterrupted run,
finished shards never rewritten, a rerun resumes to the same archive). Children are forked from a forkserver that
has torch/diffusers imported (a fresh `python -m cos_core.cli` costs 5-20 s of imports on a busy 2-core box), or
spawned as real `python -m cos_core.cli` processes with COS_FAULT_POINT set (mode="spawn"). Imports no test code.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cos_core.archive import Archive, ArchiveError, list_runs
from cos_core.archive.schema import (MANIFEST, PARTIAL_MANIFEST, PARTIAL_SUFFIX, PROVENANCE_KEYS, SAMPLES, SHARD_DIR,
                                     shard_name)
from cos_core.archive.writer import FAULT_ENV, FAULT_POINTS

REPO = Path(__file__).resolve().parents[2]
# tiny Wan 2.1, 4 steps, both layers' reductions, one token pair: ~0.1 s per sample on one thread
CAPTURE = ("--model", "tiny:wan_t2v", "--num-inference-steps", "4", "--tokens", "1:3")
PRELOAD = ["torch", "diffusers", "tqdm", "cos_core.cli", "cos_core.cli.capture", "cos_core.capture.run",
           "cos_core.capture.sources", "cos_core.capture.tiny_pipelines"]
ALREADY_COMPLETE = "a complete run already exists"


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: a writer fault point (its `nth` arrival in this process), or `delay` seconds after a moment.

    Timed kills (`point` None) count from `after`: "start" (process start) or "shards" (the run's `nth` new shard
    appearing in this process, found by polling; nth=0: when the capture starts, i.e. the run directory appears).
    `truncate`: for point "shard.tmp", cut the temp file to this fraction (what a kill inside the write leaves)."""

    point: str | None = None
    nth: int = 1
    delay: float = 0.0
    after: str = "shards"
    truncate: float | None = None

    def __post_init__(self):
        if self.point is not None and self.point not in FAULT_POINTS:
            raise ValueError(f"point {self.point!r} is not a writer fault point; allowed: {FAULT_POINTS}")
        if self.after not in ("start", "shards") or self.nth < (1 if self.point else 0):
            raise ValueError(f"after={self.after!r}, nth={self.nth}: use 'start' or 'shards', nth >= 1 for points")
        if self.truncate is not None and (self.point != "shard.tmp" or not 0 <= self.truncate < 1):
            raise ValueError("truncate applies to point 'shard.tmp' and must be in [0, 1)")

    @property
    def label(self) -> str:
        if self.point is None:
            return f"timed+{self.delay:.2f}s@" + ("start" if self.after == "start" else f"shard{self.nth}")
        return f"{self.point}@{self.nth}" + ("" if self.truncate is None else f"+cut{self.truncate:.2f}")

    @property
    def fault(self) -> str | None:
        return None if self.point is None else f"{self.point}@{self.nth}"


@dataclass
class Outcome:
    """One child run: a kill (or the final resume) and what the checks found. `problems` must stay empty; each
    starts with its kind: "wrong:" (a reader was shown an incomplete or torn run as complete), "rewritten:" (a
    finished shard changed), "lost:" (the rerun did not end in the uninterrupted archive), "harness:" (the kill did
    not happen where it was asked for)."""

    run_id: str
    kill: str
    mode: str
    killed: bool
    exitcode: int | None
    seconds: float
    state: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- children ----------------------------------------------------------------------------------------------------
def _child(argv: list[str], fault: str | None, log: str) -> None:
    """Forkserver child: `cos` with output to `log`, one torch thread, the writer's fault hook armed."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import threading

    import torch
    import tqdm

    torch.set_num_threads(1)
    tqdm.tqdm.set_lock(threading.RLock())  # tqdm's default lock is a multiprocessing one a SIGKILL would leak
    from cos_core.archive import writer
    from cos_core.cli import main

    writer._FAULT = fault
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _noop() -> None:
    pass


class Child:
    """A running `cos` process of either kind, with one interface: pid, poll(), wait(), kill()."""

    def __init__(self, argv: list[str], fault: str | None, log: Path, mode: str):
        self.mode, self.log = mode, log
        if mode == "fork":
            self.proc = _context().Process(target=_child, args=(argv, fault, str(log)))
            self.proc.start()
            self.pid = self.proc.pid
        elif mode == "spawn":
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", FAULT_ENV: fault or ""}
            with open(log, "wb") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "cos_core.cli", *argv], env=env, stdout=out,
                                             stderr=subprocess.STDOUT, cwd=log.parent)
            self.pid = self.proc.pid
        else:
            raise ValueError(f"mode {mode!r}: use 'fork' or 'spawn'")

    def poll(self) -> int | None:
        if self.mode == "fork":
            return self.proc.exitcode
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        if self.mode == "fork":
            self.proc.join(timeout)
            return self.proc.exitcode
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


_CONTEXT = None


def _context():
    """The forkserver context, started once with torch/diffusers/cos_core imported and OMP_NUM_THREADS=1."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD + [__name__])
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if before is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = before
        warm = ctx.Process(target=_noop)  # returns once the server has imported PRELOAD
        warm.start()
        warm.join()
        _CONTEXT = ctx
    return _CONTEXT


# ---- checks ------------------------------------------------------------------------------------------------------
def read_shard(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def same_archive(a: Archive, ref: Archive) -> list[str]:
    """Differences between two archives: every tensor of every sample, the samples table, the manifest up to
    provenance (created, command, run_id). Empty when they hold the same capture."""
    try:
        if a.n_samples != ref.n_samples:
            return [f"{a.path.name}: {a.n_samples} samples, the uninterrupted run has {ref.n_samples}"]
        out = []
        for sample in range(ref.n_samples):
            if a.keys(sample) != ref.keys(sample):
                out.append(f"{a.path.name} sample {sample}: keys differ")
                continue
            out += [f"{a.path.name} sample {sample}: {key} differs" for key in ref.keys(sample)
                    if not np.array_equal(a.read(sample, key), ref.read(sample, key))]
        try:
            pd.testing.assert_frame_equal(a.samples, ref.samples)
        except AssertionError as err:
            out.append(f"{a.path.name}: samples table differs: {str(err)[:200]}")
        skip = PROVENANCE_KEYS
        if {k: v for k, v in a.manifest.items() if k not in skip} != \
                {k: v for k, v in ref.manifest.items() if k not in skip}:
            out.append(f"{a.path.name}: manifest differs")
        return out
    except ArchiveError as err:
        return [f"{a.path.name} opened as complete but fails to read: {err}"]


def snapshot(shard_dir: Path) -> dict[str, tuple[int, int, int]]:
    """{shard name: (inode, mtime_ns, size)} of the finished shards: a rewrite changes at least the inode."""
    if not shard_dir.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(shard_dir.glob("sample_*.safetensors"))}


# ---- the harness -------------------------------------------------------------------------------------------------
class KillHarness:
    """Kill, check, resume, compare, in `root`: `reference()` once, then `chain(run_id, kills)` per run."""

    def __init__(self, root: Path, n_seeds: int = 4, timeout: float = 180.0):
        self.root, self.n_seeds, self.timeout = Path(root), n_seeds, timeout
        self.runs = self.root / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.ref: Archive | None = None
        self.capture_seconds = 0.0  # partial directory appearing -> process exit, uninterrupted
        self.startup_seconds = 0.0  # process start -> partial directory appearing
        self.shard_seconds = 0.0  # one sample, from one shard appearing to the next (median)
        self.finalize_seconds = 0.0  # last shard appearing -> process exit
        self._n = 0

    def argv(self, runs: Path, run_id: str) -> list[str]:
        return ["capture", *CAPTURE, "--seeds", ",".join(map(str, range(self.n_seeds))), "--runs-dir", str(runs),
                "--run-id", run_id]

    def _start(self, runs: Path, run_id: str, fault: str | None, mode: str) -> Child:
        self._n += 1
        return Child(self.argv(runs, run_id), fault, self.logs / f"{self._n:04d}-{run_id}.log", mode)

    def start(self, run_id: str, kill: KillPoint | None = None, mode: str = "fork") -> Child:
        """Start a capture of `run_id` in `self.runs`, armed for a named kill point; no checks (for callers that
        watch it themselves, like the concurrency test)."""
        if kill is not None and kill.point is None:
            raise ValueError("start() arms named points only; run_once() does timed kills")
        return self._start(self.runs, run_id, kill.fault if kill else None, mode)

    def reference(self, mode: str = "fork") -> Archive:
        """The uninterrupted run, in its own runs directory (so `list_runs(self.runs)` never lists it)."""
        self.ref = Archive.open(self.calibrate("reference", mode))
        return self.ref

    def calibrate(self, run_id: str = "", mode: str = "fork") -> Path:
        """Run an uninterrupted capture into `root/reference` and time it (start-up, per sample, finalize), so that
        timed kills follow the machine's current speed; returns the run's path."""
        if mode == "fork":
            _context()  # start-up below is then the child's own (model build), not the server's imports
        self._n += 1
        run_id = run_id or f"calibrate{self._n}"
        runs = self.root / "reference"
        t0 = time.monotonic()
        child = self._start(runs, run_id, None, mode)
        partial = runs / f"{run_id}{PARTIAL_SUFFIX}"
        seen = self._wait_for(child, partial)
        self.startup_seconds = seen - t0
        shard_times = [self._wait_for(child, partial / shard_name(i)) for i in range(self.n_seeds)]
        code = child.wait(self.timeout)
        if code != 0:
            raise RuntimeError(f"the uninterrupted capture failed ({code}): {child.output()}")
        end = time.monotonic()
        self.capture_seconds = end - seen
        self.shard_seconds = float(np.median(np.diff([seen, *shard_times])))
        self.finalize_seconds = end - shard_times[-1]
        return runs / run_id

    def _wait_for(self, child: Child, path: Path) -> float:
        deadline = time.monotonic() + self.timeout
        while not path.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        return time.monotonic()

    def _wait_for_shards(self, child: Child, folder: Path, count: int) -> float:
        deadline = time.monotonic() + self.timeout
        while child.poll() is None and time.monotonic() < deadline and len(snapshot(folder)) < count:
            time.sleep(0.002)
        return time.monotonic()

    def state(self, run_id: str) -> dict:
        """What a kill left on disk for `run_id`."""
        final, partial = self.runs / run_id, self.runs / f"{run_id}{PARTIAL_SUFFIX}"
        where = final if final.is_dir() else partial
        return {"published": final.is_dir(), "partial": partial.is_dir(),
                "shards": len(snapshot(where / SHARD_DIR)),
                "tmp": sorted(str(p.relative_to(where)) for p in where.rglob(".*.tmp-*")) if where.is_dir() else [],
                "samples": (where / SAMPLES).is_file(), "manifest": (where / MANIFEST).is_file(),
                "resume_key": (where / PARTIAL_MANIFEST).is_file(),
                "hidden": sorted(p.name for p in self.runs.glob(f".{run_id}{PARTIAL_SUFFIX}.tmp-*"))}

    def run_once(self, run_id: str, kill: KillPoint | None, mode: str = "fork") -> Outcome:
        """One child: killed at `kill` (None: left to finish, the resume), then every check."""
        final, partial = self.runs / run_id, self.runs / f"{run_id}{PARTIAL_SUFFIX}"
        where = final if final.is_dir() else partial
        before = snapshot(where / SHARD_DIR)
        resuming = partial.is_dir()
        t0 = time.monotonic()
        child = self._start(self.runs, run_id, kill.fault if kill else None, mode)
        if kill is not None and kill.point is None:
            if kill.after == "start":
                until = t0 + kill.delay
            elif kill.nth == 0:  # a resumed run's directory is already there: count from when a new one would appear
                until = self._wait_for(child, partial) + kill.delay + (self.startup_seconds if resuming else 0.0)
            else:
                until = self._wait_for_shards(child, partial / SHARD_DIR, len(before) + kill.nth) + kill.delay
            while time.monotonic() < until and child.poll() is None:
                time.sleep(0.001)
            child.kill()
        code = child.wait(self.timeout)
        if code is None:
            child.kill()
            code = child.wait(10)
        out = Outcome(run_id, kill.label if kill else "resume", mode, code == -signal.SIGKILL, code,
                      round(time.monotonic() - t0, 3))
        out.state = self.state(run_id)
        if kill is not None and kill.point is not None:
            if not out.killed:
                out.problems.append(f"harness: fault point {kill.label} was never reached (exit {code}): "
                                    f"{child.output()}")
            elif not self._where_expected(kill, len(before), out.state):
                out.problems.append(f"harness: the kill at {kill.label} left an unexpected state: {out.state}")
        if kill is None:
            self._check_resumed(run_id, code, child, out)
        elif kill.truncate is not None and out.killed:
            self._cut_temp_shard(partial, kill.truncate, out)
        self._check_reader_view(run_id, out)
        self._check_kept(before, out)
        return out

    def chain(self, run_id: str, kills: list[KillPoint], modes: list[str] | None = None) -> list[Outcome]:
        """Kill the capture of `run_id` at each point in turn (each kill resumes the last), then let it finish."""
        modes = modes or ["fork"] * len(kills)
        outs = []
        for kill, mode in zip(kills, modes):
            if (self.runs / run_id).is_dir():
                break  # a timed kill came too late and the run is published: later points cannot be reached
            outs.append(self.run_once(run_id, kill, mode))
        return outs + [self.run_once(run_id, None)]

    # ---- the checks -------------------------------------------------------------------------------------------
    def _where_expected(self, kill: KillPoint, before: int, st: dict) -> bool:
        """The files on disk show the process died where the fault point says (the hook fired in the right place)."""
        n, tmp = self.n_seeds, st["tmp"]
        return {
            "create": not st["partial"] and not st["published"] and bool(st["hidden"]),
            "shard.tmp": st["partial"] and st["shards"] == before + kill.nth - 1
            and len([t for t in tmp if t.startswith("shards/")]) == 1,
            "shard.done": st["partial"] and st["shards"] == before + kill.nth and not tmp,
            "samples.tmp": st["shards"] == n and any(t.startswith(".samples") for t in tmp),
            "samples.done": st["shards"] == n and st["samples"] and not tmp,
            "manifest.tmp": st["samples"] and any(t.startswith(".manifest.json") for t in tmp),
            "manifest.done": st["partial"] and st["manifest"] and st["resume_key"],
            "publish.before_rename": st["partial"] and st["manifest"] and not st["resume_key"],
            "publish.done": st["published"] and not st["partial"],
        }[kill.point]

    def _cut_temp_shard(self, partial: Path, fraction: float, out: Outcome) -> None:
        temps = sorted((partial / SHARD_DIR).glob(".sample_*.tmp-*"))
        if len(temps) != 1:
            out.problems.append(f"harness: expected one half-written shard after the kill, found "
                                f"{[p.name for p in temps]}")
            return
        size = temps[0].stat().st_size
        os.truncate(temps[0], int(size * fraction))

    def _check_reader_view(self, run_id: str, out: Outcome) -> None:
        """A reader sees nothing or the complete run: list_runs, Archive.open on both directories, and every
        finished shard is whole and equal to the uninterrupted run's."""
        good, bad = list_runs(self.runs)
        if run_id in bad:
            out.problems.append(f"wrong: list_runs lists {run_id} as broken: {bad[run_id]}")
        for archive in good:
            if archive.path.name == run_id:
                out.problems += [f"wrong: list_runs listed {run_id}: {p}" for p in same_archive(archive, self.ref)]
        for folder in (self.runs / run_id, self.runs / f"{run_id}{PARTIAL_SUFFIX}"):
            if not folder.is_dir():
                continue
            try:
                archive = Archive.open(folder)
                out.problems += [f"wrong: Archive.open({folder.name}) said complete: {p}"
                                 for p in same_archive(archive, self.ref)]
            except ArchiveError as err:
                if folder.name == run_id:
                    out.problems.append(f"wrong: {run_id} was published but does not open: {err}")
            for shard in sorted((folder / SHARD_DIR).glob("sample_*.safetensors")):
                i = int(shard.stem.split("_")[1])
                try:
                    tensors, _ = read_shard(shard)
                except Exception as err:  # noqa: BLE001 - any failure here is a torn shard
                    out.problems.append(f"wrong: {folder.name}/{shard.name} is not whole: {err}")
                    continue
                if i >= self.ref.n_samples or sorted(tensors) != self.ref.keys(i) or any(
                        not np.array_equal(v, self.ref.read(i, k)) for k, v in tensors.items()):
                    out.problems.append(f"wrong: {folder.name}/{shard.name} differs from the uninterrupted run")

    def _check_kept(self, before: dict, out: Outcome) -> None:
        """Shards that were finished before this child are there, untouched (same inode, mtime and size)."""
        run_id = out.run_id
        final = self.runs / run_id
        now = snapshot((final if final.is_dir() else self.runs / f"{run_id}{PARTIAL_SUFFIX}") / SHARD_DIR)
        changed = sorted(name for name, stat in before.items() if now.get(name) != stat)
        if changed:
            out.problems.append(f"rewritten: finished shards rewritten or lost: {changed}")

    def _check_resumed(self, run_id: str, code: int | None, child: Child, out: Outcome) -> None:
        final, partial = self.runs / run_id, self.runs / f"{run_id}{PARTIAL_SUFFIX}"
        if code == 2 and ALREADY_COMPLETE in child.output():
            pass  # the kill came after the run was complete: rerunning says so and leaves it alone
        elif code != 0:
            out.problems.append(f"lost: the rerun failed with exit {code}: {child.output()}")
            return
        if partial.exists() or not final.is_dir():
            out.problems.append(f"lost: after the rerun: partial exists={partial.exists()}, "
                                f"final exists={final.is_dir()}")
            return
        try:
            out.problems += [f"lost: {p}" for p in same_archive(Archive.open(final), self.ref)]
        except ArchiveError as err:
            out.problems.append(f"lost: the resumed run does not open: {err}")
        leftovers = [str(p.relative_to(final)) for p in final.rglob("*") if ".tmp-" in p.name
                     or p.name == PARTIAL_MANIFEST]
        if leftovers:
            out.problems.append(f"lost: the published run holds leftovers: {leftovers}")
