"""docs/findings.md as a function of archived tables: every number in it is read from a table on disk and printed
with its n, its interval and the command that made the table, so the document can be regenerated and checked.

Owns the sections (each: the paper's claim, what was measured, then one block per table found — or what is missing
and the command that makes it), `render` (the whole document) and `check` (its diff against a document on disk).
Tables and number formats come from `report.py`. Pure pandas; must not import torch, experiments or plots.
"""

from __future__ import annotations

import difflib
import re
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .report import (CARD, DOC, GENERATOR, RESEARCH, SHIPPED_RUNS, TABLES, Sources, Table, cite, load, md_table,
                     missing, n_of, num, pct, rate, too_small)
from ..tasks import TASKS
from .stats import bootstrap_weights, encode_groups, group_mean_ci
from .steps import steps_table

__all__ = ["CARD", "DOC", "TABLES", "check", "load", "render"]
Body = Callable[[Sources, Table], list[str]]


def section(src: Sources, heading: str, intro: list[str], table: str, what: str, how: str, body: Body) -> str:
    """A heading, its intro paragraphs, then `body` for every `<run>.<table>` found (or what is missing)."""
    out = [heading, ""]
    for paragraph in intro:
        out += [paragraph, ""]
    tables = src.named(table)
    if not tables:
        return "\n".join(out + [missing(what, how)])
    for t in tables:
        out += body(src, t)
    return "\n".join(out)


# ---- 1: which tasks need the steps (the model card) ----------------------------------------------------------------
def regime_section(src: Sources) -> str:
    out = ["## 1. Which tasks need the steps: accuracy vs number of sampling steps", "",
           "Paper: video models reason along the denoising steps (Chain-of-Steps). That needs a task one forward pass "
           "cannot solve: for a unique answer, x̂0 at σ = 1 is the posterior mean, which *is* the answer when one "
           "pass can compute it.", ""]
    if not src.card or "accuracy_vs_steps" not in src.card:
        return "\n".join(out + [missing("accuracy vs steps of the shipped organism", "cos steps --out FILE")])
    whole = steps_table(src.card["accuracy_vs_steps"], src.card.get("answer_is_unique"))
    whole = whole[whole["difficulty"] == "all"]
    counts = sorted(int(k) for k in whole["n_steps"].unique())
    command = re.search(r"`(python scripts/regime_map\.py eval[^`]*)`", " ".join(src.card.get("notes", [])))
    rows = [[task, part["regime"].iloc[0], int(part["n"].max())]
            + [rate(*part.set_index("n_steps").loc[k, ["accuracy", "ci_low", "ci_high"]]) for k in counts]
            for task, part in whole.groupby("task", sort=False)]
    out += ["Exact accuracy of the final video on held-out instances, by number of flow-matching steps (Wilson 95 % "
            "intervals). Source: `models/organism/eval.json` (`accuracy_vs_steps`, shipped with the weights); made by "
            f"`{command.group(1) if command else 'the organism evaluation'}`; tabulated by `cos steps --from-card "
            "models/organism/eval.json --out FILE`.", "",
            md_table(["task", "answer", "n"] + [f"{k} step{'s' * (k > 1)}" for k in counts], rows), ""]
    one, top = counts[0], 16 if 16 in counts else counts[-1]
    for task, part in whole.groupby("task", sort=False):
        a, b = (part.set_index("n_steps").loc[k] for k in (one, top))
        if part["regime"].iloc[0] != "unique":
            verdict = ("the noise picks among several right answers; at one step x̂0 is the blend of them, so the "
                       "steps select one (mode selection, not computation)")
        elif a["accuracy"] >= 0.9:
            verdict = "one step (the posterior mean) already gives the answer: little for the steps to add"
        elif a["ci_high"] < b["ci_low"]:
            verdict = ("more steps add exact accuracy (the intervals do not overlap); §2 says whether they change the "
                       "answer or only make it exact")
        else:
            verdict = "no reliable gain from more steps"
        out.append(f"- **{task}** ({part['regime'].iloc[0]} answer): {rate(a['accuracy'], a['ci_low'], a['ci_high'])} "
                   f"at {one} step → {rate(b['accuracy'], b['ci_low'], b['ci_high'])} at {top} (n = {int(b['n'])}): "
                   f"{verdict}.")
    return "\n".join(out) + "\n"


