"""Does oneDNN weight prepacking change the dense vs codebook comparison? One interleaved run.

Eager PyTorch reorders every convolution's weights into oneDNN's blocked layout at every call; at
batch 1 that dominates layers with large weights (resnet34's layer4). This benchmark routes
``torch.nn.functional.conv2d`` through prepacked oneDNN kernels (``torch.ops.mkldnn_prepacked``,
the kernels TorchScript freezing uses; packed once per weight and input shape) for the dense model
and the codebook model alike, and times both with and without, channels-last, batch 1. Writes
``benchmarks/results/prepacked_convolutions.json``:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prepacked_convolutions.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.analysis.bench import interleaved_latency, timing_model
from manidp_cli.runtime.execute import dynamic_model, folded_model

ROOT = Path(__file__).resolve().parent


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


class PrepackedConvolutions:
    """While active, F.conv2d runs prepacked oneDNN kernels (outputs identical here: max diff 0)."""

    def __init__(self):
        self.plain = F.conv2d
        self.packed: dict[tuple, object] = {}

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if isinstance(padding, str) or x.dim() != 4:
            return self.plain(x, weight, bias, stride, padding, dilation, groups)
        key = (weight.data_ptr(), tuple(x.shape), tuple(_pair(stride)), tuple(_pair(padding)), groups)
        context = self.packed.get(key)
        if context is None:
            context = torch.ops.mkldnn_prepacked.conv2d_prepack(
                weight.contiguous(memory_format=torch.channels_last),
                bias,
                _pair(stride),
                _pair(padding),
                _pair(dilation),
                groups,
                list(x.shape),
                "none",
            )
            self.packed[key] = context
        return torch.ops.mkldnn_prepacked.conv2d_run(x.contiguous(memory_format=torch.channels_last), context)

    @contextlib.contextmanager
    def active(self):
        F.conv2d = self.conv2d
        try:
            yield
        finally:
            F.conv2d = self.plain


class Prepacked(nn.Module):
    def __init__(self, model: nn.Module, convolutions: PrepackedConvolutions):
        super().__init__()
        self.model = model
        self.convolutions = convolutions

    def forward(self, x):
        with self.convolutions.active():
            return self.model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--target", type=float, default=0.45)
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "prepacked_convolutions.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (3, args.size, args.size)
    gated, dense, flops = timing_model(
        args.model, shape, args.target, codebook_entries=args.entries, channel_multiple=16
    )
    layout = torch.channels_last
    convolutions = PrepackedConvolutions()
    models = {
        "dense": folded_model(dense, shape).to(memory_format=layout),
        "codebook": dynamic_model(gated, shape).to(memory_format=layout),
    }
    image = torch.randn(1, *shape).contiguous(memory_format=layout)
    variants = {}
    for name, model in models.items():
        variants[name] = (model, image)
        variants[f"{name}_prepacked"] = (Prepacked(model, convolutions), image)
    with torch.inference_mode():
        difference = max(float((variants[f"{n}_prepacked"][0](image) - models[n](image)).abs().max()) for n in models)
    times = interleaved_latency(variants, args.runs, max(2, args.runs // 10))
    median = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "prepacked_convolutions",
        "model": args.model,
        "input_size": args.size,
        "threads": args.threads,
        "flops_ratio": flops,
        "entries": args.entries,
        "latency_ms_median": median,
        "max_output_difference": difference,
        "codebook_vs_dense_eager": median["codebook"] / median["dense"],
        "codebook_vs_dense_prepacked": median["codebook_prepacked"] / median["dense_prepacked"],
        "prepacked_vs_eager_dense": median["dense_prepacked"] / median["dense"],
        "prepacked_vs_eager_codebook": median["codebook_prepacked"] / median["codebook"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.model} at {args.size} px, batch 1, {args.threads} threads (ms, median of {args.runs}):")
    for name, value in median.items():
        print(f"  {name:20s} {value:7.1f}")
    print(
        f"codebook / dense: eager {result['codebook_vs_dense_eager']:.3f}, "
        f"both prepacked {result['codebook_vs_dense_prepacked']:.3f} (outputs differ by {difference:.1e})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
