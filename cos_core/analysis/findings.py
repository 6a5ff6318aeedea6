"""docs/findings.md as a function of archived tables: every number in it is read here from a table on disk, printed
with its n, its interval and the command that made the table, so the document can be regenerated and checked.

Owns the sources (`<run>.<table>.parquet` files in the tables folder, the model card's eval.json, the shipped runs'
derived tables), the sections, `render` (the whole document) and `check` (the differences between a document and
what the tables give). Each section renders whatever tables exist and says which are missing and how to make them.
Pure pandas; must not import torch, experiments or plots.
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .steps import steps_table

REPO = Path(__file__).resolve().parents[2]
TABLES = REPO / "tables"  # shipped tables the document cites: <run>.<table>.parquet
CARD = REPO / "models" / "organism" / "eval.json"
SHIPPED_RUNS = REPO / "cached_runs"
DOC = REPO / "docs" / "findings.md"
RESEARCH = "bash scripts/research_runs.sh"
GENERATOR = "python scripts/findings.py"


@dataclass
class Table:
    """One archived table: where it is, what made it (`cos_config` metadata) and its rows."""

    run: str
    name: str
    path: Path
    frame: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        cmd = self.config.get("command")
        return " ".join(map(str, cmd)) if isinstance(cmd, list) else str(cmd or "(not recorded)")

    @property
    def archive(self) -> str:
        if (SHIPPED_RUNS / self.run / "manifest.json").is_file():
            return f"shipped (`cached_runs/{self.run}`)"
        return f"reproducible-only (`{RESEARCH}`)"


@dataclass
class Sources:
    tables: dict[tuple[str, str], Table]
    card: dict[str, Any] | None
    root: Path = REPO

    def named(self, name: str) -> list[Table]:
        return [t for (run, table), t in sorted(self.tables.items()) if table == name]

    def rel(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def load(tables: Path = TABLES, card: Path | None = CARD, root: Path = REPO) -> Sources:
    """Every `<run>.<table>.parquet` under `tables` and the model card (None when absent)."""
    out = {}
    for path in sorted(Path(tables).glob("*.parquet")) if Path(tables).is_dir() else []:
        run, _, name = path.stem.rpartition(".")
        if not run:
            raise ValueError(f"{path}: table files are named <run>.<table>.parquet")
        frame = pd.read_parquet(path)
        config = json.loads(frame.attrs.get("cos_config", "{}") or "{}")
        out[(run, name)] = Table(run, name, path, frame, config)
    record = json.loads(Path(card).read_text(encoding="utf-8")) if card and Path(card).is_file() else None
    return Sources(out, record, Path(root).resolve())


# ---- formatting ---------------------------------------------------------------------------------------------------
def pct(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f} %"


def rate(v: float, low: float, high: float) -> str:
    """'75.5 % [71.1, 79.5]'."""
    if v is None or not np.isfinite(v):
        return "–"
    if not (np.isfinite(low) and np.isfinite(high)):
        return pct(v)
    return f"{100 * v:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


def num(v: float, low: float | None = None, high: float | None = None, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    if low is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def cite(src: Sources, t: Table, n: str) -> str:
    return (f"Source: `{src.rel(t.path)}` ({n}); made by `{t.command}`; archive {t.archive}.")


def missing(what: str, how: str) -> str:
    return f"*Not measured yet:* {what}. `{RESEARCH}` makes it (`{how}`); then run `{GENERATOR}`.\n"


def _n(frame: pd.DataFrame) -> str:
    n = int(frame["n"].max()) if "n" in frame else len(frame)
    inst = f", {int(frame['n_instances'].max())} instances" if "n_instances" in frame else ""
    return f"n = {n} samples{inst}"


# ---- sections -----------------------------------------------------------------------------------------------------
def regime_section(src: Sources) -> str:
    out = ["## 1. Which tasks need the steps: accuracy vs number of sampling steps", "",
           "Paper: video models reason along the denoising steps (Chain-of-Steps). That needs a task one forward pass "
           "cannot solve: for a unique answer, x̂0 at σ = 1 is the posterior mean, which *is* the answer when one "
           "pass can compute it.", ""]
    if not src.card or "accuracy_vs_steps" not in src.card:
        return "\n".join(out + [missing("accuracy vs steps of the shipped organism", "cos steps --out tables/...")])
    table = steps_table(src.card["accuracy_vs_steps"], src.card.get("answer_is_unique"))
    whole = table[table["difficulty"] == "all"]
    counts = sorted(int(k) for k in whole["n_steps"].unique())
    rows = []
    for task, part in whole.groupby("task", sort=False):
        cell = part.set_index("n_steps")
        rows.append([task, part["regime"].iloc[0], int(part["n"].max())]
                    + [rate(cell.at[k, "accuracy"], cell.at[k, "ci_low"], cell.at[k, "ci_high"]) for k in counts])
    command = re.search(r"`(python scripts/regime_map\.py eval[^`]*)`", " ".join(src.card.get("notes", [])))
    out += ["Exact accuracy of the final video on held-out instances, by number of flow-matching steps (Wilson 95 % "
            "intervals). Source: `models/organism/eval.json` (`accuracy_vs_steps`, shipped with the weights); made by "
            f"`{command.group(1) if command else 'the organism evaluation'}`; tabulated by `cos steps --from-card "
            "models/organism/eval.json --out ...`.", "",
            md_table(["task", "answer", "n"] + [f"{k} step{'s' * (k > 1)}" for k in counts], rows), ""]
    for task, part in whole.groupby("task", sort=False):
        cell = part.set_index("n_steps")
        one, top = counts[0], 16 if 16 in counts else counts[-1]
        a, b = cell.loc[one], cell.loc[top]
        gap = a["ci_high"] < b["ci_low"]
        if part["regime"].iloc[0] == "unique":
            verdict = ("more steps add computation (the intervals do not overlap): the Chain-of-Steps regime"
                       if gap and a["accuracy"] < 0.9 else
                       "one step (the posterior mean) already gives the answer: little for the steps to add"
                       if a["accuracy"] >= 0.9 else "no reliable gain from more steps")
        else:
            verdict = ("the noise picks among several right answers; at one step x̂0 is the blend of them, so the "
                       "steps select one (mode selection, not computation)")
        out.append(f"- **{task}** ({part['regime'].iloc[0]} answer): {rate(a['accuracy'], a['ci_low'], a['ci_high'])} "
                   f"at {one} step → {rate(b['accuracy'], b['ci_low'], b['ci_high'])} at {top} (n = {int(b['n'])}): "
                   f"{verdict}.")
    return "\n".join(out) + "\n"


def commitment_section(src: Sources) -> str:
    out = ["## 2. When the answer is committed: the commitment curve (on-distribution)", "",
           "Paper: early steps hold several candidates, later steps prune them to one (Fig. 1–2). Video Models Reason "
           "Early (Newman et al. 2026): the plan is committed within the first few steps.", "",
           "At step s, x̂0 of step s−1 is kept and the noise is redrawn (x_s = (1−σ_s)·x̂0 + σ_s·ε′, λ = 1); the "
           "curve is P(same final answer as the clean run) over samples whose clean answer is readable. At s = 0 "
           "this is a fresh seed (the chance of agreeing by accident); where it reaches ~1 the answer no longer "
           "depends on the noise still to come.", ""]
    tables = src.named("commitment")
    if not tables:
        return "\n".join(out + [missing("the commitment curve", "cos intervene RUN --which renoise_step")])
    for t in tables:
        f = t.frame[t.frame["strength"] == t.frame["strength"].max()].sort_values("step")
        rows = [[int(r.step), rate(r.same_rate, r.ci_low, r.ci_high), rate(r.accuracy, r.accuracy_ci_low,
                                                                          r.accuracy_ci_high),
                 rate(r.same_wrong, r.same_wrong_ci_low, r.same_wrong_ci_high) + f" (of {int(r.n_wrong)})"]
                for r in f.itertuples()]
        task, regime = f["task"].iloc[0], f["regime"].iloc[0]
        committed = f[f["ci_low"] >= 0.9]
        first = int(committed["step"].iloc[0]) if len(committed) else None
        out += [f"### {task} ({regime} answer), run `{t.run}`, λ = {f['strength'].iloc[0]:g}", "",
                md_table(["step re-noised", "same answer", "accuracy", "same answer when the clean one is wrong"],
                         rows), "",
                (f"- Committed (lower bound of P(same) ≥ 90 %) from step {first} on; the clean run's accuracy is "
                 f"{pct(f['clean_accuracy'].iloc[0])}." if first is not None else
                 f"- P(same) never has a lower bound ≥ 90 % at these steps; clean accuracy {pct(f['clean_accuracy'].iloc[0])}."),
                cite(src, t, _n(f)), ""]
    return "\n".join(out)


def noise_section(src: Sources) -> str:
    out = ["## 3. Noise at a step vs at a frame, off and on the data distribution", "",
           "Paper (Fig. 3b): noise at one step (all frames) collapses the score (0.685 → below 0.3 on VBVR-Bench), "
           "noise at one frame (all steps) barely moves it.", "",
           "Off-distribution (the paper's probe): x ← (1−λ)·x + λ·ε on the latent entering a step (all frames) or on "
           "one latent frame at every step. On-distribution: x̂0 is kept and a fraction λ of the noise is redrawn at "
           "the step's σ. Per row, the lowest accuracy over the positions tried and where it is.", ""]
    tables = src.named("interventions")
    if not tables:
        return "\n".join(out + [missing("the noise probes", "cos intervene RUN --strengths 0.1,0.25,0.5,1")])
    for t in tables:
        f = t.frame[t.frame["kind"].isin(["noise_step", "noise_frame", "renoise_step", "renoise_frame"])]
        if f.empty:
            continue
        rows = []
        for (kind, strength), part in f.groupby(["kind", "strength"], sort=True):
            worst = part.loc[part["value"].idxmin()]
            where = "step" if kind.endswith("step") else "frame"
            rows.append([kind, "on" if kind.startswith("renoise") else "off", f"{strength:g}", len(part),
                         rate(worst["value"], worst["ci_low"], worst["ci_high"]) + f" at {where} {int(worst['position'])}",
                         pct(part["value"].mean())])
        regime = t.frame["regime"].iloc[0] if "regime" in t.frame else "?"
        out += [f"### run `{t.run}` ({regime} answer; clean accuracy {pct(f['baseline'].iloc[0])})", "",
                md_table(["kind", "distribution", "λ", "positions", "lowest accuracy", "mean over positions"], rows),
                "", cite(src, t, _n(f)), ""]
    return "\n".join(out)


def propagation_section(src: Sources) -> str:
    out = ["## 4. How far a perturbation carries: the per-inject-step sensitivity curve", "",
           "Paper (Fig. 3c): a CKA-dissimilarity map whose sensitivity peaks at steps 20–30 of 50.", "",
           "A renoise perturbation (on-distribution, strength λ) at one step; per sample, the token-level distance "
           "|Δh|/|h| of every block's output to the same sample's clean run, the RMS change of the final video and "
           "whether the answer changed (the paper's Fig. 3c as a curve over inject steps).", ""]
    tables = src.named("sensitivity")
    if not tables:
        return "\n".join(out + [missing("the propagation map", "cos intervene RUN --which propagation")])
    for t in tables:
        f = t.frame.sort_values("inject_step")
        rows = [[int(r.inject_step), num(r.distance_last, r.distance_last_ci_low, r.distance_last_ci_high),
                 num(r.final_distance, r.final_distance_ci_low, r.final_distance_ci_high),
                 rate(r.flip_rate, r.flip_rate_ci_low, r.flip_rate_ci_high)] for r in f.itertuples()]
        peak = f.loc[f["flip_rate"].idxmax()]
        out += [f"### run `{t.run}` ({f['regime'].iloc[0]} answer), λ = {f['strength'].iloc[0]:g}", "",
                md_table(["inject step", "|Δh|/|h| at the last step", "final video RMS change", "answer changed"],
                         rows), "",
                f"- The answer changes most when the perturbation enters at step {int(peak['inject_step'])} "
                f"({rate(peak['flip_rate'], peak['flip_rate_ci_low'], peak['flip_rate_ci_high'])}).",
                cite(src, t, _n(f)), ""]
    return "\n".join(out)


def patching_section(src: Sources) -> str:
    out = ["## 5. Activation patching, minus its nulls", "",
           "Paper (§5, Fig. 6): swapping the layer-20 hidden state between two scenes at the first step flips the "
           "answer; middle layers carry the decisive semantics.", "",
           "Block L's residual update at step s is replaced by a donor run's (seed → seed: another noise seed of the "
           "same instance; instance → instance: another instance, where the answer means the same). Effects are the "
           "patch's rate minus a null's, paired per recipient: a random update of the same per-token norm, a donor "
           "with the same answer, and a self-patch (must be 0). Holm's correction runs over the layers of one "
           "(step, null, metric); ★ = Holm p < 0.05.", ""]
    tables = src.named("patching")
    if not tables:
        return "\n".join(out + [missing("activation patching", "cos patch RUN")])
    for t in tables:
        f = t.frame
        head = f"### run `{t.run}` ({f['task'].iloc[0]}, {f['regime'].iloc[0]} answer, {f['pairs'].iloc[0]} pairs)"
        rows = []
        for r in f[f["null"] == "random"].sort_values(["metric", "step", "layer"]).itertuples():
            rows.append([r.metric, int(r.step), int(r.layer), pct(r.patch_rate), pct(r.null_rate),
                         num(r.effect, r.ci_low, r.ci_high) + (" ★" if r.significant else ""), int(r.n)])
        sig = f[f["significant"] & (f["null"] != "self")]
        self_rows = f[(f["null"] == "self") & (f["metric"] == "flip")]
        lines = [f"- Cells whose effect beats a null after Holm: {len(sig)} of {len(f[f['null'] != 'self'])} "
                 f"({', '.join(sorted({f'{m} vs {n}' for m, n in zip(sig['metric'], sig['null'])})) or 'none'})."]
        if len(self_rows):
            lines.append(f"- Self-patch flip rate: at most {pct(self_rows['null_rate'].max())} (the null that checks "
                         "the machinery: a patch with the run's own update changes nothing).")
        out += [head, "", md_table(["metric", "step", "layer", "patch", "random null", "effect", "n"], rows), "",
                *lines, cite(src, t, _n(f)), ""]
    return "\n".join(out)


def search_section(src: Sources) -> str:
    out = ["## 6. Test-time scaling at equal compute", "",
           "Paper (§6): merging the early latents of 3 seeds lifts VBVR-Bench 0.685 → ≈ 0.71, against one seed only. "
           "Here every method is compared at equal forward passes, on the task with headroom.", "",
           "Every method on the same instances and member seeds, placed by the forward passes it spends per instance "
           "(NFE; S steps per trajectory). `single`: one seed; `majority`: the most common answer of n seeds; "
           "`early_search`: run n seeds k steps, keep the one whose x̂0 answer the most other seeds share, finish it "
           "(n·k + S − k); `ensemble_*`: n seeds merged during K steps, member 0's video; `noise_mean`: one seed "
           "from the mean of n noises; `oracle_any`: any of n right (a ceiling, not a method). Gain = paired "
           "difference to `single`.", ""]
    tables = src.named("search")
    if not tables:
        return "\n".join(out + [missing("test-time scaling", "cos search RUN")])
    for t in tables:
        f = t.frame.sort_values(["nfe", "method", "n", "k"])
        rows = [[r.method, int(r.n), int(r.k), int(r.nfe), rate(r.accuracy, r.ci_low, r.ci_high),
                 num(r.gain, r.gain_ci_low, r.gain_ci_high)] for r in f.itertuples()]
        real = f[(f["method"] != "oracle_any") & (f["method"] != "single")]
        better = real[real["gain_ci_low"] > 0]
        worse = real[real["gain_ci_high"] < 0]
        best = real.loc[real["accuracy"].idxmax()] if len(real) else None
        lines = [f"- Paired gain over one seed with an interval above 0: "
                 f"{', '.join(f'{m} (n={n}, k={k}, NFE {e})' for m, n, k, e in zip(better['method'], better['n'], better['k'], better['nfe'])) or 'none'}; "
                 f"below 0: {', '.join(f'{m} (n={n}, k={k})' for m, n, k in zip(worse['method'], worse['n'], worse['k'])) or 'none'}."]
        if best is not None:
            lines.append(f"- Most accurate: {best['method']} (n = {int(best['n'])}, k = {int(best['k'])}, "
                         f"NFE {int(best['nfe'])}): {rate(best['accuracy'], best['ci_low'], best['ci_high'])}.")
        out += [f"### {f['task'].iloc[0]} ({f['regime'].iloc[0]} answer), run `{t.run}`, S = "
                f"{int(f['num_inference_steps'].iloc[0])}", "",
                md_table(["method", "n", "k", "NFE", "accuracy", "gain"], rows), "", *lines,
                cite(src, t, f"{int(f['n_instances'].max())} instances"), ""]
    return "\n".join(out)


def events_section(src: Sources) -> str:
    out = ["## 7. Self-correction and emergence, by definition", "",
           "Paper: a wrong early answer is revised within a few steps (qualitative).", "",
           "Events between consecutive steps of x̂0's answer (both states held ≥ 2 steps): `self_correction` is a "
           "readable wrong answer becoming right; `emergence` an unreadable one becoming right (keys read back from "
           "a table are NaN, not None, where unreadable: the detector now treats both alike).", ""]
    rows = []
    for t in src.named("event_rates"):
        f = t.frame
        counts = f.groupby("kind")["n_events"].sum()
        rows.append([f"`{t.run}`", ", ".join(sorted(f["task"].unique())), int(f["n"].max()),
                     *[int(counts.get(k, 0)) for k in ("self_correction", "emergence", "enhancement", "regression",
                                                       "switch")]])
    old = SHIPPED_RUNS / "organism-fork" / "derived" / "events.parquet"
    if old.is_file():
        kinds = pd.read_parquet(old)["kind"].value_counts()
        out.append(f"- The previous organism's shipped fork run (`cached_runs/organism-fork`, regenerated with the "
                   f"fixed detector): {int(kinds.get('self_correction', 0))} self-corrections and "
                   f"{int(kinds.get('emergence', 0))} emergences; the old §2 counted every emergence as a "
                   "self-correction.")
    if rows:
        out += ["", md_table(["run", "task", "n", "self_correction", "emergence", "enhancement", "regression",
                              "switch"], rows), "",
                "Sources: " + "; ".join(f"`{src.rel(t.path)}` (made by `{t.command}`; archive {t.archive})"
                                        for t in src.named("event_rates")) + "."]
    else:
        out += ["", missing("events on the new organism", "cos analyze RUN --which dynamics")]
    return "\n".join(out) + "\n"


SECTIONS: tuple[Callable[[Sources], str], ...] = (regime_section, commitment_section, noise_section,
                                                    propagation_section, patching_section, search_section,
                                                    events_section)


def sources_section(src: Sources) -> str:
    rows = [[f"`{src.rel(t.path)}`", t.archive, f"`{t.command}`"] for t in sorted(src.tables.values(),
                                                                              key=lambda t: (t.run, t.name))]
    body = md_table(["table", "archive", "command"], rows) if rows else "(no tables yet)"
    return "\n".join([
        "## Sources", "",
        "Every table this document reads, the archive it was computed from (shipped in `cached_runs/`, or "
        f"reproducible-only: `{RESEARCH}` makes it, and only its tables are shipped, in `tables/`) and the command "
        "that made the table. Sizes (n) are given where each number is used; a small run's intervals are wide and its "
        "claims are illustrations, not proof.", "", body, ""])


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
    text = "\n".join([head, *(section(src) for section in SECTIONS), sources_section(src)])
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
