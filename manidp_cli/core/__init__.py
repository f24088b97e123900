"""The method: gates, dataflow, FLOPs, losses, schedule, calibration and codebooks (no training loop)."""
