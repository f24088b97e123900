"""manidp: ManiDP dynamic channel pruning for timm CNNs.

The public API is imported lazily so that ``manidp --help`` does not pay for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GatePolicy": "manidp_cli.gating",
    "GateSet": "manidp_cli.gating",
    "SaliencyGate": "manidp_cli.gating",
    "insert_gates": "manidp_cli.gating",
    "gates_of": "manidp_cli.gating",
    "GateRecorder": "manidp_cli.recorder",
    "CostTable": "manidp_cli.flops",
    "FlopsStats": "manidp_cli.flops",
    "count_flops": "manidp_cli.flops",
    "measure_flops": "manidp_cli.flops",
    "ManidpError": "manidp_cli.errors",
    "load_pruned": "manidp_cli.export",
    "evaluate": "manidp_cli.evaluation",
    "evaluate_export": "manidp_cli.evaluation",
    "flops_report": "manidp_cli.report",
    "model_report": "manidp_cli.report",
    "prepare": "manidp_cli.pipeline",
    "run": "manidp_cli.pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'manidp_cli' has no attribute {name!r}")
