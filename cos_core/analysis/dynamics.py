"""Step dynamics read from x0_hat: answer trajectories, events, candidate paths, convergence, perception first.

Owns the per-step answer of every sample (the task's extractor on that step's x0_hat), the event detector
(self-correction wrong->right, regression right->wrong, enhancement same answer and better score, emergence
unreadable->right, switch wrong->other wrong), candidate mass per step (choice task), distance to the final output,
and the steps where the static scene settles and where motion appears. Pure numpy/pandas; no torch, no streamlit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from ..archive import Archive
from .commitment import regime
from .stats import bootstrap_weights, encode_groups, group_mean_ci
from .step_frames import StepFrames, check_finite_frames, frame_source, instance_of, run_tasks, step_frames, task_for

EVENT_KINDS = ("self_correction", "regression", "enhancement", "emergence", "switch")


@dataclass(frozen=True)
class DynamicsConfig:
    persist: int = 2  # an event's new state must hold this many steps (or to the last step)
    min_gain: float = 0.1  # enhancement: score rise with the same answer
    alive_mass: float = 0.25  # a choice candidate is alive at a step when its evidence mass reaches this
    settle: float = 0.2  # settled: RMS distance to the final stays <= settle x the final's own RMS spread there
    appear: float = 0.5  # motion appears: x0_hat's motion matches the final's with cosine >= this, from then on
    motion_floor: float = 0.1  # a position moves when its temporal std is >= this fraction of the largest

    def __post_init__(self) -> None:
        if not (isinstance(self.persist, int) and self.persist >= 1):
            raise ValueError(f"persist={self.persist!r} must be an int >= 1")
        for name in ("min_gain", "alive_mass", "settle", "appear", "motion_floor"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name}={value!r} must be in (0, 1]")


# ---- events: a pure function of one trajectory ----------------------------------------------------------------
def readable_keys(keys: Iterable[Any]) -> list[str | None]:
    """Answer keys with every missing value as None: a key column read back from a DataFrame holds NaN (or pd.NA)
    where the answer was unreadable, and NaN is neither None nor equal to itself."""
    return [None if key is None or (np.ndim(key) == 0 and pd.isna(key)) else key for key in keys]


def detect_events(keys: list[str | None], correct: np.ndarray, score: np.ndarray,
                  config: DynamicsConfig = DynamicsConfig()) -> list[dict[str, Any]]:
    """Events between consecutive steps of one sample: [{kind, index, ...}], index = position of the new state.

    Both states must be established: the old one held for `persist` steps before (or since the first step), the
    new one holds for `persist` steps (or to the last), so a one-step flicker is no event. A wrong->right change
    that keeps the same discrete answer (it only became complete enough to grade right) is an enhancement; from an
    unreadable answer (key None, or NaN as a DataFrame gives it) it is an emergence, never a self-correction.
    """
    keys = readable_keys(keys)
    correct, score = np.asarray(correct, dtype=bool), np.asarray(score, dtype=float)
    n, events = len(keys), []
    for i in range(1, n):
        before, after = slice(max(0, i - config.persist), i), slice(i, min(n, i + config.persist))
        prev_ok, now_ok = correct[i - 1], correct[i]
        same_key = keys[i] is not None and keys[i] == keys[i - 1]
        kept = all(k == keys[i - 1] for k in keys[before])
        kind = None
        if not prev_ok and now_ok and not correct[before].any() and correct[after].all():
            kind = "enhancement" if same_key else "self_correction" if keys[i - 1] is not None else "emergence"
        elif prev_ok and not now_ok and correct[before].all() and not correct[after].any():
            kind = "regression"
        elif (same_key and kept and prev_ok == now_ok and score[i] - score[i - 1] >= config.min_gain
              and (score[after] - score[i - 1] >= config.min_gain).all()):
            kind = "enhancement"
        elif (not prev_ok and not now_ok and keys[i - 1] is not None and keys[i] is not None and not same_key
              and kept and all(k == keys[i] for k in keys[after])):
            kind = "switch"
        if kind:
            events.append({"kind": kind, "index": i, "key_before": keys[i - 1], "key_after": keys[i],
                           "score_before": float(score[i - 1]), "score_after": float(score[i])})
    return events


def change_spread(before: np.ndarray, after: np.ndarray) -> float:
    """How global a revision is: the fraction of frames whose RMS change is >= half the largest frame's."""
    per_frame = np.sqrt(((after - before) ** 2).mean(axis=(0, 2, 3)))  # (frame,)
    top = per_frame.max()
    return float((per_frame >= 0.5 * top).mean()) if top > 0 else 0.0


