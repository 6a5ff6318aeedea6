"""The run archive's on-disk schema: this docstring is the one place it is written down; the code below is its
constants, key builders, `ArchiveError`, the typed `Manifest` every producer fills and the derived-table columns.

Imports the standard library only: never numpy, torch or streamlit. Every other module of `cos_core.archive`
builds on it; it imports none of them.

Schema (``SCHEMA_VERSION`` = 1)::

    <runs_dir>/<run_id>/
      manifest.json        written last (`Manifest`; keys marked * are required, a reader refuses a run without them)
        by the writer:     schema_version* (1), complete* (true), run_id*, n_samples*, shards* [relative paths]
        by capture, the same for every sample (the shard layout):
                           steps* [{step, t, sigma, expert}], n_steps*, x0_rule ("flow" | "v_prediction" |
                           "epsilon": how x̂0 follows from x_t and v̂), x0_source ("scheduler": x0_hat is the
                           pred_original_sample the scheduler's step returned and stepped with, clipped or thresholded
                           when that scheduler does so; "rule": x0_rule applied to x_t and v̂ in float32, then
                           thresholded / clipped as the scheduler config's `thresholding` / `clip_sample` say; the
                           raw, unclipped x̂0 is not kept: recompute it from x_t and v_hat by x0_rule),
                           conditioning_frames [latent frames the pipeline overwrites with its conditioning: [0]
                           for Wan2.2 TI2V-5B image-to-video (`expand_timesteps`), [] otherwise; there the model is
                           given t = 0, so x_t = x0_hat = final = the conditioning latent, and v_hat is the model's
                           output, which the pipeline discards], family (wan | cogvideox | ltx | hunyuan),
                           latent* {channels, frames, height, width}, token_grid* {frames, rows, cols, patch [pt, ph,
                           pw]}, tensors* {name: {steps, dtype, shape}}, sites* {site: {n_layers, layers, steps,
                           branches, dim, dtype, reductions {name: {shape}}, tokens [[layer, step], ...],
                           token_dtype (dtype of full tokens, "bfloat16" stored as uint16 bits; null: none)}},
                           decoded {steps, shape} | null
        by the capture run, once: created (ISO time), command [argv], versions {package: version},
                           config {spec (resolved CaptureSpec), call (pipeline kwargs), items [[sample_id, seed]],
                                   decode_steps, plus the source's extra: task, task_params, model_dir, ensemble
                                   {method, k, n, captured_member, member_seeds} on `--ensemble` runs},
                           model {source, pipeline_class, family, transformer_class, transformer_config,
                                  transformer_2_config, boundary_ratio, scheduler_class, scheduler_config, dtype,
                                  device (where the noise was drawn)},
                           timing {capture_s (capture phase wall time, all ranks), world_size, context_parallel
                                   (ranks per video), captured_here, batch_size (items per pipeline call; the
                                   archive is the same for every batch size), batch_forward ("per_item" | "joint")}
      samples.parquet      one row per sample: sample, sample_id, task, instance, seed, prompt, label_*, answer,
                           score_*, shard (column kinds: `SAMPLE_KINDS`)
      shards/sample_NNNNNN.safetensors   every tensor of one sample (one work item = instance x seed):
          x_t, v_hat, x0_hat        (tensor step, C, F, H, W)  latent layout, steps = manifest tensors.<name>.steps;
                                    x_t is the latent the model saw (conditioning frames written in), v_hat the
                                    guided model output the scheduler got, x0_hat what the sampler used (x0_source)
          final                     (C, F, H, W)              the latent the pipeline returns (after a user
                                    callback's edits and any conditioning overwrite), float32
          acts/<site>/<reduction>/<branch>   (act step, layer, *reduction shape)
              reductions: frame_mean (frame, d) | pool<k> (frame, k, k, d) | token_norm (frame, row, col)
                          | proj<d'> (frame, row, col, d')
              proj<d'> is computed in float32 (hidden states and the projection cast up) under any model dtype
          skipped/<site>/<branch>   (act step, layer) uint8: 1 where the archived activation is not the block's own
                                    output: a diffusers cache (FirstBlockCache, MagCache, ...) skipped the block, or
                                    it is the cache's leader block, whose output then carries the skipped blocks'
                                    cached residual (older runs lack the key: nothing was skipped)
          tokens/<site>/L<layer>/S<step>/<branch>  (frame, row, col, d)  full tokens for chosen (layer, step)
          decoded/x0_hat            (decode step, F, H, W, 3) uint8;  decoded/final (F, H, W, 3) uint8
        safetensors metadata: cos_schema_version, sample (its index), row (JSON sample row), layout (JSON: capture's
          manifest keys), content_sha256; the reader refuses a shard whose index or row's sample_id is another
          sample's (`shards.check_identity`). Older shards lack sample and content_sha256.
        manifest key checksums (written since checksums exist; older runs lack it and open all the same):
          ["sha256:<hex>", ...] per shard, over every tensor's name, dtype, shape and bytes in name order
          (`shards.array_digest` / `file_digest`: independent of header order); a reader checks a shard the first
          time it reads from it (and again if the file changes).
      derived/             the analysis tables, published as ONE set (`derived.publish_derived`):
        manifest.json        {format: 1, set, published, versions, tables {name: {file, rows, bytes, sha256,
                             producer, config, versions, published}}}
        <name>.parquet       the tables; those the pages plot have the columns and kinds of `DERIVED`
        A publish writes every table (new ones, and hard links to the ones it keeps) and the manifest into a hidden
        ``.derived.tmp-<host>-<pid>-<random>/`` and swaps it with ``derived/`` in one rename (RENAME_EXCHANGE), under
        the run's ``.derived.lock``: a reader sees the old set or the new one, and checks each table against the
        manifest's checksum (`derived.read_derived_set` reads several tables of one set). A new analysis publishes
        ALL its tables in one call:
            publish_derived(archive, {"my_table": table, "my_table_samples": samples}, producer="cos my-command")
        (table.attrs["cos_config"], a JSON string, is recorded as that table's config); if a page plots it, add a
        `DerivedSpec` to `DERIVED` below. Older runs have a derived/ without manifest.json: read table by table;
        the first publish carries their tables into a set.
      annotations.json     manual Chain-of-Steps labels from the dashboard (`labels.py`: a list of {sample, sample_id,
                           category, step, note, created}; saved under the run's ``.annotations.lock``)

Every file is written through a uniquely named temporary sibling (``.<name>.tmp-<host>-<pid>-<random>``), fsynced,
given mode 0666 minus the umask (0644 usually) and renamed; a temporary is removed by a later writer only when its
owner process is dead (`files.owner_alive`).
A run being written lives in ``<run_id>.partial/`` (with ``manifest.partial.json``); finished shards are renamed
into place, the manifest is written last and the directory renamed, so a reader sees a complete run or none.
Readers check the schema version and every manifest field's type and size at open, refuse paths that resolve
outside the run directory and files that are not regular files, check each tensor's header against the dtype and
shape the manifest promises, each table's size and columns before decoding it; every problem is an `ArchiveError`
(docs/reliability.md lists the cases and the limits).
Steps count from 0 = noisiest; ``t`` is the scheduler's timestep value, never an index.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
PARTIAL_SUFFIX = ".partial"
SAMPLES = "samples.parquet"
SHARD_DIR = "shards"
DERIVED_DIR = "derived"
ANNOTATIONS = "annotations.json"
DERIVED_MANIFEST = "manifest.json"  # inside derived/
STEP_TENSORS = ("x_t", "v_hat", "x0_hat")
BRANCHES = ("cond", "uncond")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# manifest keys that say when, how and how fast a run was made, not what it holds: two archives of the same work
# items are "the same" when everything else (tensors, samples table, the rest of the manifest) is equal
PROVENANCE_KEYS = frozenset({"created", "command", "run_id", "timing"})


class ArchiveError(ValueError):
    """Every problem a reader can report: missing or malformed files, wrong schema, bad look-ups."""


def shard_name(sample: int) -> str:
    return f"{SHARD_DIR}/sample_{sample:06d}.safetensors"


def act_key(site: str, reduction: str, branch: str) -> str:
    return f"acts/{site}/{reduction}/{branch}"


def skip_key(site: str, branch: str) -> str:
    return f"skipped/{site}/{branch}"


def token_key(site: str, layer: int, step: int, branch: str) -> str:
    return f"tokens/{site}/L{layer}/S{step}/{branch}"


def check_name(value: str, what: str) -> str:
    """A file-system-safe name (run ids, derived table names): no separators, no leading dot."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ArchiveError(f"{what} {value!r} is not allowed: use letters, digits, '_', '-', '.' (not first), "
                           "at most 128 characters")
    return value