# ---- 2: what the steps change (x̂0's answer per step) ------------------------------------------------------------
READOUT_STEPS_SHOWN = 8  # rows of the per-step table: evenly spaced steps, always the first and the last


def readout_body(src: Sources, t: Table) -> list[str]:
    f = t.frame.copy()
    if f.empty:
        return [f"### run `{t.run}`", "", "- The table has no rows.", cite(src, t, "n = 0 samples"), ""]
    f["instance"] = f["instance"] if "instance" in f else f["sample"]  # no instance column: samples resample alone
    f["readable"] = f["answer_key"].notna().astype(float) if "answer_key" in f else np.nan
    f["matches"] = f["matches_final"].astype(float) if "matches_final" in f else np.nan
    f["exact"] = f["correct"].astype(float)
    steps = sorted(int(s) for s in f["step"].unique())
    final_readable = f[f["step"] == steps[-1]].set_index("sample")["readable"]
    # of the samples whose final answer is readable: does x̂0 at this step already read that answer?
    f["matches_given"] = f["matches"].where(f["sample"].map(final_readable) > 0)
    group, n_groups = encode_groups(f["instance"].astype(str).to_numpy())
    weights = bootstrap_weights(n_groups)
    shown = sorted({steps[round(k * (len(steps) - 1) / max(1, READOUT_STEPS_SHOWN - 1))]
                    for k in range(min(READOUT_STEPS_SHOWN, len(steps)))})
    stats: dict[int, dict[str, tuple[float, float, float]]] = {}
    for step in steps:
        part = (f["step"] == step).to_numpy()
        stats[step] = {col: tuple(float(v) for v in group_mean_ci(f.loc[part, col].to_numpy(dtype=float), group[part],
                                                                    n_groups, weights))
                       for col in ("readable", "matches", "matches_given", "exact")}
    rows = [[step, num(float(f.loc[f["step"] == step, "sigma"].iloc[0])) if "sigma" in f else "",
             *(rate(*stats[step][col]) for col in ("readable", "matches", "exact"))] for step in shown]
    first, last = stats[steps[0]], stats[steps[-1]]
    unique = src_unique(f)
    given = first["matches_given"]
    if len(steps) < 2:
        claim = "- One step only: no steps to compare."
    elif not last["readable"][0] > 0:
        claim = "- No final answer is readable: nothing to compare the steps with."
    elif given[1] > 0.5:
        claim = (f"- Of the samples whose final answer is readable ({pct(last['readable'][0])}), x̂0 at step "
                 f"{steps[0]} already reads that answer in {rate(*given)} (the interval is above one half), while exact "
                 f"accuracy goes {pct(first['exact'][0])} → {pct(last['exact'][0])}: the first forward pass already "
                 "finds the answer of most samples and the steps mostly make it exact — refinement more than the "
                 "paper's Chain-of-Steps.")
    else:
        formed = committed_from(pd.Series(steps), pd.Series([stats[s]["matches_given"][1] for s in steps]))
        claim = (f"- Of the samples whose final answer is readable ({pct(last['readable'][0])}), x̂0 at step "
                 f"{steps[0]} reads that answer in {rate(*given)}" + (
                     f", and from step {formed} on the lower bound stays ≥ 90 %" if formed is not None else "")
                 + f"; exact accuracy {pct(first['exact'][0])} → {pct(last['exact'][0])}: the answer forms along the "
                 "steps.")
    lines = [claim]
    if "seed" in f and f.groupby("seed")["instance"].nunique().max() > 1:  # a seed drawn by several instances
        seeds = sorted(f["seed"].unique())
        end = f[f["step"] == steps[-1]]
        per_seed = []
        for seed in seeds[:8]:
            part = (end["seed"] == seed).to_numpy()
            g, k = encode_groups(end.loc[part, "instance"].astype(str).to_numpy())
            per_seed.append(f"seed {int(seed)}: "
                            f"{rate(*group_mean_ci(end.loc[part, 'exact'].to_numpy(), g, k, bootstrap_weights(k)))}")
        more = f"; and {len(seeds) - 8} more seeds" if len(seeds) > 8 else ""
        lines.append("- Exact accuracy per noise seed (this run's instances share their noise seeds — `cos capture "
                     "--noise shared`, the default — so every instance of one seed starts from one noise tensor; the "
                     "intervals in this document resample instances only and do not cover the noise draw; `--noise "
                     f"per-instance` removes the sharing): {'; '.join(per_seed)}{more}.")
    small = too_small(pd.DataFrame({"n_instances": [n_groups]}))
    lines = [small] if small else lines
    task = str(f["task"].iloc[0]) if "task" in f else "unknown task"
    return [f"### {task} ({'unique' if unique else 'noise-picked'} answer), run `{t.run}`", "",
            md_table(["step", "σ", "x̂0 readable", "x̂0's answer = the final answer", "x̂0 exactly right"], rows), "",
            *lines, cite(src, t, f"n = {f['sample'].nunique()} samples, {n_groups} instances"), ""]


