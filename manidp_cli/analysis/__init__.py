"""Measuring a model: accuracy and FLOPs, per-layer reports, plots, timing."""