# ---- convergence and perception-before-action (any run with x0_hat and final) ------------------------------
def convergence(frames: np.ndarray, final: np.ndarray, config: DynamicsConfig = DynamicsConfig()) -> pd.DataFrame:
    """Per step: RMS distance of x0_hat to the final output, overall and split into static and moving positions
    (also relative to the final's own RMS spread in that region), and `motion_match`: cosine between x0_hat's change from frame 0 and the final video's, on moving positions
    (noise moves too, but not like the answer). frames (step, C, F, H, W), final (C, F, H, W)."""
    tstd = final.std(axis=1).mean(axis=0)  # (H, W): temporal std of the final video
    moving = tstd >= config.motion_floor * tstd.max() if tstd.max() > 0 else np.zeros_like(tstd, dtype=bool)
    diff2 = (frames - final[None]) ** 2  # (step, C, F, H, W)
    out = pd.DataFrame({"dist_final": np.sqrt(diff2.mean(axis=(1, 2, 3, 4)))})
    for name, where in (("scene", ~moving), ("motion", moving)):
        if where.any():
            region = final[..., where]  # (C, F, positions)
            spread = float(np.sqrt(((region - region.mean()) ** 2).mean()))
            out[f"{name}_dist"] = np.sqrt(diff2[..., where].mean(axis=(1, 2, 3)))
            out[f"{name}_dist_rel"] = out[f"{name}_dist"] / spread if spread > 0 else np.nan
        else:
            out[f"{name}_dist"] = out[f"{name}_dist_rel"] = np.nan
    out["motion_match"] = np.nan
    if moving.any() and final.shape[1] > 1:
        change = (frames[:, :, 1:] - frames[:, :, :1])[..., moving].reshape(len(frames), -1)  # (step, ...)
        target = (final[:, 1:] - final[:, :1])[..., moving].ravel()
        norms = np.linalg.norm(change, axis=1) * np.linalg.norm(target)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["motion_match"] = np.where(norms > 0, change @ target / norms, 0.0)
    first = out["dist_final"].iloc[0]
    out["dist_final_rel"] = out["dist_final"] / first if first > 0 else np.nan
    return out


def settle_index(dist_rel: np.ndarray, fraction: float) -> int | None:
    """First index from which `dist_rel` stays <= fraction; None if it never does (or is undefined)."""
    dist_rel = np.asarray(dist_rel, dtype=float)
    if not np.isfinite(dist_rel).all():
        return None
    above = np.flatnonzero(dist_rel > fraction)
    first = 0 if len(above) == 0 else int(above[-1]) + 1
    return first if first < len(dist_rel) else None


def phase_steps(conv: pd.DataFrame, steps: list[int], config: DynamicsConfig) -> dict[str, Any]:
    """Scene settle step vs motion appear/settle step for one sample (perception before action)."""
    def at(i):
        return None if i is None else int(steps[i])

    match = conv["motion_match"].to_numpy()
    below = np.flatnonzero(~(match >= config.appear))  # NaN counts as below
    appear = int(below[-1]) + 1 if len(below) else 0
    appear = appear if appear < len(match) else None
    scene = settle_index(conv["scene_dist_rel"], config.settle)
    motion = settle_index(conv["motion_dist_rel"], config.settle)
    out = {"scene_settle_step": at(scene), "motion_appear_step": at(appear), "motion_settle_step": at(motion)}
    out["perception_first"] = (None if scene is None or appear is None else bool(scene < appear))
    return out