def src_unique(f: pd.DataFrame) -> bool:
    """Whether the table's task has a unique answer (the task registry says; an unknown task counts as unique)."""
    task = TASKS.get(str(f["task"].iloc[0])) if "task" in f else None
    return True if task is None else bool(task.answer_is_unique)


def readout_section(src: Sources) -> str:
    return section(src, "## 2. What the steps change: the answer x̂0 reads at each step", [
        "Paper: early steps hold candidate answers that later steps prune. Where the steps add accuracy (§1), this asks "
        "whether they change *which* answer x̂0 shows, or only make one answer exact.",
        "Per denoising step of the run's clean samples: the share whose x̂0 reads as an answer at all, whose answer is "
        "already the final video's (the task's answer field: maze path, fork goal, dispatch direction), and whose x̂0 "
        "is exactly right."], "step_answers", "x̂0's answer per step", "cos analyze RUN --which dynamics",
        readout_body)


# ---- 3-7: the experiments' tables ------------------------------------------------------------------------------
def committed_from(steps: pd.Series, low: pd.Series, level: float = 0.9) -> int | None:
    """The first step from which every later step's lower bound is >= level (None if the last one's is not)."""
    first = None
    for step, bound in zip(steps, low):
        first = (first if first is not None else int(step)) if bound >= level else None
    return first


def commitment_body(src: Sources, t: Table) -> list[str]:
    f = t.frame[t.frame["strength"] == t.frame["strength"].max()].sort_values("step")
    rows = [[int(r.step), rate(r.same_rate, r.ci_low, r.ci_high),
             rate(r.accuracy, r.accuracy_ci_low, r.accuracy_ci_high), f"{rate(r.same_wrong, r.same_wrong_ci_low, r.same_wrong_ci_high)} (of {int(r.n_wrong)})"]
            for r in f.itertuples()]
    first = committed_from(f["step"], f["ci_low"])
    clean = pct(f["clean_accuracy"].iloc[0])
    claim = (f"- Committed (the lower bound of P(same) stays ≥ 90 %) from step {first} on; clean accuracy {clean}."
             if first is not None else f"- P(same)'s lower bound does not stay ≥ 90 % to the last step measured; clean "
             f"accuracy {clean}.")
    header = ["step re-noised", "same answer", "accuracy", "same answer when the clean one is wrong"]
    return [f"### {f['task'].iloc[0]} ({f['regime'].iloc[0]} answer), run `{t.run}`, λ = {f['strength'].iloc[0]:g}",
            "", md_table(header, rows), "", too_small(f) or claim, cite(src, t, n_of(f)), ""]


def noise_body(src: Sources, t: Table) -> list[str]:
    f = t.frame[t.frame["kind"].isin(["noise_step", "noise_frame", "renoise_step", "renoise_frame"])]
    if f.empty:
        return []
    rows = []
    for (kind, strength), part in f.groupby(["kind", "strength"], sort=True):
        worst = part.loc[part["value"].idxmin()]
        where = "step" if kind.endswith("step") else "frame"
        rows.append([kind, "on" if kind.startswith("renoise") else "off", f"{strength:g}", len(part),
                     f"{rate(worst['value'], worst['ci_low'], worst['ci_high'])} at {where} {int(worst['position'])}",
                     pct(part["value"].mean())])
    return [f"### run `{t.run}` ({t.frame['regime'].iloc[0]} answer; clean accuracy {pct(f['baseline'].iloc[0])})", "",
            md_table(["kind", "distribution", "λ", "positions", "lowest accuracy", "mean over positions"], rows), "",
            *([too_small(f)] if too_small(f) else []), cite(src, t, n_of(f)), ""]


