"""Plumbing every dashboard page shares: the sidebar (runs directory, run, sample), widgets mirrored into the URL,
cached archive reads keyed by path + manifest mtime, figure + download rendering, and error cards.

Owns the rule that pages see only runs under the configured runs directories, that a problem of one run is that
run's error card (`st.error` + `st.stop()`, never a traceback) while the others keep serving, and that text from an
archive (names, messages, labels) is shown as text, never rendered as markdown (`literal`). Imports streamlit,
numpy/pandas and cos_core's torch-free modules only (archive, frames, analysis, plots): never torch or diffusers.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from cos_core.archive import Archive, ArchiveError, list_runs
from cos_core.archive.derived import MissingTable, stamp
from cos_core.archive.labels import csv_text
from cos_core.archive.runs import RUNS_ENV, manifest_mtime, printable, run_path, runs_dirs
from cos_core.archive.schema import DERIVED

APP_DIR = Path(__file__).resolve().parent.parent
URL_KEYS = "_cos_url_keys"   # session key: the widget keys mirrored into the URL during this run
SELECTION = "_cos_selection"
RENDER_SECONDS = "_cos_render_seconds"  # session key: how long the last script run took (sidebar + page)
STARTED_AT = "_cos_started_at"


# ---- error cards -------------------------------------------------------------------------------------------
def stop() -> None:
    """End this page's run early. `end_run` comes first: after `st.stop()` changes to `st.query_params` and
    `st.session_state` are dropped."""
    end_run()
    st.stop()


def fail(message: str) -> None:
    """An expected problem: an error card, then stop this page (the sidebar and other pages keep working)."""
    st.error(message, icon=":material/error:")
    stop()


def literal(text: Any) -> str:
    """`text` as a markdown code span: shown exactly as it is (no links, images, emphasis, icons or LaTeX from a
    hostile run id, note or error message), bytes that are not UTF-8 as \\xNN."""
    text = printable(str(text)).replace("\n", " ")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


@contextmanager
def guard() -> Iterator[None]:
    """Turn archive problems raised inside the block into an error card."""
    try:
        yield
    except ArchiveError as err:
        fail(f"This run cannot be shown: {literal(err)}")


def run_cards(sel: "Selection") -> None:
    """One error card per run of the directory that cannot be read (the Overview lists them)."""
    for name, message in sel.bad.items():
        st.error(f"**{literal(name)}** cannot be read: {literal(message)}", icon=":material/error:")


# ---- widgets mirrored into the URL -------------------------------------------------------------------------
def _seed(key: str, options: Sequence[Any], default: Any) -> None:
    """Before a widget is drawn: keep a valid session value, else take a valid URL value, else `default`."""
    if key in st.session_state and st.session_state[key] in options:
        return
    raw = st.query_params.get(key)
    match = next((o for o in options if str(o) == raw), None) if raw is not None else None
    st.session_state[key] = match if match is not None else (default if default in options else options[0])


def _publish(key: str, value: Any) -> None:
    st.query_params[key] = str(value)
    st.session_state.setdefault(URL_KEYS, set()).add(key)


def begin_run() -> None:
    st.session_state[URL_KEYS] = set()
    st.session_state[STARTED_AT] = time.perf_counter()


def end_run() -> None:
    """Drop URL parameters that no widget of this run published (stale keys of another page) and record how long
    the run took (bench/dashboard_render.py reads it)."""
    keep = st.session_state.get(URL_KEYS, set())
    for key in list(st.query_params.keys()):
        if key not in keep:
            del st.query_params[key]
    st.session_state[RENDER_SECONDS] = time.perf_counter() - st.session_state.get(STARTED_AT, time.perf_counter())


def select(label: str, options: Sequence[Any], key: str, default: Any = None, where: Any = st,
           **kwargs: Any) -> Any:
    """`st.selectbox` whose value lives in the URL as `?key=value`."""
    options = list(options)
    if not options:
        fail(f"nothing to choose for {label!r}")
    _seed(key, options, default)
    value = where.selectbox(label, options, key=key, **kwargs)
    _publish(key, value)
    return value


def slider(label: str, options: Sequence[Any], key: str, default: Any = None, where: Any = st,
           **kwargs: Any) -> Any:
    """`st.select_slider` whose value lives in the URL (a plain selectbox when there is one option)."""
    options = list(options)
    if len(options) < 2:
        return select(label, options, key, default, where, **kwargs)
    _seed(key, options, default)
    value = where.select_slider(label, options, key=key, **kwargs)
    _publish(key, value)
    return value


# ---- runs: discovery and cached reads ------------------------------------------------------------------------
def roots() -> list[Path]:
    return runs_dirs(APP_DIR)


def _stamp(root: Path) -> tuple:
    try:
        return tuple(sorted((printable(c.name), manifest_mtime(c)) for c in root.iterdir() if c.is_dir()))
    except OSError:  # no such folder, or one we may not list (list_runs says so)
        return ()


@st.cache_data(max_entries=16, show_spinner=False)
def _scan(root: str, stamp: tuple) -> tuple[list[str], dict[str, str]]:
    good, bad = list_runs(root)
    names = []
    for archive in good:
        try:
            run_path(Path(root), archive.path.name)  # a link that leads outside the root is refused
            names.append(archive.path.name)
        except ArchiveError as err:
            bad[archive.path.name] = str(err)
    return names, bad


def scan(root: Path) -> tuple[list[str], dict[str, str]]:
    """(readable run directory names, {name: problem}) under one configured runs directory."""
    return _scan(str(root), _stamp(root))


@st.cache_resource(max_entries=256, show_spinner=False)
def _open(path: str, mtime: int) -> Archive:
    return Archive.open(path)


def open_run(root: Path, name: str) -> Archive:
    path = run_path(root, name)
    return _open(str(path), manifest_mtime(path))


def open_live(path: Path) -> Archive:
    """A run the Live page just made in its own temporary directory (not under the configured roots)."""
    return _open(str(path), manifest_mtime(path))


def key_of(archive: Archive) -> tuple[str, int]:
    """What cached reads of an archive are keyed by: its path and its manifest's mtime."""
    return str(archive.path), manifest_mtime(archive.path)


