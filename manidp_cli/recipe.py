"""Recipes: typed YAML files that configure training and pruning.

A recipe may ``extends: other.yaml`` (resolved next to the extending file); the child's keys
override the parent's, nested sections key by key. CLI flags override the result. Unknown keys are
errors that name the key and the file.

Example::

    recipe = load_recipe("recipes/resnet56-cifar10.yaml", overrides={"epochs": 2})
    recipe.loss.lambda_sim   # 1.0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from manidp_cli.codebook import CodebookConfig
from manidp_cli.errors import RecipeError
from manidp_cli.gating import GatePolicy


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Section):
    """SGD with Nesterov momentum and a per-iteration cosine learning rate (method.md)."""

    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    gate_weight_decay: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class LossConfig(_Section):
    """ManiDP loss weights (method.md, "Loss")."""

    kappa: float = Field(0.5, gt=0)
    gamma: float = Field(1.0, ge=0)
    lambda_sparse: float = Field(0.1, ge=0)
    lambda_sim: float = Field(0.1, ge=0)
    complexity_weighting: bool = True  # False: uniform weights (plain L1 gating, an ablation)


class ScheduleConfig(_Section):
    """How thresholds move the measured mean FLOPs to the target."""

    hold_epochs: int = Field(1, ge=0, description="final epochs trained at the final target")
    calibration_images: int = Field(1024, ge=1)
    search_steps: int = Field(24, ge=1)


class Recipe(_Section):
    """Everything a ``manidp train`` or ``manidp prune`` run needs besides the model and weights."""

    data: str = "embedded"
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    train_images: int | None = Field(None, ge=1, description="images per epoch (a fresh random subset each epoch); None: all")
    eval_batch_size: int = Field(256, ge=1)
    target_flops: float = Field(0.45, gt=0, lt=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False  # bf16 autocast for the forward pass; loss terms stay fp32
    channels_last: bool = False
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    gates: GatePolicy = GatePolicy()
    codebook: CodebookConfig = CodebookConfig()

    @model_validator(mode="after")
    def _codebook_fits_schedule(self) -> Recipe:
        if self.codebook.enabled and self.codebook.epochs > self.schedule.hold_epochs:
            raise ValueError(
                f"codebook.epochs ({self.codebook.epochs}) must be at most schedule.hold_epochs "
                f"({self.schedule.hold_epochs}): the codebook is built once the FLOPs target is final"
            )
        if self.codebook.enabled and self.codebook.epochs >= self.epochs:
            raise ValueError(
                f"codebook.epochs ({self.codebook.epochs}) must be less than epochs ({self.epochs}): "
                f"the codebook is learned from the thresholds of the epochs before"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _merge(base: dict, child: dict) -> dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.expanduser().resolve()
    if path in seen:
        raise RecipeError(f"recipe {path} extends itself (through {' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return _merge(_read(path.parent / str(parent), seen + (path,)), raw)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if not where:  # a rule across keys: its message names them
            parts.append(item["msg"].removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"'{where}': {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, merge and validate a recipe; ``None`` gives the built-in defaults (recipes/default.yaml)."""
    raw = _read(Path(path)) if path is not None else {}
    raw = _merge(raw, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        source = f"recipe {path}" if path is not None else "settings"
        raise RecipeError(f"{source}: {_describe(exc)}") from exc