def sensitivity_body(src: Sources, t: Table) -> list[str]:
    f = t.frame.sort_values("inject_step")
    rows = [[int(r.inject_step), num(r.distance_last, r.distance_last_ci_low, r.distance_last_ci_high),
             num(r.final_distance, r.final_distance_ci_low, r.final_distance_ci_high),
             rate(r.flip_rate, r.flip_rate_ci_low, r.flip_rate_ci_high)] for r in f.itertuples()]
    peak = f.loc[f["flip_rate"].idxmax()]
    claim = (f"- The answer changes most when the perturbation enters at step {int(peak['inject_step'])} "
             f"({rate(peak['flip_rate'], peak['flip_rate_ci_low'], peak['flip_rate_ci_high'])}).")
    header = ["inject step", "|Δh|/|h| at the last step", "final video RMS change", "answer changed"]
    return [f"### run `{t.run}` ({f['regime'].iloc[0]} answer), λ = {f['strength'].iloc[0]:g}", "",
            md_table(header, rows), "", too_small(f) or claim, cite(src, t, n_of(f)), ""]


def patching_body(src: Sources, t: Table) -> list[str]:
    f = t.frame
    rows = [[r.metric, int(r.step), int(r.layer), pct(r.patch_rate), pct(r.null_rate),
             num(r.effect, r.ci_low, r.ci_high) + (" ★" if r.significant else ""), int(r.n)]
            for r in f[f["null"] == "random"].sort_values(["metric", "step", "layer"]).itertuples()]
    sig = f[f["significant"] & (f["null"] != "self")]
    kinds = ", ".join(sorted({f"{m} vs {n}" for m, n in zip(sig["metric"], sig["null"])})) or "none"
    tried = int((f["null"] != "self").sum())
    lines = [f"- Cells whose effect beats a null after Holm: {len(sig)} of {tried} ({kinds})."]
    own = f[(f["null"] == "self") & (f["metric"] == "flip")]
    if len(own):
        lines.append(f"- Self-patch flip rate: at most {pct(own['null_rate'].max())} (a patch with the run's own "
                     "update changes nothing: the null that checks the machinery).")
    lines = [too_small(f)] if too_small(f) else lines
    return [f"### run `{t.run}` ({f['task'].iloc[0]}, {f['regime'].iloc[0]} answer, {f['pairs'].iloc[0]} pairs)", "",
            md_table(["metric", "step", "layer", "patch", "random null", "effect", "n"], rows), "", *lines,
            cite(src, t, n_of(f)), ""]


def _listed(part: pd.DataFrame) -> str:
    return ", ".join(f"{r.method} (n={r.n}, k={r.k}, NFE {r.nfe})" for r in part.itertuples()) or "none"


def search_body(src: Sources, t: Table) -> list[str]:
    f = t.frame.sort_values(["nfe", "method", "n", "k"])
    rows = [[r.method, int(r.n), int(r.k), int(r.nfe), rate(r.accuracy, r.ci_low, r.ci_high),
             num(r.gain, r.gain_ci_low, r.gain_ci_high)] for r in f.itertuples()]
    real = f[~f["method"].isin(["oracle_any", "single"])]
    above, below = _listed(real[real["gain_ci_low"] > 0]), _listed(real[real["gain_ci_high"] < 0])
    lines = [f"- Paired gain over one seed with its interval above 0: {above}; below 0: {below}."]
    if len(real):
        best = real.loc[real["accuracy"].idxmax()]
        lines.append(f"- Most accurate: {best['method']} (n = {int(best['n'])}, k = {int(best['k'])}, NFE "
                     f"{int(best['nfe'])}): {rate(best['accuracy'], best['ci_low'], best['ci_high'])}.")
    lines = [too_small(f)] if too_small(f) else lines
    return [f"### {f['task'].iloc[0]} ({f['regime'].iloc[0]} answer), run `{t.run}`, S = "
            f"{int(f['num_inference_steps'].iloc[0])}", "",
            md_table(["method", "n", "k", "NFE", "accuracy", "gain"], rows), "", *lines, cite(src, t, f"{int(f['n_instances'].max())} instances"), ""]