def cached(fn: Callable, archive: Archive, *args: Any) -> Any:
    """`fn(archive, *args)` cached on (archive path, manifest mtime, fn, args)."""
    return _cached_call(fn.__module__, fn.__qualname__, *key_of(archive), *args)


@st.cache_data(max_entries=96, show_spinner=False)
def _cached_call(module: str, name: str, path: str, mtime: int, *args: Any) -> Any:
    import importlib

    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn(_open(path, mtime), *args)


@st.cache_data(max_entries=64, show_spinner=False)
def _derived(path: str, mtime: int, name: str, set_stamp: tuple) -> pd.DataFrame:
    return _open(path, mtime).derived(name)


def derived(archive: Archive, name: str, page_what: str) -> pd.DataFrame | None:
    """The derived table `name` if an analysis published it (size, columns and their kinds checked by the reader),
    else an explanation and None; a table that is there but broken is an error card."""
    spec = DERIVED[name]
    try:
        return _derived(*key_of(archive), name, stamp(archive.path, name))
    except MissingTable:
        st.info(f"**Not computed yet for `{archive.run_id}`.** {page_what}\n\nThis view plots "
                f"`derived/{name}.parquet` ({spec.what}), which `cos analyze` writes into the run. Expected "
                f"columns: `{'`, `'.join(spec.required)}` (optional: `{'`, `'.join(spec.optional)}`); "
                "see docs/dashboard.md.", icon=":material/hourglass_empty:")
        return None
    except ArchiveError as err:
        fail(f"`derived/{name}.parquet` of `{archive.run_id}` cannot be shown: {literal(err)}")


# ---- the sidebar ---------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """What the sidebar picked. `archive`/`sample` are None when there is no readable run."""

    root: Path
    runs: list[str]
    bad: dict[str, str] = field(default_factory=dict)
    archive: Archive | None = None
    sample: int | None = None


