"""Which precision the frozen teacher of distillation runs in.

Its forward pass is a quarter to a third of a fine-tuning step (benchmarks/training_step.py), and
it needs no gradient, so it can run in bfloat16 wherever the device has native bf16 kernels: there
oneDNN (CPUs with AVX512-BF16 or AMX) and CUDA (Ampere and later) compute it about twice as fast.
Elsewhere bf16 is emulated and slower than float32, so ``auto`` keeps float32.
"""

from __future__ import annotations

import os

import torch

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _onednn_cap_allows_bf16(cap: str) -> bool:
    """ONEDNN_MAX_CPU_ISA (e.g. AVX2 in this project's portability tests) caps oneDNN's kernels:
    only the caps that include the bf16 instructions leave native bf16 convolutions."""
    cap = cap.upper()
    return cap in ("ALL", "DEFAULT") or cap.startswith("AVX10") or any(k in cap for k in ("BF16", "FP16", "AMX"))


def cpu_computes_bf16() -> bool:
    """True when this CPU has AVX512-BF16 or AMX and the environment does not cap oneDNN below them."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    native = any(probe() for probe in probes if probe is not None)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return native and (cap is None or _onednn_cap_allows_bf16(cap))


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``loss.teacher_dtype`` on ``device``: float32 and bfloat16 as named; auto bfloat16 where native."""
    if setting != "auto":
        return TEACHER_DTYPES[setting]
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_computes_bf16()
    return torch.bfloat16 if native else torch.float32