def commitment_section(src: Sources) -> str:
    return section(src, "## 3. When the answer is committed: the commitment curve (on-distribution)", [
        "Paper: early steps hold several candidates, later steps prune them to one (Fig. 1–2). Video Models Reason "
        "Early (Newman et al. 2026): the plan is committed within the first few steps.",
        "At step s, x̂0 of step s−1 is kept and the noise is redrawn (x_s = (1−σ_s)·x̂0 + σ_s·ε′, λ = 1); the curve "
        "is P(same final answer as the clean run) over samples whose clean answer is readable. At s = 0 this is a "
        "fresh seed (the chance of agreeing by accident); where it reaches ~1 the answer no longer depends on the "
        "noise still to come."], "commitment", "the commitment curve", "cos intervene RUN --which renoise_step",
        commitment_body)


def noise_section(src: Sources) -> str:
    return section(src, "## 4. Noise at a step vs at a frame, off and on the data distribution", [
        "Paper (Fig. 3b): noise at one step (all frames) collapses the score (0.685 → below 0.3 on VBVR-Bench), noise "
        "at one frame (all steps) barely moves it.",
        "Off-distribution (the paper's probe): x ← (1−λ)·x + λ·ε on the latent entering a step (all frames) or on one "
        "latent frame at every step. On-distribution: x̂0 is kept and a fraction λ of the noise is redrawn at the "
        "step's σ. Per row, the lowest accuracy over the positions tried and where it is."], "interventions",
        "the noise probes", "cos intervene RUN --strengths 0.1,0.25,0.5,1", noise_body)


def propagation_section(src: Sources) -> str:
    return section(src, "## 5. How far a perturbation carries: the per-inject-step sensitivity curve", [
        "Paper (Fig. 3c): a CKA-dissimilarity map whose sensitivity peaks at steps 20–30 of 50.",
        "A renoise perturbation (on-distribution, strength λ) at one step; per sample, the token-level distance "
        "|Δh|/|h| of every block's output to the same sample's clean run, the RMS change of the final video and "
        "whether the answer changed."], "sensitivity", "the propagation map", "cos intervene RUN --which propagation",
        sensitivity_body)


def patching_section(src: Sources) -> str:
    return section(src, "## 6. Activation patching, minus its nulls", [
        "Paper (§5, Fig. 6): swapping the layer-20 hidden state between two scenes at the first step flips the answer; "
        "middle layers carry the decisive semantics.",
        "Block L's residual update at step s is replaced by a donor run's (seed → seed: another noise seed of the same "
        "instance; instance → instance: another instance, where the answer means the same). Effects are the patch's "
        "rate minus a null's, paired per recipient: a random update of the same per-token norm, a donor with the same "
        "answer, and a self-patch (must be 0). Holm's correction runs over the layers of one (step, null, metric); "
        "★ = Holm p < 0.05."], "patching", "activation patching", "cos patch RUN", patching_body)


def search_section(src: Sources) -> str:
    return section(src, "## 7. Test-time scaling at equal compute", [
        "Paper (§6): merging the early latents of 3 seeds lifts VBVR-Bench 0.685 → ≈ 0.71, against one seed only. Here "
        "every method is compared at equal forward passes, on the task with headroom.",
        "Every method runs on the same instances and member seeds and is placed by the forward passes it spends per "
        "instance (NFE; S steps per trajectory). `single`: one seed; `majority`: the most common answer of n seeds; "
        "`early_search`: run n seeds k steps, keep the one whose x̂0 answer the most other seeds share, finish it "
        "(n·k + S − k); `ensemble_*`: n seeds merged during K steps, member 0's video; `noise_mean`: one seed from the "
        "mean of n noises; `steps`: one seed with k steps; `oracle_any`: any of n right (a ceiling, not a method). "
        "Gain = paired difference to `single`."], "search", "test-time scaling", "cos search RUN", search_body)


