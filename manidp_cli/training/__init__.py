"""Fitting a model: the engine, its checkpoints, and the objectives it optimises."""
