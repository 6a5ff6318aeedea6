"""Experiments: re-run an organism archive's samples and change how they are generated — noise probes, layer swap
and the propagation map (`interventions`), the latent ensemble (`ensemble`, `merge`), all through `replay`.

They write `derived/` tables of the run they re-run. Imports torch, capture (its hooks, work items and sources),
analysis and archive; never plots, the CLI or streamlit, and capture never imports this package.
"""
