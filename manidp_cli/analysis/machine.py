"""Which CPU a timing comes from: oneDNN and ATen pick other kernels on AVX2, AVX-512 and AMX machines,
so the same model's latency ratios differ between them (docs/portability.md)."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
"""The instruction-set flags of /proc/cpuinfo that change which convolution kernels run."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    logical_cpus: int
    isa_flags: tuple[str, ...]  # those of ISA_FLAGS the CPU has
    torch_capability: str  # the ATen kernels torch chose (e.g. AVX512, or AVX2 when capped)
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA, when the environment caps oneDNN's kernels

    def to_dict(self) -> dict:
        return {**asdict(self), "isa_flags": list(self.isa_flags)}


def _proc_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's CPU model, its kernel-relevant instruction sets and what torch runs on them."""
    try:
        model, flags = _proc_cpuinfo(cpuinfo.read_text())
    except OSError:  # not Linux: the model name is what the platform says, the flags unknown
        model, flags = None, set()
    return CpuInfo(
        model=model or platform.processor() or platform.machine(),
        logical_cpus=os.cpu_count() or 1,
        isa_flags=tuple(flag for flag in ISA_FLAGS if flag in flags),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
    )
