"""manidp: ManiDP dynamic channel pruning for timm CNNs.

The public API is imported lazily so that ``manidp --help`` does not pay for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GatePolicy": "manidp_cli.config",
    "GateSet": "manidp_cli.core.gating",
    "SaliencyGate": "manidp_cli.core.gating",
    "insert_gates": "manidp_cli.core.gating",
    "gates_of": "manidp_cli.core.gating",
    "GateRecorder": "manidp_cli.core.recorder",
    "CostTable": "manidp_cli.core.flops",
    "FlopsStats": "manidp_cli.core.flops",
    "count_flops": "manidp_cli.core.flops",
    "measure_flops": "manidp_cli.core.flops",
    "ManidpError": "manidp_cli.errors",
    "eval_mode": "manidp_cli.core.modes",
    "load_pruned": "manidp_cli.io",
    "evaluate": "manidp_cli.analysis.evaluation",
    "evaluate_export": "manidp_cli.api.evaluate",
    "evaluate_cascade_exports": "manidp_cli.api.cascade",
    "Cascade": "manidp_cli.runtime.cascade",
    "load_cascade": "manidp_cli.runtime.cascade",
    "flops_report": "manidp_cli.analysis.report",
    "model_report": "manidp_cli.analysis.report",
    "prepare": "manidp_cli.api.jobs",
    "run": "manidp_cli.api.jobs",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'manidp_cli' has no attribute {name!r}")
