"""Checks shared by the executor tests: the dynamic executor against the masked model, decision by
decision.

The executor computes its numbers differently from the masked model (BatchNorm folded, narrow
convolutions, other kernels on other CPUs), so a comparison of outputs alone depends on the CPU: a
decision close to a tie can go either way, and then the outputs differ by far more than rounding.
``check_execution`` therefore checks three things that hold on every CPU:

1. given the masked model's decisions (forced layer by layer), the executor's output equals the
   masked model's up to rounding;
2. each layer's own saliencies equal the masked model's up to rounding, and its own decision is
   exactly the gate's rule applied to them (``SaliencyGate.decide``);
3. where its own decision differs, the masked model's margin is within what that rounding can move
   (a flip of a codebook entry needs margin <= 2 * sum |d pi|, of a free-mask channel |d pi_j|).
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from manidp_cli.api.jobs import prepare, run
from manidp_cli.cli import main as cli_main
from manidp_cli.core.gating import gates_of
from manidp_cli.runtime.decisions import decision_flip_bounds, reference_run, run_with_decisions
from manidp_cli.runtime.execute import deciding_layers

FAMILIES = [  # one model per timm family the gates must support (tests/test_gating.py's contract)
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext26ts",
    "regnetx_002",
    "mobilenetv2_050",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "densenet121",
    "vgg11_bn",
    "ghostnet_100",
]
OUTPUT_TOLERANCE = 1e-4  # float32 rounding through a deep network, outputs of unit scale
SALIENCY_TOLERANCE = 1e-4  # relative to the layer's largest saliency


@dataclass
class ExecutionCheck:
    decisions: int
    disagreements: int
    max_output_difference: float


def check_execution(model: nn.Module, fast: nn.Module, images: torch.Tensor) -> ExecutionCheck:
    """Assert 1-3 above for ``images`` (one image, or a batch) run through ``fast`` at once."""
    gates = gates_of(model).by_name()
    reference = reference_run(model, images)
    output, own = run_with_decisions(fast, images, forced=reference.decisions)
    difference = float((output - reference.logits).abs().max())
    assert difference <= OUTPUT_TOLERANCE, f"outputs differ by {difference:.2e} given equal decisions"
    assert set(own) == set(reference.decisions), "a gated layer did not decide"
    bounds = decision_flip_bounds(fast, reference, gates)
    layers = deciding_layers(fast)
    disagreements = 0
    for name, expected in reference.decisions.items():
        layer = layers[name]
        saliency, reference_saliency = layer.last_saliency.double(), reference.saliency[name].double()
        drift = float((saliency - reference_saliency).abs().max())
        scale = 1.0 + float(reference_saliency.abs().max())
        assert drift <= SALIENCY_TOLERANCE * scale, f"{name}: saliencies differ by {drift:.2e}"
        assert torch.equal(own[name], gates[name].decide(layer.last_saliency)), f"{name}: not the gate's rule"
        differs = (own[name] != expected).reshape(len(expected), -1).any(dim=1)
        margins = reference.margins[name]
        assert bool((margins[differs] <= bounds[name][differs]).all()), (
            f"{name}: decided otherwise than the masked model with margins {margins[differs].tolist()} "
            f"above what rounding can move ({bounds[name][differs].tolist()})"
        )
        disagreements += int(differs.sum())
    decisions = len(reference.decisions) * images.shape[0]
    return ExecutionCheck(decisions, disagreements, difference)


def make_activations_positive(model: torch.nn.Module) -> None:
    """Give every BatchNorm a small scale and a positive shift so that no channel is ever entirely
    zero: then every input channel of every convolution is active, whatever the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(module.weight, 0.01)
            torch.nn.init.constant_(module.bias, 1.0)


def randomize_norms(model: torch.nn.Module) -> None:
    """timm zero-initialises the last BatchNorm of residual branches, which makes a fresh network
    ignore those branches (and hence their gates); random affine parameters bring them back."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


def write_fashion_mnist_idx(directory, images, labels, split: str) -> None:
    """Write images (N x 28 x 28 uint8) and labels as gzipped IDX files, the Fashion-MNIST format."""
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / f"{split}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, len(images), 28, 28) + np.asarray(images, dtype=np.uint8).tobytes())
    with gzip.open(directory / f"{split}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes())


def write_image_folder(root, splits=("train", "val"), classes=("cat", "dog"), images: int = 3, size=(40, 30)):
    """A tiny ImageFolder tree (``root/<split>/<class>/<i>.png``) of random RGB images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(images):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_main(monkeypatch, capsys, *args):
    """``manidp ARGS`` through the real entry point; returns (exit code, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["manidp", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        cli_main()
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def write_cifar(directory, names, label_bytes: int, count: int, classes: int):
    """Random CIFAR binary files: each record is label byte(s) then 3072 pixel bytes."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        labels = rng.integers(0, classes, size=(count, label_bytes), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(directory / name)


PAPER_PROCEDURE = {  # recipes/paper.yaml's departures from the default, as overrides
    "loss": {"lambda_sparse": 0.1, "lambda_sim": 0.1, "distill_weight": 0.0},
    "schedule": {"mode": "epoch"},
    "gates": {"init": "ones", "max_cost": None},
}
TINY_PRUNE = {
    # loss.teacher_dtype auto is bf16 on CPUs with AVX512-BF16 or AMX only, which changes a tiny run's
    # trajectory: pinned, a test's outcome is the same on every CPU (the bf16 teacher has its own tests)
    "loss": {"teacher_dtype": "float32"},
    "epochs": 2,
    "batch_size": 32,
    "eval_batch_size": 64,
    "target_flops": 0.5,
    "schedule": {"calibration_images": 64, "search_steps": 12},
}


def prune_tiny(out, data: str, resume: bool = False, overrides=None, **extra):
    """A 2-epoch prune of timm's 'test_resnet' on the tiny Fashion-MNIST folder."""
    overrides = overrides or {}
    loss = {**TINY_PRUNE["loss"], **overrides.get("loss", {})}
    job = prepare(
        "prune",
        "test_resnet",
        overrides={**TINY_PRUNE, "data": data, **overrides, "loss": loss},
        out_dir=out,
        weights=extra.pop("weights", None),
        resume=resume,
    )
    return run(job, **extra)


CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run_manidp(args, *, preamble: str = "", cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``manidp ARGS`` in a fresh process through ``cli.main`` (exit codes, stdout and stderr as a user
    sees them), after ``preamble`` (Python run first: a patch, a resource limit)."""
    argv = f"sys.argv = ['manidp', *{list(map(str, args))!r}]"
    script = f"import sys\n{preamble}\nfrom manidp_cli.cli import main\n{argv}\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**CLI_ENV, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


def refuse_symbolic_batches(monkeypatch) -> None:
    """Make torch.export refuse a symbolic batch, as it does for some models: static exports then
    fall back to a program of batch 1."""
    real_export = torch.export.export

    def export(module, args, *rest, dynamic_shapes=None, **kwargs):
        if dynamic_shapes is not None:
            raise RuntimeError("cannot trace a symbolic batch")
        return real_export(module, args, *rest, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