# ---- 8: events ------------------------------------------------------------------------------------------------
def events_section(src: Sources) -> str:
    out = ["## 8. Self-correction and emergence, by definition", "",
           "Paper: a wrong early answer is revised within a few steps (qualitative).", "",
           "Events between consecutive steps of x̂0's answer (both states held ≥ 2 steps): `self_correction` is a "
           "readable wrong answer becoming right; `emergence` an unreadable one becoming right (keys read back from "
           "a table are NaN, not None, where unreadable: the detector treats both alike).", ""]
    old = SHIPPED_RUNS / "organism-fork" / "derived" / "events.parquet"
    if old.is_file():
        kinds = pd.read_parquet(old)["kind"].value_counts()
        out.append(f"- The previous organism's shipped fork run (`cached_runs/organism-fork`, regenerated with the "
                   f"fixed detector): {int(kinds.get('self_correction', 0))} self-corrections and "
                   f"{int(kinds.get('emergence', 0))} emergences; the findings document before this one counted every "
                   "emergence as a self-correction.")
    tables = src.named("event_rates")
    if not tables:
        return "\n".join(out + ["", missing("events on the new organism", "cos analyze RUN --which dynamics")])
    rows = []
    for t in tables:
        counts = t.frame.groupby("kind")["n_events"].sum()
        rows.append([f"`{t.run}`", ", ".join(sorted(t.frame["task"].unique())), int(t.frame["n"].max()),
                     *[int(counts.get(k, 0)) for k in ("self_correction", "emergence", "enhancement", "regression",
                                                       "switch")]])
    sources = "; ".join(f"`{src.rel(t.path)}` (made by `{t.command}`; archive {t.archive})" for t in tables)
    return "\n".join(out + ["", md_table(["run", "task", "n samples", "self_correction", "emergence", "enhancement",
                                          "regression", "switch"], rows), "", f"Sources: {sources}.", ""])


SECTIONS: tuple[Callable[[Sources], str], ...] = (regime_section, readout_section, commitment_section, noise_section,
                                                    propagation_section, patching_section, search_section,
                                                    events_section)


def sources_section(src: Sources) -> str:
    rows = [[f"`{src.rel(t.path)}`", t.archive, f"`{t.command}`"]
            for t in sorted(src.tables.values(), key=lambda t: (t.run, t.name))]
    return "\n".join([
        "## Sources", "",
        "Every table this document reads, the archive it was computed from (shipped in `cached_runs/`, or "
        f"reproducible-only: `{RESEARCH}` makes it, and only its tables are shipped, in `tables/`) and the command "
        "that made the table. Sizes (n) are given where each number is used; a small run's intervals are wide and its "
        "claims are illustrations, not proof.", "",
        md_table(["table", "archive", "command"], rows) if rows else "(no tables yet)", ""])


def render(src: Sources) -> str:
    head = "\n".join([
        "# Findings on the organism, beside the paper's claims", "",
        f"Generated by `{GENERATOR}` (or `cos report`) from archived tables only — do not edit by hand: "
        f"`{GENERATOR} --check` (run by the tests) fails when this file and the tables disagree. The organism is the "
        "shipped `models/organism` (8 Wan blocks, width 192, pixel space 3×8×24×24, 16 flow-matching steps, guidance "
        "1), trained on maze (9×9, unique answer), arrows (unique), fork, recall and dispatch (the noise picks the "
        "answer); every measurement says which regime it looks at. The previous organism's findings (maze 5×5, memory, "
        "choice) no longer apply: it was replaced. Intervals: Wilson 95 % for the model card's proportions, 95 % "
        "bootstrap over instances (1,000 replicates) everywhere else. Paper: Wang et al., *Demystifying Video "
        "Reasoning*, arXiv 2603.16870.", ""])
    text = "\n".join([head, *(make(src) for make in SECTIONS), sources_section(src)])
    return "\n".join(wrap(line) for line in text.splitlines()).rstrip() + "\n"


def wrap(line: str, width: int = 118) -> str:
    """A prose line (paragraph or bullet) wrapped at `width`; tables and headings unchanged."""
    if len(line) <= width or line.startswith(("|", "#")):
        return line
    indent = "  " if line.startswith("- ") else ""
    return textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def check(doc: Path, src: Sources) -> list[str]:
    """The unified diff between `doc` and what `render(src)` gives (empty when they agree)."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    return list(difflib.unified_diff(text.splitlines(), render(src).splitlines(), str(doc), "from the tables",
                                     lineterm=""))