def inside(run_dir: Path, path: Path, what: str) -> Path:
    """`path`, after checking that it resolves inside `run_dir` (a symlink must not lead a reader elsewhere)."""
    real = Path(path).resolve()
    if Path(run_dir).resolve() not in real.parents:
        raise ArchiveError(f"{run_dir}: {what} resolves outside the run directory ({real}); refusing to read it")
    return path


# ---- the manifest ------------------------------------------------------------------------------------------------
WRITER, CAPTURE, RUN = "writer", "capture", "capture run"  # who fills which manifest keys


class _Unset:
    """A manifest key its producer did not fill: left out of manifest.json (older or hand-made runs lack it)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def _key(producer: str, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"producer": producer})


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` as one typed record, filled by its three producers through `build` (keys and meanings:
    the module docstring). Keys with no default are required: `build` refuses a producer that omits one, and a
    reader refuses a manifest without one (`REQUIRED_KEYS`). A key no field declares is refused too."""

    run_id: str = _key(WRITER)
    n_samples: int = _key(WRITER)
    shards: list[str] = _key(WRITER)
    steps: list[dict[str, Any]] = _key(CAPTURE)
    n_steps: int = _key(CAPTURE)
    latent: dict[str, int] = _key(CAPTURE)
    token_grid: dict[str, Any] = _key(CAPTURE)
    tensors: dict[str, dict[str, Any]] = _key(CAPTURE)
    sites: dict[str, dict[str, Any]] = _key(CAPTURE)
    x0_rule: str = _key(CAPTURE, UNSET)
    x0_source: str = _key(CAPTURE, UNSET)
    conditioning_frames: list[int] = _key(CAPTURE, UNSET)
    family: str = _key(CAPTURE, UNSET)
    decoded: dict[str, Any] | None = _key(CAPTURE, UNSET)
    created: str = _key(RUN, UNSET)
    command: list[str] = _key(RUN, UNSET)
    versions: dict[str, str] = _key(RUN, UNSET)
    config: dict[str, Any] = _key(RUN, UNSET)
    model: dict[str, Any] = _key(RUN, UNSET)
    timing: dict[str, Any] = _key(RUN, UNSET)
    checksums: list[str] = _key(WRITER, UNSET)
    schema_version: int = field(default=SCHEMA_VERSION, init=False, metadata={"producer": WRITER})
    complete: bool = field(default=True, init=False, metadata={"producer": WRITER})

    @classmethod
    def build(cls, *, run_id: str, n_samples: int, layout: Mapping[str, Any], record: Mapping[str, Any],
              checksums: list[str] | None = None) -> "Manifest":
        """The manifest of a finished run: the writer's own keys, capture's `layout` (one sample's, equal for all)
        and the capture run's `record`. ArchiveError names a required key a producer omitted, or a key the schema
        does not give that producer (declare and document it here first)."""
        values: dict[str, Any] = {"run_id": run_id, "n_samples": n_samples,
                                  "shards": [shard_name(i) for i in range(n_samples)]}
        if checksums is not None:
            values["checksums"] = list(checksums)
        for producer, part in ((CAPTURE, layout), (RUN, record)):
            own = [f for f in fields(cls) if f.init and f.metadata["producer"] == producer]
            stray = sorted(set(part) - {f.name for f in own})
            if stray:
                raise ArchiveError(f"the {producer} filled manifest key(s) {stray} that the schema does not give it "
                                   f"(its keys: {[f.name for f in own]}); declare them in cos_core/archive/schema.py")
            missing = [f.name for f in own if f.default is MISSING and f.name not in part]
            if missing:
                raise ArchiveError(f"the {producer} misses required manifest key(s): {', '.join(missing)}")
            values.update(part)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written: every filled key (UNSET ones left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not UNSET}


