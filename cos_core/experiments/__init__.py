"""Experiments: re-run an organism archive's samples and change how they are generated — noise probes, the
commitment curve, propagation and the layer swap (`interventions`), activation patching (`patching`), the latent
ensemble (`ensemble`, `merge`), test-time scaling (`search`) and accuracy vs steps (`steps`), all through `replay`,
packed into calls by `batch` with per-sample noise from `noise` and answers read by `scoring`.

They write `derived/` tables of the run they re-run. Imports torch, capture (its hooks, work items and sources),
analysis and archive; never plots, the CLI or streamlit, and capture never imports this package.
"""