# ---- whole runs ------------------------------------------------------------------------------------------------
def run_convergence(archive: Archive, config: DynamicsConfig = DynamicsConfig(),
                    progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict[str, pd.DataFrame]:
    """`convergence` (sample x step) and `phases` (one row per sample) for any run that captured x0_hat."""
    info = archive.manifest["tensors"].get("x0_hat")
    if info is None:
        raise ValueError(f"{archive.run_id} did not capture x0_hat (captured: {list(archive.manifest['tensors'])})")
    steps, rows, phases = list(info["steps"]), [], []
    for sample in progress(range(archive.n_samples)):
        frames = archive.tensor("x0_hat", sample=sample).astype(np.float32)
        final = archive.read(sample, "final").astype(np.float32)
        check_finite_frames(archive.run_id, sample, steps, frames, final)
        conv = convergence(frames, final, config)
        conv.insert(0, "step", steps)
        conv.insert(0, "sample", sample)
        rows.append(conv)
        phases.append({"sample": sample, **phase_steps(conv, steps, config)})
    conv = _with_meta(archive, pd.concat(rows, ignore_index=True))
    phases = pd.DataFrame(phases).astype({"scene_settle_step": "Int64", "motion_appear_step": "Int64",
                                          "motion_settle_step": "Int64", "perception_first": "boolean"})
    return {"convergence": conv, "phases": _with_meta(archive, phases, steps=False)}


def _candidate_mass(task, frames: np.ndarray, inst) -> np.ndarray | None:
    """Evidence mass per candidate answer for tasks that define candidates (choice, fork), else None."""
    try:
        return np.asarray(task.candidates(frames, inst), dtype=float)
    except NotImplementedError:
        return None


def sample_trajectory(task, inst, sf: StepFrames, config: DynamicsConfig) -> tuple[pd.DataFrame, list, list]:
    """Rows per step (answer, correctness, candidates), events, and candidate rows for one sample."""
    rows, cand_rows = [], []
    truth = set(map(tuple, inst.meta.get("path", []))) if task.name == "maze" else set()
    truth_k = inst.meta.get("answer") if task.name == "choice" else None  # the one right candidate, if one
    final_mass = _candidate_mass(task, sf.final, inst)
    final_k = int(final_mass.argmax()) if final_mass is not None else None
    for i, step in enumerate(sf.steps):
        answer = task.extract(sf.frames[i])
        scores = task.score(answer, inst)
        row = {"step": step, "answer": json.dumps(answer, sort_keys=True, default=str),
               "answer_key": task.answer_key(answer), "correct": bool(scores["correct"]),
               "score": float(scores["score"]), **{f"score_{k}": float(v) for k, v in scores.items()
                                                    if k not in ("correct", "score")}}
        mass = _candidate_mass(task, sf.frames[i], inst) if final_mass is not None else None
        if mass is not None:
            row.update(n_alive=int((mass >= config.alive_mass).sum()), top_mass=float(mass.max()),
                       answer_mass=float(mass[truth_k]) if truth_k is not None else np.nan)
            cand_rows += [{"step": step, "candidate": k, "mass": float(v), "is_final": k == final_k,
                           "is_answer": (k == truth_k) if truth_k is not None else None}
                          for k, v in enumerate(mass)]
        if task.name == "maze":
            row["explored_cells"] = len({tuple(c) for c in answer.get("cells", [])} - truth)
        rows.append(row)
    traj = pd.DataFrame(rows)
    final = task.extract(sf.final)
    traj["final_key"] = task.answer_key(final)
    traj["matches_final"] = traj["answer_key"] == traj["final_key"]
    events = detect_events(traj["answer_key"].tolist(), traj["correct"].to_numpy(), traj["score"].to_numpy(), config)
    for ev in events:
        ev["step"] = sf.steps[ev.pop("index")]
        i = sf.steps.index(ev["step"])
        ev["change_spread"] = change_spread(sf.frames[i - 1], sf.frames[i])
    return traj, events, cand_rows


def run_dynamics(archive: Archive, config: DynamicsConfig = DynamicsConfig(),
                 progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict[str, pd.DataFrame]:
    """`step_answers`, `events`, `event_rates` and (choice runs) `candidates` for every task sample of a run."""
    trajs, events, cands = [], [], []
    work = [(name, s) for name, samples in run_tasks(archive).items() for s in samples]
    tasks = {name: task_for(archive, name) for name, _ in work}
    sources = {name: frame_source(archive, task) for name, task in tasks.items()}
    for name, sample in progress(work):
        task = tasks[name]
        traj, evs, cand = sample_trajectory(task, instance_of(archive, task, sample),
                                            step_frames(archive, sample, sources[name]), config)
        traj.insert(0, "sample", sample)
        trajs.append(traj)
        events += [{"sample": sample, **ev} for ev in evs]
        cands += [{"sample": sample, **c} for c in cand]
    answers = _with_meta(archive, pd.concat(trajs, ignore_index=True))
    event_table = pd.DataFrame(events, columns=["sample", "kind", "step", "key_before", "key_after", "score_before",
                                                "score_after", "change_spread"])
    event_table = event_table.astype({"sample": "int64", "step": "int64", "score_before": "float64",
                                      "score_after": "float64", "change_spread": "float64"})
    out = {"step_answers": answers, "events": _with_meta(archive, event_table),
           "event_rates": event_rates(archive, answers, event_table)}
    if cands:
        out["candidates"] = _with_meta(archive, pd.DataFrame(cands))
    return out


def event_rates(archive: Archive, answers: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Per task, kind and step: how many samples had that event there, the rate and its instance bootstrap CI."""
    meta = archive.samples.set_index("sample")
    regimes = {name: regime(task_for(archive, name)) for name in run_tasks(archive)}
    rows = []
    for task, part in answers.groupby(answers["sample"].map(meta["task"])):
        samples = np.sort(part["sample"].unique())
        group, n_groups = encode_groups(meta.loc[samples, "instance"].astype(str).to_numpy())
        weights = bootstrap_weights(n_groups)
        steps = np.sort(part["step"].unique())
        for kind in EVENT_KINDS:
            hit = np.zeros((len(steps), len(samples)))
            mine = events[(events["kind"] == kind) & events["sample"].isin(samples)]
            hit[np.searchsorted(steps, mine["step"]), np.searchsorted(samples, mine["sample"])] = 1.0
            rate, lo, hi = group_mean_ci(hit, group, n_groups, weights)
            rows += [{"task": task, "regime": regimes[task], "kind": kind, "step": int(s),
                      "n_events": int(hit[j].sum()), "n": len(samples), "n_instances": n_groups, "rate": rate[j],
                      "ci_low": lo[j], "ci_high": hi[j]} for j, s in enumerate(steps)]
    return _with_meta(archive, pd.DataFrame(rows), samples=False)


def _with_meta(archive: Archive, table: pd.DataFrame, steps: bool = True, samples: bool = True) -> pd.DataFrame:
    """Join t/sigma/expert by step and sample_id/instance/seed/task by sample, keeping the table's order."""
    if steps and "step" in table:
        table = table.merge(archive.steps, on="step", how="left")
    if samples and "sample" in table:
        cols = [c for c in ("sample", "sample_id", "task", "instance", "seed") if c in archive.samples]
        table = table.merge(archive.samples[cols], on="sample", how="left", suffixes=("", "_sample"))
    return table
