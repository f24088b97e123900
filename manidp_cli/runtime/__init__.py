"""Running a pruned model fast: folded BatchNorm, the dynamic executor, static slimming."""
