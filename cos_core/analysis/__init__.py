"""Analyses of archives: probe grids, step dynamics, working memory, CKA — pure functions written to `derived/`.

Importing this package needs numpy/pandas only; the torch probe engine is imported when it is used. Table schemas
are in docs/analysis.md. Must not import streamlit or diffusers.
"""

from .analyze import ANALYSES, AnalyzeConfig, analyze_run, applicability, probe_grid
from .cka import cka_matrix, linear_cka
from .dynamics import DynamicsConfig, detect_events
from .features import FeatureSpec
from .probes import ProbeGrid

__all__ = ["ANALYSES", "AnalyzeConfig", "DynamicsConfig", "FeatureSpec", "ProbeGrid", "analyze_run", "applicability",
           "cka_matrix", "detect_events", "linear_cka", "probe_grid"]