def sidebar() -> Selection:
    """Draw the shared sidebar and remember the selection for the page script."""
    configured = roots()
    with st.sidebar:
        st.markdown("### Run")
        root = configured[0]
        if len(configured) > 1:
            root = Path(select("runs directory", [str(r) for r in configured], "dir"))
        runs, bad = scan(root)
        sel = Selection(root=root, runs=runs, bad=bad)
        if bad:
            st.warning(f"{len(bad)} run(s) in this directory cannot be read; the Overview page says why.",
                       icon=":material/warning:")
        if not runs:
            st.caption(f"No readable runs in `{root}`.")
        else:
            name = select("run", runs, "run")
            try:
                sel.archive = open_run(root, name)
                samples = cached(_samples, sel.archive)
                labels = {int(r["sample"]): sample_label(r) for _, r in samples.iterrows()}
                sel.sample = select("sample", list(labels), "sample", format_func=labels.get)
            except ArchiveError as err:
                st.error(f"`{name}`: {literal(err)}", icon=":material/error:")
                sel.archive = sel.sample = None
    st.session_state[SELECTION] = sel
    return sel


def sample_label(row: pd.Series) -> str:
    """How a sample is named in pickers: index, id, and its final score when there is one."""
    text = f"{int(row['sample'])} · {row.get('sample_id', '')}"
    if "score_correct" in row and pd.notna(row["score_correct"]):
        text += " ✓" if float(row["score_correct"]) >= 0.5 else " ✗"
    return text


def _samples(archive: Archive) -> pd.DataFrame:
    table = archive.samples.copy()
    if "sample" not in table:
        table["sample"] = range(len(table))
    return table


def samples(archive: Archive) -> pd.DataFrame:
    return cached(_samples, archive)


def selection() -> Selection:
    sel = st.session_state.get(SELECTION)
    if sel is None:  # a page run on its own (not through app.py)
        sel = sidebar()
    return sel


def require_run() -> tuple[Archive, int]:
    """The selected run and sample, or an error card that says how to get one."""
    sel = selection()
    if sel.archive is None or sel.sample is None:
        fail(f"No readable run is selected. Make one with `cos capture --runs-dir {sel.root}` or point "
             f"`{RUNS_ENV}` at a folder of runs; the Overview page lists what was found.")
    return sel.archive, sel.sample


# ---- figures -------------------------------------------------------------------------------------------------
def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Hash what a figure builder is called with: arrays, tables, dataclasses and plain values, by content."""
    if isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, pd.DataFrame):
        h.update(repr(list(value.columns)).encode())
        h.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
    elif is_dataclass(value):
        for f in fields(value):
            _feed(h, getattr(value, f.name))
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(repr(value).encode())


@st.cache_resource(max_entries=128, show_spinner=False)
def _figure(builder: str, digest: str, _build: Callable[..., Any], _args: tuple) -> Any:
    return _build(*_args)


def show(build: Callable[..., Any], args: tuple, data: pd.DataFrame | Callable[[], pd.DataFrame], name: str,
         **chart: Any) -> Any:
    """`build(*args)` drawn with `st.plotly_chart`, plus downloads of the figure (self-contained HTML) and its data
    (CSV), built on click. Figures are memoised by builder and argument content (building a plotly figure costs
    50-150 ms; a warm page should not pay it again); they are shared read-only between sessions."""
    assert isinstance(args, tuple), f"show({build.__name__}, args=...) needs a tuple of arguments, got {type(args)}"
    h = hashlib.blake2b(digest_size=16)
    _feed(h, args)
    fig = _figure(f"{build.__module__}.{build.__qualname__}", h.hexdigest(), build, args)
    event = st.plotly_chart(fig, key=f"fig-{name}", theme=None, **chart)  # the figure as downloaded
    table = data if callable(data) else (lambda: data)
    left, right, _ = st.columns([1, 1, 3])
    left.download_button("⬇ figure (HTML)", data=lambda: fig.to_html(include_plotlyjs=True), file_name=f"{name}.html",
                         mime="text/html", key=f"html-{name}", on_click="ignore")
    right.download_button("⬇ data (CSV)", data=lambda: csv_text(table()), file_name=f"{name}.csv",
                          mime="text/csv", key=f"csv-{name}", on_click="ignore")
    return event
