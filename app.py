"""cos-lab dashboard: `streamlit run app.py` (runs from `$COS_RUNS_DIR`, default `cached_runs/` next to this file).

Owns the page list and the order of a run: page config, shared sidebar, the chosen page, then the URL clean-up so
each view's widget state is its shareable address. Pages live in `views/`, one short script each (not `pages/`:
with Streamlit 1.40 and 1.67 a `pages/` folder makes a deep link run the page without `app.py` until some session
has run `app.py`). Only this file and `views/` import streamlit; nothing here imports torch or diffusers (the Live
page does so lazily).
"""

import sys
from pathlib import Path

import streamlit as st

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:  # `streamlit run` adds it; AppTest and other launchers may not
    sys.path.insert(0, str(APP_DIR))

from views import shared  # noqa: E402

st.set_page_config(page_title="cos-lab · Chain-of-Steps", page_icon=":material/movie:", layout="wide")

PAGES = {
    "Start": [st.Page("views/overview.py", title="Overview", icon=":material/home:", default=True)],
    "Watch": [st.Page("views/steps.py", title="Steps", icon=":material/stairs:"),
              st.Page("views/layers.py", title="Layers", icon=":material/layers:")],
    "Measure": [st.Page("views/probes.py", title="Probes", icon=":material/target:"),
                st.Page("views/self_correction.py", title="Self-correction", icon=":material/autorenew:"),
                st.Page("views/working_memory.py", title="Working memory", icon=":material/psychology:"),
                st.Page("views/interventions.py", title="Interventions", icon=":material/science:"),
                st.Page("views/ensemble.py", title="Ensemble", icon=":material/casino:")],
    "Explore": [st.Page("views/compare.py", title="Compare", icon=":material/compare:"),
                st.Page("views/live.py", title="Live", icon=":material/play_circle:")],
}

page = st.navigation(PAGES)
shared.begin_run()
try:
    shared.sidebar()
    page.run()
finally:
    shared.end_run()  # (a page that stops early has called it already)
