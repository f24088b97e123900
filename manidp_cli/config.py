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

from manidp_cli.errors import RecipeError
from manidp_cli.inputs import DEFAULT_WORKERS, IMAGE_SIZE_RANGE, capped, exception_text, is_file

MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; anything this big is not one
MAX_ALIASES = 32  # YAML aliases (*name) per document
MAX_VALUES = 10_000  # values in a document once its aliases are expanded
MAX_SEED = 2**32 - 1  # torch generators take 64 bits and the data order uses seed * 100003 + epoch


class GatePolicy(BaseModel):
    """Which convolutions get a gate, and the gate's hyper-parameters.

    Candidates are convolutions whose output feeds exactly one normalisation layer. Of those, the
    stem and the convolutions on residual shortcut branches are skipped by default. A depthwise
    convolution's output is renormalised by a BatchNorm whose bias would turn the zeroed input
    channels back into non-zero ones, so only a mask after it lets the following convolution skip
    those channels. By default (``depthwise: follow``) a depthwise convolution that a gated
    convolution alone feeds keeps exactly its producer's channels (the producer's gate masks both);
    other depthwise convolutions get a gate of their own. ``include``/``exclude`` are fnmatch
    patterns on module names; with ``include`` set, only matching candidates are gated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_stem: bool = True
    skip_shortcuts: bool = True
    depthwise: Literal["follow", "gate", "skip"] = Field(
        default="follow",
        description="follow: a depthwise convolution fed by a gated convolution keeps its producer's channels "
        "(others get their own gate); gate: every depthwise convolution decides with a gate of its own "
        "(measured to diverge at deep cuts, docs/gating.md); skip: depthwise convolutions are never masked",
    )
    reduction: int | None = Field(default=None, ge=1, description="None: 2 when C_out >= 80 else 1")
    max_cost: float | None = Field(
        default=None,
        gt=0,
        description="the most a gate's two layers may cost per image, as a fraction of the dense FLOPs it "
        "decides (its convolution's, and those of the convolutions that read its channels) at the model's "
        "input size: a gate over it gets a narrower hidden layer (at least 1 unit). A gate runs once per image and its "
        "convolution once per position, so on small images a gate can cost more than what it saves "
        "(mobilenetv2_050 at 32 px: the head's gate 1.13 times its convolution at reduction 8). None: no limit",
    )
    max_saliency: float = Field(default=1000.0, gt=0)
    activation: Literal["relu", "softplus"] = Field(
        default="relu",
        description="the gate's output non-linearity; softplus saliencies are never exactly 0, so a "
        "channel the sparsity term drove down can still be switched back on by a lower threshold",
    )
    init: Literal["ones", "l1_norm", "bn_scale", "taylor"] = Field(
        default="ones",
        description="initial saliency per channel: 1 (method.md), or 1 + init_strength * z with z the "
        "channel's normalised importance (its filter's L1 norm, |gamma| / sigma of its normalisation, or "
        "taylor: the first-order change of the loss when it is switched off, measured on the "
        "calibration images, core/taylor.py); the normalisation's affine is divided by it, so outputs "
        "are unchanged",
    )
    init_strength: float = Field(default=1.0, ge=0)
    routing_init: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="before training, fit each gate on the calibration images so that its saliencies vary "
        "per image by up to this fraction, following how strongly each channel responds to the image "
        "(0: every image starts with the same saliencies, method.md); measured to cost accuracy with short "
        "fine-tunes (docs/results.md); manidp_cli/core/routing_init.py",
    )
    inputs: bool = Field(
        default=False,
        description="also gate the input channels of each gated convolution that reads a tensor no gated "
        "convolution produces (a ResNet's residual stream), so that it skips per image the channels a "
        "static pruner would remove from the stream (not the paper; the executor runs such models masked)",
    )

    def with_constant_start(self) -> GatePolicy:
        """This policy with every gate starting at saliency 1: for gates whose start the weights loaded
        next replace (an export, a checkpoint), so that no importance is measured only to be overwritten
        (gates.init taylor runs the calibration images through the network)."""
        return self.model_copy(update={"init": "ones"})


class CodebookConfig(BaseModel):
    """How many keep-sets each gated layer may use, and how the final epochs train with them."""

    model_config = ConfigDict(extra="forbid")

    entries: int = Field(0, ge=0, le=64, description="keep-sets per gated layer; 0: free per-channel masks")
    channel_multiple: int = Field(8, ge=1, description="entry widths are rounded to a multiple of this")
    epochs: int = Field(1, ge=1, description="final epochs trained with the codebook")
    iterations: int = Field(20, ge=1, description="assignment/update rounds of the build")
    fit_widths: bool = Field(
        True,
        description="scale every entry's width (before rounding) so that the snapped model's measured FLOPs "
        "meet the target; false: round the learned widths and recalibrate thresholds only",
    )

    @property
    def enabled(self) -> bool:
        return self.entries > 0


class _Section(BaseModel):
    # inf/nan are never meaningful settings: --lr inf trained a NaN model to a "successful" export
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OptimizerConfig(_Section):
    """SGD with Nesterov momentum and a per-iteration cosine learning rate (method.md)."""

    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    gate_weight_decay: float = Field(0.0, ge=0)
    gate_lr_scale: float = Field(1.0, gt=0, description="the gates' learning rate over the network's")
    gate_optimizer: Literal["sgd", "adam"] = Field(
        "sgd",
        description="sgd: the gates step with the network's SGD; adam: their own Adam (steps of about the "
        "learning rate whatever the size of their gradient)",
    )
    gate_grad_clip: float | None = Field(
        None,
        gt=0,
        description="before each step the gates' gradient (all gates as one vector) is scaled down to at most "
        "this norm; None: never",
    )
    min_lr: float = Field(0.0, ge=0)
    # linear warm-up, then the cosine over the remaining steps (large global batches need it)
    warmup_epochs: float = Field(0.0, ge=0)
    lr_batch: int | None = Field(
        None,
        gt=0,
        description="the global batch that lr is meant for; lr scales linearly with the actual global batch "
        "(batch_size x processes). null: lr as it is, whatever the batch",
    )


class LossConfig(_Section):
    """ManiDP loss weights (method.md, "Loss")."""

    kappa: float = Field(0.5, gt=0)
    gamma: float = Field(1.0, ge=0)
    # method.md's reference weights are 0.1 / 0.1 (recipes/paper.yaml); at fine-tuning lengths of a
    # few epochs they outweigh the task loss several times over (docs/method-notes.md)
    lambda_sparse: float = Field(0.01, ge=0)
    lambda_sim: float = Field(0.01, ge=0)
    complexity_weighting: bool = True  # False: uniform weights (plain L1 gating, an ablation)
    distill_weight: float = Field(1.0, ge=0, description="weight of distillation from the dense start; 0: none")
    distill_temperature: float = Field(4.0, gt=0)
    distill_where: Literal["all", "teacher_better", "teacher_ahead"] = Field(
        "all",
        description="images distilled: all; teacher_better: only those the teacher fits better than "
        "the student (lower cross-entropy); teacher_ahead: all, but only while the teacher's running "
        "training accuracy is above the student's, so that distillation stops once the student "
        "outgrows its teacher",
    )

    feature_distill_weight: float = Field(
        0.0,
        ge=0,
        description="weight of distillation of the stage outputs (timm's feature_info) from the dense "
        "start, relative squared error per stage; 0: none",
    )

    distill_decay: Literal["none", "linear"] = Field(
        "none",
        description="linear: both distillation weights fall linearly to 0 over the run, so that a long "
        "run ends on the task loss alone",
    )

    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="precision of the teacher's forward pass: auto is bfloat16 where the device computes "
        "it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16), float32 elsewhere",
    )

    teacher_weights: str | None = Field(
        None,
        description="weights of the distillation teacher, the model's architecture at any width (read "
        "as --weights is); none: the start itself. For a statically slimmed start, its dense original",
    )

    def manidp_terms(self) -> dict[str, float | bool]:
        """The keyword arguments of ``ManiDPLoss`` (distillation is added around it)."""
        return self.model_dump(
            exclude={
                "distill_weight",
                "distill_temperature",
                "distill_where",
                "feature_distill_weight",
                "distill_decay",
                "teacher_dtype",
                "teacher_weights",
            }
        )

    def distils(self) -> bool:
        """Whether pruning needs the dense start as a teacher."""
        return self.distill_weight > 0 or self.feature_distill_weight > 0


class ScheduleConfig(_Section):
    """How thresholds move the measured mean FLOPs to the target."""

    mode: Literal["epoch", "feedback"] = Field(
        "feedback",
        description="epoch: the target moves once per epoch and a calibration sets each epoch's thresholds "
        "(method.md); feedback: thresholds follow the FLOPs measured in training every few steps",
    )
    hold_epochs: int = Field(1, ge=0, description="epoch mode: final epochs trained at the final target")
    ramp: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="feedback mode: fraction of the steps the target "
        "takes to fall from 1 to its final value (0: prune from the first step)",
    )
    feedback_every: int = Field(1, ge=1, description="feedback mode: steps between threshold updates")
    feedback_smoothing: float = Field(
        0.9, ge=0, lt=1, description="feedback mode: moving-average weight of the old mean saliencies at each update"
    )
    calibration_images: int = Field(1024, ge=1)
    search_steps: int = Field(24, ge=1)
    allocation: float = Field(
        0.0,
        ge=0,
        le=2,
        description="per-layer remain rates proportional to (FLOPs a layer's gate decides) ** -allocation: "
        "layers whose channels decide more FLOPs keep a smaller share (0: one rate for every layer, method.md)",
    )


class Recipe(_Section):
    """Everything a ``manidp train`` or ``manidp prune`` run needs besides the model and weights."""

    data: str = "embedded"
    img_size: int | None = Field(
        None,
        ge=IMAGE_SIZE_RANGE[0],
        le=IMAGE_SIZE_RANGE[1],
        description="image side in px (timm's --img-size); None: the model's pretrained_cfg for image "
        "folders, the native size of in-memory data",
    )
    workers: int = Field(
        DEFAULT_WORKERS, ge=0, description="loader processes for image folders (timm's -j); in-memory data ignores it"
    )
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    train_images: int | None = Field(
        None, ge=1, description="images per epoch (a fresh random subset each epoch); None: all"
    )
    eval_batch_size: int = Field(256, ge=1)
    target_flops: float = Field(0.45, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False  # bf16 autocast for the forward pass; loss terms stay fp32
    channels_last: bool = False
    # prune: gated convolutions compute only the channels some image of the batch keeps (core.narrow);
    # false: every channel computed, then masked (the paper's, recipes/paper.yaml)
    narrow_training: bool = True
    static_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="prune: the share of the cut, in log FLOPs, made first by static filter-L1 pruning "
        "(Torch-Pruning: pip install 'manidp[bench]'), which removes residual-stream channels that "
        "gates cannot: the start is slimmed to target_flops ** static_share of its FLOPs, and the "
        "gates cut the rest. 0: gates alone; 0.5: half each (recipes/hybrid.yaml)",
    )
    static_criterion: Literal["l1", "bn_scale", "taylor"] = Field(
        "l1",
        description="how static_share's stage ranks channel groups: their filters' L1 norm (Torch-Pruning's "
        "default), their normalisations' |gamma|, or taylor: |w * dL/dw| with the cross-entropy's gradients "
        "on the calibration images (runtime/static_l1.py)",
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    # the paper's all-ones start and gate width: recipes/paper.yaml
    gates: GatePolicy = GatePolicy(init="l1_norm", reduction=8, max_cost=0.03)
    codebook: CodebookConfig = CodebookConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections_keep_recipe_defaults(cls, raw: Any) -> Any:
        """A section given in part (``-o gates.depthwise=skip`` with no recipe file) keeps the recipe's
        defaults for its other keys where they differ from the section class's own (``gates``)."""
        if not isinstance(raw, dict):
            return raw
        merged = dict(raw)
        for name, field in cls.model_fields.items():
            if isinstance(field.default, BaseModel) and isinstance(raw.get(name), dict):
                merged[name] = {**field.default.model_dump(exclude_unset=True), **raw[name]}
        return merged

    @model_validator(mode="after")
    def _codebook_fits_schedule(self) -> Recipe:
        if self.codebook.enabled and self.gates.inputs:
            raise ValueError(
                f"codebook.entries ({self.codebook.entries}) needs gates.inputs: false: input gates have no "
                f"codebook executor yet (use codebook.entries: 0 with input gates)"
            )
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


