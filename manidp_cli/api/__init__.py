"""What each command does, as library calls: the layer the CLI (and a script) calls.

``prepare``/``run`` are ``manidp train`` and ``manidp prune``; ``evaluate_export``/``evaluate_dense``
are ``manidp eval``, ``evaluate_cascade_exports`` is ``manidp eval --escalate-to`` (``START``:
``--escalate-to-start``) and
``evaluate_cascade_file`` ``manidp eval`` of a saved cascade (``is_cascade``);
``flops_report``/``model_report``/``write_plots`` are ``manidp report``; ``export_static`` and
``bench_export`` are ``manidp export-static`` and ``manidp bench``. Their long loops tell an
``on_progress`` callback of each ``ProgressUpdate``.
"""

from manidp_cli.analysis.evaluation import DynamicExecution
from manidp_cli.analysis.plots import write_plots
from manidp_cli.analysis.report import FlopsReport, flops_report, model_report
from manidp_cli.api.bench import bench_export
from manidp_cli.api.cascade import START, CascadeResult, evaluate_cascade_exports, evaluate_cascade_file
from manidp_cli.api.evaluate import EvalResult, evaluate_dense, evaluate_export
from manidp_cli.api.jobs import Job, RunResult, prepare, run
from manidp_cli.api.static import StaticExport, export_static
from manidp_cli.core.progress import ProgressCallback, ProgressUpdate
from manidp_cli.io import is_cascade

__all__ = [
    "START",
    "CascadeResult",
    "DynamicExecution",
    "EvalResult",
    "FlopsReport",
    "Job",
    "ProgressCallback",
    "ProgressUpdate",
    "RunResult",
    "StaticExport",
    "bench_export",
    "evaluate_cascade_exports",
    "evaluate_cascade_file",
    "evaluate_dense",
    "evaluate_export",
    "export_static",
    "flops_report",
    "is_cascade",
    "model_report",
    "prepare",
    "run",
    "write_plots",
]