REQUIRED_KEYS = tuple(f.name for f in fields(Manifest) if f.default is not UNSET)


# ---- tables: the columns pages use, with their kinds (docs/dashboard.md is the long form) --------------------------
# kinds (checked by `tables.read_parquet` before a page sees a table): "index" integers >= 0, "int" integers, no
# missing values; "number" integers, floats or booleans (missing allowed); "bool" the same, read as true/false;
# "text" strings (missing allowed); "json" strings holding JSON. A pattern "score_*" applies to every column it matches.
SAMPLE_KINDS: dict[str, str] = {"sample": "index", "sample_id": "text", "task": "text", "instance": "text",
                                "seed": "int", "prompt": "text", "answer": "json", "shard": "text",
                                "score_*": "number", "label_*": "number"}
_STEP = {"sigma": "number", "t": "number", "expert": "text"}


@dataclass(frozen=True)
class DerivedSpec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    what: str
    kinds: Mapping[str, str] = field(default_factory=dict)  # column -> kind, for every column a page uses


DERIVED: dict[str, DerivedSpec] = {
    # written by `cos analyze` (cos_core.analysis): the pages follow its columns
    "step_answers": DerivedSpec(("sample", "step", "correct"), ("answer", "answer_key", "score", "matches_final",
                                                                "sigma", "expert"),
                                "the task's answer read from x̂0 at every step, per sample",
                                {"sample": "index", "step": "index", "correct": "bool", "answer": "text",
                                 "answer_key": "text", "score": "number", "matches_final": "bool", **_STEP}),
    "convergence": DerivedSpec(("sample", "step", "dist_final"), ("dist_final_rel", "scene_dist", "motion_dist",
                                                                 "motion_match", "sigma"),
                               "distance of each step's x̂0 to the final output, per sample",
                               {"sample": "index", "step": "index", "dist_final": "number", "dist_final_rel": "number",
                                "scene_dist": "number", "motion_dist": "number", "motion_match": "number", **_STEP}),
    "probe_grid": DerivedSpec(("label", "layer", "step", "accuracy", "chance"),
                              ("ci_low", "ci_high", "selectivity", "selectivity_ci_low", "selectivity_ci_high",
                               "control_accuracy", "chance_uniform", "n", "n_instances", "task", "site",
                               "reduction", "branch", "pool", "frames", "kind", "engine", "sigma", "expert"),
                              "linear-probe accuracy per (layer, step) cell and label, with chance and selectivity",
                              {"label": "text", "layer": "int", "step": "index", "accuracy": "number",
                               "chance": "number", "ci_low": "number", "ci_high": "number", "selectivity": "number",
                               "selectivity_ci_low": "number", "selectivity_ci_high": "number",
                               "control_accuracy": "number", "chance_uniform": "number", "n": "int",
                               "n_instances": "int", "task": "text", "site": "text", "reduction": "text",
                               "branch": "text", "pool": "text", "frames": "text", "kind": "text", "engine": "text",
                               **_STEP}),
    "events": DerivedSpec(("sample", "kind", "step"), ("key_before", "key_after", "score_before", "score_after",
                                                      "change_spread", "sigma", "expert", "sample_id", "task"),
                          "step-dynamics events per sample: self_correction, regression, enhancement, emergence, "
                          "switch",
                          {"sample": "index", "kind": "text", "step": "index", "key_before": "text",
                           "key_after": "text", "score_before": "number", "score_after": "number",
                           "change_spread": "number", "sample_id": "text", "task": "text", **_STEP}),
    "event_rates": DerivedSpec(("kind", "step", "rate"), ("task", "n_events", "n", "n_instances", "ci_low",
                                                         "ci_high", "sigma"),
                               "per task, event kind and step: the fraction of samples with that event there",
                               {"kind": "text", "step": "index", "rate": "number", "task": "text",
                                "n_events": "number", "n": "number", "n_instances": "number", "ci_low": "number",
                                "ci_high": "number", **_STEP}),
    "memory": DerivedSpec(("step", "frame", "measure", "value"), ("source", "phase", "layer", "ci_low", "ci_high",
                                                                 "chance", "n", "n_instances", "sigma"),
                          "how well the hidden object's identity/position is kept, per step x frame (x̂0) and per "
                          "layer x step (probes)",
                          {"step": "int", "frame": "int", "measure": "text", "value": "number", "source": "text",
                           "phase": "text", "layer": "number", "ci_low": "number", "ci_high": "number",
                           "chance": "number", "n": "number", "n_instances": "number", **_STEP}),
    "interventions": DerivedSpec(("kind", "position", "value"), ("metric", "ci_low", "ci_high", "n", "baseline",
                                                                 "step", "strength", "distribution", "n_instances",
                                                                 "mean_score", "flip_rate", "adopt_rate", "regime"),
                                 "noise_step / noise_frame (off-distribution) and renoise_step / renoise_frame "
                                 "(on-distribution) re-scores per position and strength, and layer_swap flip rates",
                                 {"kind": "text", "position": "number", "value": "number", "metric": "text",
                                  "ci_low": "number", "ci_high": "number", "n": "number", "baseline": "number",
                                  "step": "number", "strength": "number", "distribution": "text",
                                  "n_instances": "number", "mean_score": "number", "flip_rate": "number",
                                  "adopt_rate": "number", "regime": "text"}),
    "propagation": DerivedSpec(("inject_step", "measure_step", "dissimilarity"), ("n",),
                               "1 - linear CKA between clean and perturbed runs, inject step x measure step",
                               {"inject_step": "int", "measure_step": "int", "dissimilarity": "number",
                                "n": "number", "layer": "int"}),
    # written by the measurement commands (cos intervene / patch / search: cos_core.experiments + analysis)
    "commitment": DerivedSpec(("step", "strength", "same_rate"),
                              ("ci_low", "ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "same_wrong",
                               "same_wrong_ci_low", "same_wrong_ci_high", "unreadable", "clean_accuracy", "n",
                               "n_readable", "n_wrong", "n_instances", "regime", "task"),
                              "the commitment curve: P(same final answer as the clean run) when x̂0 of step s-1 is kept "
                              "and the noise redrawn at step s (renoise_step), per step and strength",
                              {"step": "index", "strength": "number", "same_rate": "number", "ci_low": "number",
                               "ci_high": "number", "accuracy": "number", "accuracy_ci_low": "number",
                               "accuracy_ci_high": "number", "same_wrong": "number", "same_wrong_ci_low": "number",
                               "same_wrong_ci_high": "number", "unreadable": "number", "clean_accuracy": "number",
                               "n": "number", "n_readable": "number", "n_wrong": "number", "n_instances": "number",
                               "regime": "text", "task": "text"}),
    "sensitivity": DerivedSpec(("inject_step", "flip_rate"),
                               ("n", "n_instances", "strength", "regime", *(f"{m}{s}" for m in (
                                   "distance_mean", "distance_last", "final_distance") for s in ("", "_ci_low",
                                                                                                 "_ci_high")),
                                "flip_rate_ci_low", "flip_rate_ci_high"),
                               "per inject step of a renoise perturbation: token-level distance to the clean run, "
                               "final video change and answer flips (the paper's Fig. 3c as a curve)",
                               {"inject_step": "index", "flip_rate": "number", "n": "number", "n_instances": "number",
                                "strength": "number", "regime": "text", "flip_rate_ci_low": "number",
                                "flip_rate_ci_high": "number", **{f"{m}{s}": "number" for m in (
                                    "distance_mean", "distance_last", "final_distance") for s in ("", "_ci_low",
                                                                                                  "_ci_high")}}),
    "patching": DerivedSpec(("layer", "step", "null", "metric", "effect"),
                            ("patch_rate", "null_rate", "ci_low", "ci_high", "p_value", "p_holm", "significant", "n",
                             "n_instances", "pairs", "carry", "frames", "regime", "task"),
                            "activation patching per (step, layer): flip/adopt rate of the patch minus a null's "
                            "(random update of equal norm, same-answer donor, self-patch), Holm-corrected",
                            {"layer": "int", "step": "index", "null": "text", "metric": "text", "effect": "number",
                             "patch_rate": "number", "null_rate": "number", "ci_low": "number", "ci_high": "number",
                             "p_value": "number", "p_holm": "number", "significant": "bool", "n": "number",
                             "n_instances": "number", "pairs": "text", "carry": "text", "frames": "text",
                             "regime": "text", "task": "text"}),
    "search": DerivedSpec(("method", "n", "k", "nfe", "accuracy"),
                          ("ci_low", "ci_high", "gain", "gain_ci_low", "gain_ci_high", "unreadable", "n_instances",
                           "task", "regime", "num_inference_steps"),
                          "test-time scaling at equal compute: accuracy of each method (single, majority, early "
                          "search, latent ensembles, noise mean, more steps, oracle) by forward passes per instance",
                          {"method": "text", "n": "int", "k": "int", "nfe": "int", "accuracy": "number",
                           "ci_low": "number", "ci_high": "number", "gain": "number", "gain_ci_low": "number",
                           "gain_ci_high": "number", "unreadable": "number", "n_instances": "number", "task": "text",
                           "regime": "text", "num_inference_steps": "number"}),
    "ensemble": DerivedSpec(("method", "k", "n", "accuracy"), ("ci_low", "ci_high", "n_instances"),
                            "latent-ensemble accuracy over merge steps K and seeds n, with the noise-mean control",
                            {"method": "text", "k": "int", "n": "int", "accuracy": "number", "ci_low": "number",
                             "ci_high": "number", "n_instances": "number"}),
}


def check_derived(name: str, table: Any) -> Any:
    """The table (a DataFrame) unchanged if it has the columns the pages plot, else ArchiveError naming what is
    missing. An empty table is valid (e.g. no events in a run); the page says so."""
    if name not in DERIVED:
        raise ValueError(f"unknown derived table {name!r}; the dashboard plots: {sorted(DERIVED)}")
    missing = [c for c in DERIVED[name].required if c not in table.columns]
    if missing:
        raise ArchiveError(f"derived/{name} lacks column(s) {missing}; the dashboard expects "
                           f"{list(DERIVED[name].required)} (see docs/dashboard.md); it has {list(table.columns)}")
    return table