class _YamlTooLarge(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that counts aliases: a few hundred bytes of nested aliases otherwise expand to
    millions of values ("billion laughs"), and every later step (validation, error messages) pays."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _YamlTooLarge(f"more than {MAX_ALIASES} aliases (*name)")
        return super().compose_node(parent, index)


def _expanded_values(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` holds with its aliases expanded, counted once per shared node."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _YamlTooLarge("an alias that contains itself")
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    total = 1
    for child in children:
        total += _expanded_values(child, sizes, open_nodes)
        if total > MAX_VALUES:
            raise _YamlTooLarge(f"more than {MAX_VALUES} values once its aliases are expanded")
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` of ``text`` within the alias and size budget; RecipeError naming ``source``
    otherwise."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_values(node, {}, set())
        return loader.construct_document(node)
    except _YamlTooLarge as exc:
        raise RecipeError(f"{source} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source} is not valid YAML: {capped(' '.join(str(exc).split()), 400)}") from None
    except RecursionError:
        raise RecipeError(f"{source} is refused: nested too deeply") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    if not is_file(path, "recipe"):
        raise RecipeError(f"recipe file {capped(path)} not found")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"recipe {capped(path)} is {size} bytes; a recipe is a small YAML file (at most {MAX_RECIPE_BYTES})"
            )
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {capped(path)} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {capped(path)}: {exc.strerror or exception_text(exc)}") from None


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.expanduser().resolve()
    if path in seen:
        raise RecipeError(f"recipe {capped(path)} extends itself (through {capped(' -> '.join(map(str, seen)), 1000)})")
    raw = parse_yaml(_read_text(path), f"recipe {capped(path)}") or {}
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
            parts.append(f"unknown key '{capped(where)}'")
        else:
            parts.append(f"'{capped(where)}': {item['msg']} (got {capped(repr(item.get('input')))})")
    return capped("; ".join(parts), 1000)


def explicit_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a recipe file (with the files it extends) and the flags state, merged but not validated
    and without defaults: ``--resume`` compares exactly these with the run's stored recipe."""
    raw = _read(Path(path)) if path is not None else {}
    return _merge(raw, {k: v for k, v in (overrides or {}).items() if v is not None})


def with_dotted_overrides(flags: dict[str, Any], pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``flags`` (named command-line options; None = not given) merged over ``KEY=VALUE`` pairs whose
    dotted keys name any recipe setting (``loss.lambda_sim=0.2``); values are YAML (``0.2``, ``true``,
    ``[a, b]``). A named flag wins over a pair that sets the same key."""
    dotted: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(
                f"-o {capped(repr(pair))}: expected KEY=VALUE with a dotted recipe key, e.g. -o loss.lambda_sim=0.2"
            )
        nested: Any = parse_yaml(text, f"-o {capped(key)}")
        for part in reversed(parts):
            nested = {part: nested}
        dotted = _merge(dotted, nested)
    return _merge(dotted, {k: v for k, v in flags.items() if v is not None})


def validate_recipe(raw: Any, source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_describe(exc)}") from exc


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, merge and validate a recipe; ``None`` gives the built-in defaults (recipes/default.yaml)."""
    source = f"recipe {capped(path)}" if path is not None else "settings"
    return validate_recipe(explicit_settings(path, overrides), source)
