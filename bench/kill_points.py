"""Crash safety of `cos capture`, measured: SIGKILL it at >= 100 points and count what went wrong (must be nothing).

Every named writer fault point (partial directory created; each shard's temp file written, also cut short to a random
length as a kill inside the write leaves it; each shard renamed; samples.parquet and manifest.json temp written and
renamed; just before and just after the final directory rename) starts a run, and random-moment kills fill the rest:
a uniform delay of up to one sample's time after the k-th new shard appears (k uniform over 0..n, k=n lands in the
finalize), or (15 %) a delay after process start, during model building. A run is killed 1-3 times in a row (each
rerun resumes the last and may itself be killed), then rerun to the end. After every kill the harness in
tests/fault/harness.py checks what `list_runs` / `Archive.open` report, that every finished shard is whole and equal to
an uninterrupted run's and never rewritten later, and that the final rerun ends in the uninterrupted run's archive.
Writes bench/results/kill_points.json.

    python bench/kill_points.py                 # 110 kill points, 4 samples per run, 6 of them via python -m
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cos_core.archive.writer import FAULT_POINTS  # noqa: E402
from tests.fault.harness import KillHarness, KillPoint  # noqa: E402

FINALIZE = ("samples.tmp", "samples.done", "manifest.tmp", "manifest.done", "publish.before_rename", "publish.done")


def named_points(n_seeds: int, rng: random.Random) -> list[KillPoint]:
    """Every fault point once, shard points at every shard, shard temp files also cut short."""
    out = [KillPoint("create")]
    for nth in range(1, n_seeds + 1):
        out += [KillPoint("shard.tmp", nth), KillPoint("shard.tmp", nth, truncate=round(rng.random() * 0.999, 3)),
                KillPoint("shard.done", nth)]
    return out + [KillPoint(p) for p in FINALIZE]


def follow_up(h: KillHarness, rng: random.Random) -> KillPoint:
    """A kill for a rerun of an already killed run: a random moment, or a finalize point (always reachable)."""
    if rng.random() < 0.3:
        return KillPoint(rng.choice(FINALIZE))
    return timed(h, rng, shards=1)


def timed(h: KillHarness, rng: random.Random, shards: int | None = None) -> KillPoint:
    """A random moment: after the k-th new shard, or (15 %) after process start (model building, first sample)."""
    if rng.random() < 0.15:
        return KillPoint(delay=round(rng.uniform(0, h.startup_seconds + h.shard_seconds), 3), after="start")
    k = rng.randint(0, h.n_seeds if shards is None else shards)
    span = h.finalize_seconds if k == h.n_seeds else h.shard_seconds
    return KillPoint(nth=k, delay=round(rng.uniform(0, 1.2 * span), 3))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=110, help="kill points that must land (SIGKILL delivered)")
    p.add_argument("--seeds", type=int, default=4, help="samples per run")
    p.add_argument("--spawn", type=int, default=6, help="named kills run as `python -m cos_core.cli` (env var)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where runs go (default: a temporary folder, deleted)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kill_points.json")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cos-kills-"))
    t0 = time.monotonic()
    h = KillHarness(work, n_seeds=args.seeds)
    h.reference()
    print(f"uninterrupted run: start-up {h.startup_seconds:.2f} s, capture {h.capture_seconds:.2f} s, "
          f"{h.shard_seconds:.2f} s per sample, finalize {h.finalize_seconds:.2f} s", file=sys.stderr)

    starters = named_points(args.seeds, rng)
    spawned = set(rng.sample(range(len(starters)), min(args.spawn, len(starters))))
    outcomes, chains = [], 0
    timings = []
    while sum(o.killed for o in outcomes) < args.kills:
        if chains and chains % 10 == 0:  # follow the machine's speed (other work shares these CPUs)
            shutil.rmtree(h.calibrate(), ignore_errors=True)
            timings.append(round(h.shard_seconds, 3))
        i = chains
        first = starters[i] if i < len(starters) else timed(h, rng)
        kills = [first] + [follow_up(h, rng) for _ in range(rng.choice((0, 0, 1, 2)))]
        modes = ["spawn" if i in spawned else "fork"] + ["fork"] * (len(kills) - 1)
        chain = h.chain(f"k{i:03d}", kills, modes)
        chains += 1
        outcomes += chain
        for o in chain:
            print(f"{o.run_id} {o.kill:32s} {o.mode:5s} exit={o.exitcode} {o.seconds:6.2f}s "
                  f"shards={o.state['shards']} published={o.state['published']} problems={len(o.problems)}",
                  file=sys.stderr)
            for problem in o.problems:
                print("   PROBLEM", problem[:300], file=sys.stderr)

    kills = [o for o in outcomes if o.kill != "resume"]
    landed = [o for o in kills if o.killed]
    kinds = collections.Counter(pr.split(":", 1)[0] for o in outcomes for pr in o.problems)
    by_point = collections.defaultdict(lambda: {"tried": 0, "killed": 0})
    for o in kills:
        key = "timed" if o.kill.startswith("timed") else o.kill.split("@")[0] + ("+cut" if "+cut" in o.kill else "")
        by_point[key]["tried"] += 1
        by_point[key]["killed"] += int(o.killed)
    left = collections.Counter(("published" if o.state["published"] else f"partial, {o.state['shards']} shards"
                                if o.state["partial"] else "nothing") for o in landed)
    finals = [o for o in outcomes if o.kill == "resume"]
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(), "command": " ".join(["python bench/kill_points.py", *sys.argv[1:]]),
        "samples_per_run": args.seeds, "uninterrupted_capture_s": round(h.capture_seconds, 3),
        "startup_s": round(h.startup_seconds, 3), "per_sample_s": round(h.shard_seconds, 3),
        "finalize_s": round(h.finalize_seconds, 3), "per_sample_s_recalibrated": timings,
        "kill_points_tried": len(kills), "kill_points_landed": len(landed),
        "timed_kills_after_the_end": sum(1 for o in kills if not o.killed),
        "spawned_kills": sum(1 for o in landed if o.mode == "spawn"),
        "runs": chains, "reruns_to_the_end": len(finals),
        "reruns_told_already_complete": sum(1 for o in finals if o.exitcode == 2),
        "archives_lost": sum(1 for o in finals if any(pr.startswith("lost:") for pr in o.problems)),
        "reported_complete_wrongly": kinds.get("wrong", 0), "shards_rewritten": kinds.get("rewritten", 0),
        "harness_problems": kinds.get("harness", 0),
        "by_point": dict(sorted(by_point.items())), "what_a_kill_left": dict(sorted(left.items())),
        "wall_s": round(time.monotonic() - t0, 1),
        "outcomes": [o.as_dict() for o in outcomes],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    summary = {k: v for k, v in result.items() if k != "outcomes"}
    print(json.dumps(summary, indent=1))
    return 0 if not sum(kinds.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
