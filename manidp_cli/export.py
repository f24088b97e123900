"""Exports: one safetensors file holding all weights (gates and thresholds included) and, in its
metadata, everything needed to rebuild the model without the run that made it.

Example::

    model, info = load_pruned("runs/prune-resnet18")
    info.metadata["flops"]["mean_ratio"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from manidp_cli import __version__, cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)
from manidp_cli.errors import WeightsError
from manidp_cli.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (atomic_write_text: re-exported)
from manidp_cli.gating import GatePolicy, insert_gates

MODEL_FILE = "model.safetensors"
METADATA_KEY = "manidp"


def save_model(path: Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s state dict to ``path`` (.safetensors) atomically, metadata as JSON."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {METADATA_KEY: json.dumps({**metadata, "manidp_version": __version__}), "format": "pt"}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def _model_file(path: Path) -> Path:
    path = Path(path).expanduser()
    return path / MODEL_FILE if path.is_dir() else path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The manidp metadata of an export folder or its model.safetensors."""
    from safetensors import safe_open

    file = _model_file(Path(path))
    if not file.is_file():
        raise WeightsError(f"no manidp export at {path} (expected {file})")
    try:
        with safe_open(str(file), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:
        raise WeightsError(f"cannot read {file}: {str(exc).splitlines()[0]}") from exc
    if raw is None:
        raise WeightsError(f"{file} has no manidp metadata (not made by manidp prune/train)")
    return json.loads(raw)


@dataclass
class LoadedExport:
    path: Path
    metadata: dict[str, Any]

    @property
    def gated(self) -> bool:
        return self.metadata.get("kind") == "pruned"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["input_shape"])

    def load_data(self, spec: str | None = None):
        """``spec``'s data, or the data recorded in the export when None, checked to fit the model;
        returns the data and where its specification came from."""
        from manidp_cli.data import load_data
        from manidp_cli.errors import DataError

        chosen = spec or self.metadata.get("data", {}).get("spec")
        if chosen is None:
            raise DataError("no --data given and none recorded in the export's metadata")
        images = load_data(chosen, self.metadata["model"])
        if images.input_shape != self.input_shape:
            raise DataError(f"data {images.spec} gives {images.input_shape} images, the export expects {self.input_shape}")
        classes = self.metadata["model_kwargs"]["num_classes"]
        if images.num_classes != classes:
            raise DataError(f"data {images.spec} has {images.num_classes} classes, the export has {classes}")
        return images, ("--data" if spec else "the export's metadata")


def load_pruned(path: str | Path) -> tuple[nn.Module, LoadedExport]:
    """Rebuild the (gated) model of an export from the export alone, in eval mode."""
    import timm
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    file = _model_file(Path(path))
    model = timm.create_model(metadata["model"], pretrained=False, **metadata["model_kwargs"])
    if metadata.get("kind") == "pruned":
        policy = GatePolicy.model_validate(metadata["gate_policy"])
        gates = insert_gates(model, policy, input_shape=tuple(metadata["input_shape"]))
        if sorted(gates.by_conv()) != sorted(metadata["gated_layers"]):
            raise WeightsError(f"{file}: the gate policy no longer selects the exported layers")
    try:
        model.load_state_dict(load_file(str(file)), strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{file} does not fit {metadata['model']}: {str(exc).splitlines()[1].strip()}") from exc
    model.eval()
    return model, LoadedExport(file, metadata)
