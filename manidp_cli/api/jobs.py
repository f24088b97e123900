"""``train`` and ``prune`` as library calls: prepare (validate everything, write nothing), then run.

Example::

    job = prepare("prune", "resnet18", weights=Path("runs/train-resnet18/model.safetensors"),
                  overrides={"target_flops": 0.45, "epochs": 4})
    result = run(job)
    result.after.flops.mean_ratio
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from manidp_cli.analysis.evaluation import Evaluation, evaluate, signature_dict
from manidp_cli.api.starts import Widths, narrow_as_stored, slim_statically
from manidp_cli.config import Recipe, explicit_settings, load_recipe, parse_yaml, validate_recipe
from manidp_cli.core.distributed import World, joined
from manidp_cli.core.features import stage_names
from manidp_cli.core.flops import FLOP_CONVENTION, CostTable, closed_gates_flops, count_flops, decided_flops
from manidp_cli.core.gating import GateSet, insert_gates, narrowed_by_cost
from manidp_cli.core.losses import ManiDPLoss
from manidp_cli.core.routing_init import fit_gates_to_responses
from manidp_cli.core.schedule import FeedbackThresholds, cost_weighted_scales
from manidp_cli.data import SPEC_FORMS, ImageData, LoaderSettings, load_data
from manidp_cli.errors import DataError, ManidpError, OutputError, RecipeError, TargetError, WeightsError
from manidp_cli.files import atomic_write_text, remove_stale_temporaries, run_folder_lock
from manidp_cli.inputs import capped, check_writable_folder, exists, is_file
from manidp_cli.io import CONFIG_FILE, MODEL_FILE, NARROWED, export_config, save_model, save_timm_config
from manidp_cli.models.factory import check_model_name, create_model
from manidp_cli.models.narrowing import narrowed_widths
from manidp_cli.models.start import HUB_START, RANDOM_START, START_FILE, StartFile
from manidp_cli.runtime.static_l1 import StaticCriterion, require_torch_pruning
from manidp_cli.training.checkpoint import load_checkpoint
from manidp_cli.training.engine import FitResult, StepInfo, fit
from manidp_cli.training.objectives import CrossEntropyObjective, Distilled, ManiDPObjective
from manidp_cli.training.precision import teacher_dtype

CHECKPOINT_FILE = "checkpoint.pt"
# of the checkpoint's "extra": the widths --resume rebuilds (state-dict key -> shape, of timm's architecture)
START_WIDTHS = "start_widths"  # the start's, before recipe.static_share's stage
WIDTHS = "widths"  # the trained network's
# the start's channels that each slimmed stage output keeps (stage-output distillation after a static stage)
KEPT_STAGE_CHANNELS = "kept_stage_channels"
Command = Literal["train", "prune"]  # which command a job runs


@dataclass(frozen=True)
class SlimmedStart:
    """A start narrower than its timm architecture (a statically pruned network): the widths that
    rebuild its export, and the architecture's dense FLOPs, of which its own are a share."""

    widths: dict[str, list[int]]
    architecture_flops: int


@dataclass
class Job:
    """A validated run, ready to start: nothing has been written yet."""

    command: Command
    model_name: str
    model: nn.Module
    data: ImageData
    recipe: Recipe
    out_dir: Path
    weights_source: str
    table: CostTable
    gates: GateSet | None
    resumed: dict[str, Any] | None  # the checkpoint being resumed, read once
    resumed_identity: tuple[int, int, int] | None = None  # that checkpoint file as it was read (see _check_unchanged)
    teacher: nn.Module | None = None  # the frozen dense start, when the recipe distils from it
    routing_fit: dict[str, float] | None = None  # gate name -> R^2 of gates.routing_init's fit (this run or resumed)
    slimmed_start: SlimmedStart | None = None
    start_widths: Widths = field(default_factory=dict)  # the start's, before a static stage (--resume rebuilds it)
    # per teacher stage, the channels a statically slimmed student's stage output keeps (None: all)
    kept_stage_channels: list[torch.Tensor] | None = None
    start_file: StartFile | None = None  # --weights as they were when the run began

    @property
    def resume(self) -> bool:
        return self.resumed is not None

    @property
    def static_flops_ratio(self) -> float | None:
        """recipe.static_share's slimmed network over the start, in FLOPs; None without the stage."""
        if self.command != "prune" or self.recipe.static_share == 0:
            return None
        if self.slimmed_start is None:  # the static cut removed nothing
            return 1.0
        return self.table.dense_flops / self.slimmed_start.architecture_flops

    @property
    def gate_target(self) -> float:
        """The gates' FLOPs target, of the network they gate: --target-flops is of the start, of
        which a static stage already removed a share."""
        if self.static_flops_ratio is None:
            return self.recipe.target_flops
        return self.recipe.target_flops / self.static_flops_ratio

    @property
    def gate_floor(self) -> float:
        """The gated network's FLOPs with every gate closed, over its dense FLOPs (its ungated
        convolutions, the rest of the network and the gates themselves)."""
        return closed_gates_flops(self.table) / self.table.dense_flops

    @property
    def gates_open(self) -> float:
        """The gated network's FLOPs with every gate open (its dense FLOPs and the gates' own), over
        its dense FLOPs."""
        return self.table.total_flops / self.table.dense_flops

    @property
    def gates_narrowed_by_cost(self) -> list[str]:
        """The gates whose hidden layer ``gates.max_cost`` narrowed (they would cost more than allowed)."""
        return narrowed_by_cost(self.gates, self.recipe.gates) if self.gates is not None else []

    @property
    def gated_share(self) -> float:
        """The share of the FLOPs the gates decide that gate_target leaves them (1: all open)."""
        return (self.gate_target - self.gate_floor) / (self.gates_open - self.gate_floor)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE


@dataclass
class RunResult:
    out_dir: Path
    interrupted: bool
    history: list[dict[str, float]]
    before: dict[str, Any] | None = None  # summary of the starting model (prune only)
    after: Evaluation | None = None
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)
    architecture_flops: int | None = None  # timm's full-width network's, when the trained one is narrower

    @property
    def flops_ratio_of_architecture(self) -> float | None:
        """The pruned network's mean FLOPs over timm's full-width architecture (a slimmed start's
        'dense' is itself); None when the network is at full width or not measured."""
        if self.architecture_flops is None or self.after is None or self.after.flops is None:
            return None
        return self.after.flops.mean_flops / self.architecture_flops

    def to_dict(self) -> dict[str, Any]:
        """``manidp train/prune --json``: where the run is, before and after, and each epoch's metrics."""
        after = None
        if self.after is not None:
            after = {**self.after.summary(), "signature": signature_dict(self.after.signature)}
            if self.flops_ratio_of_architecture is not None:
                after["flops_ratio_of_architecture"] = self.flops_ratio_of_architecture
        return {
            "out_dir": str(self.out_dir),
            "interrupted": self.interrupted,
            "seconds": self.seconds,
            "files": [str(f) for f in self.files],
            "before": self.before,
            "after": after,
            "history": self.history,
        }


def default_out_dir(command: Command, model_name: str) -> Path:
    return Path("runs") / f"{command}-{model_name}"


def prepare(
    command: Command,
    model_name: str | None,
    *,
    recipe_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    weights: Path | None = None,
    out_dir: Path | None = None,
    resume: bool = False,
) -> Job:
    """Validate the model, weights, data, recipe and target; build the model (gated for prune)."""
    overrides = dict(overrides or {})
    target = overrides.get("target_flops")
    if target is not None and not 0 < target < 1:
        raise TargetError(f"--target-flops must be between 0 and 1 (exclusive), got {target}")
    if resume:
        settings = _stored_run(command, model_name, recipe_path, overrides, weights, out_dir)
    else:
        settings = _new_run(command, model_name, recipe_path, overrides, weights, out_dir)
    recipe = settings.recipe
    if command == "prune" and recipe.static_share > 0:
        require_torch_pruning()  # before the data is read
    pretrained = command == "prune" and settings.weights is None and not resume
    if pretrained and recipe.data == "embedded" and overrides.get("data") != "embedded":
        raise DataError(
            f"{capped(settings.model_name)} starts from timm's pretrained weights, which the embedded "
            f"demo data (1,000 Fashion-MNIST images, 32 px, 1 channel) does not suit: give the data to "
            f"fine-tune on with --data ({SPEC_FORMS}), or --data embedded to use the demo data anyway"
        )
    # resolved now: a missing CUDA device is an error before the data is read, and pinned memory needs to know
    loader = LoaderSettings.for_device(recipe.workers, World.from_env(recipe.device).device)
    data = load_data(recipe.data, settings.model_name, image_size=recipe.img_size, loader=loader)
    start = _build_start(command, settings, data, pretrained)
    model = start.model
    gates = _insert_gates(model, recipe, data, resume) if command == "prune" else None
    table = count_flops(model, data.input_shape)
    job = Job(
        command,
        settings.model_name,
        model,
        data,
        recipe,
        settings.out_dir,
        settings.weights_source,
        table,
        gates,
        settings.resumed,
        settings.resumed_identity,
        start.teacher,
        slimmed_start=start.slimmed,
        start_widths=start.start_widths,
        kept_stage_channels=start.kept_stage_channels,
        # fingerprinted once the start has loaded from it (a missing or bad file has its own error)
        start_file=StartFile.of(settings.weights) if settings.weights is not None else settings.start_file,
    )
    if command == "prune":
        _check_gates_reach(job)
    return job


def _insert_gates(model: nn.Module, recipe: Recipe, data: ImageData, resume: bool) -> GateSet:
    """recipe.gates' gates on ``model`` (gates.init taylor measures on the calibration images); on
    --resume the checkpoint replaces their start, so they start constant."""
    policy = recipe.gates.with_constant_start() if resume else recipe.gates
    return insert_gates(model, policy, input_shape=data.input_shape, calibration=_calibration(recipe, data))


def _calibration(recipe: Recipe, data: ImageData):
    """The labelled calibration images (lazily), for importance measured on data."""
    return data.train.batches(recipe.eval_batch_size, limit=recipe.schedule.calibration_images)


# Below this share of the FLOPs they decide the gates cannot route, they starve: the default at 0.05
# of resnet18's FLOPs (0.3% left to its gates) fell to 21 +- 11% top-1 (docs/results.md, "Below 0.15
# of the FLOPs"). `prune` refuses a target that leaves them less.
MIN_GATED_SHARE = 0.02
# Below this share the default trails static pruning (resnet34 at 0.05, 2.3% left: -1.0 point with
# the fixed calibration, -2.2 before; resnet18 at 0.08, 3.5%: -0.9 to -1.0; level at 0.15, 10.8%),
# and recipes/hybrid.yaml does not. The CLI's plan warns of a target that leaves them less.
LOW_GATED_SHARE = 0.10


def _check_gates_reach(job: Job) -> None:
    """A target the gates can meet only by switching off (nearly) every channel they decide is refused,
    with the least target they can meet and the way to cut further."""
    if job.gated_share >= MIN_GATED_SHARE:
        return
    of_start = job.static_flops_ratio or 1.0  # --target-flops is of the start, before a static stage
    floor = job.gate_floor * of_start
    least = (job.gate_floor + MIN_GATED_SHARE * (job.gates_open - job.gate_floor)) * of_start
    size = "x".join(map(str, job.data.input_shape[1:]))
    share = job.recipe.static_share
    static = (
        f"a larger static_share (now {share})"
        if share > 0
        else "part of the cut made statically first (recipes/hybrid.yaml, static_share; pip install 'manidp[bench]')"
    )
    raise TargetError(
        f"--target-flops {job.recipe.target_flops} leaves the gates {max(job.gated_share, 0):.1%} of the FLOPs "
        f"they decide (at least {MIN_GATED_SHARE:.0%} needed): with every gated channel off, "
        f"{capped(job.model_name)} at {size} px still costs {floor:.3f} of its FLOPs (its ungated layers and "
        f"the gates); give --target-flops {math.ceil(least * 1000) / 1000:.3f} or more, or {static}"
    )


@dataclass
class _Start:
    """The network a job trains, before gating, and what it was built from."""

    model: nn.Module
    teacher: nn.Module | None
    slimmed: SlimmedStart | None  # narrower than timm's architecture (a slimmed --weights, a static stage)
    start_widths: Widths  # of the start, before any static stage (empty: full width)
    kept_stage_channels: list[torch.Tensor] | None  # after a static stage, for stage-output distillation


def _build_start(command: Command, settings: _RunSettings, data: ImageData, pretrained: bool) -> _Start:
    """The start (timm's weights, --weights, or on --resume the stored widths, which the checkpoint's
    weights then fill), its teacher, and recipe.static_share's static stage."""
    recipe = settings.recipe
    stored = settings.resumed["extra"] if settings.resumed is not None else {}
    static = command == "prune" and recipe.static_share > 0
    # timm's architecture, to tell a slimmed network from it; built before the seed, which the
    # model, its classifier and its gates start from
    kwargs = {"num_classes": data.num_classes, "in_chans": data.in_chans}
    narrower = settings.weights is not None or static or bool(stored.get(START_WIDTHS))
    full_width = create_model(settings.model_name, **kwargs) if narrower else None
    torch.manual_seed(recipe.seed)  # the classifier, gates and any fresh weights start from the seed
    model = create_model(settings.model_name, **kwargs, weights=settings.weights, pretrained=pretrained)
    narrow_as_stored(model, stored.get(START_WIDTHS), "the checkpoint")
    start_widths = narrowed_widths(model, full_width) if full_width is not None else {}
    # before the static stage: a slimmed network distils from the start it was cut from
    distils = command == "prune" and recipe.loss.distils()
    teacher = _teacher(model, settings.model_name, data, recipe) if distils else None
    # a slimmed stage output keeps some of its full-width teacher's channels: distillation compares those
    if static and settings.resumed is None:
        stages = stage_names(model) if recipe.loss.feature_distill_weight > 0 else None
        criterion = StaticCriterion.measure(recipe.static_criterion, model, _calibration(recipe, data))
        kept = slim_statically(
            model, full_width, recipe.target_flops, recipe.static_share, data.input_shape, stages, criterion
        )
    else:
        kept = _stored_channels(stored.get(KEPT_STAGE_CHANNELS))
    narrow_as_stored(model, stored.get(WIDTHS), "the checkpoint")  # on --resume
    slimmed = _slimmed_start(model, full_width, data.input_shape) if full_width is not None else None
    return _Start(model, teacher, slimmed, start_widths, kept)


def _stored_channels(stored: list[list[int]] | None) -> list[torch.Tensor] | None:
    return [torch.tensor(channels, dtype=torch.long) for channels in stored] if stored else None


def _teacher(model: nn.Module, model_name: str, data: ImageData, recipe: Recipe) -> nn.Module:
    """The frozen teacher of distillation: the start itself, or loss.teacher_weights (built with
    the random state set aside, so that the student's gates start the same either way)."""
    path = recipe.loss.teacher_weights
    if path is None:
        return copy.deepcopy(model).eval()
    with torch.random.fork_rng(devices=[]):
        try:
            teacher = create_model(model_name, num_classes=data.num_classes, in_chans=data.in_chans, weights=Path(path))
        except WeightsError as exc:
            raise WeightsError(f"loss.teacher_weights: {exc}") from exc
    other_widths = narrowed_widths(model, teacher) or narrowed_widths(teacher, model)
    if recipe.loss.feature_distill_weight > 0 and other_widths:
        raise RecipeError(
            "loss.feature_distill_weight compares the stage outputs channel by channel: its teacher "
            f"({capped(path)}) must have the start's widths; distil the logits alone (feature_distill_weight: 0)"
        )
    return teacher.eval()


def _slimmed_start(model: nn.Module, full_width: nn.Module, input_shape: tuple[int, int, int]) -> SlimmedStart | None:
    widths = narrowed_widths(model, full_width)
    return SlimmedStart(widths, count_flops(full_width, input_shape).dense_flops) if widths else None


@dataclass
class _RunSettings:
    """What ``prepare`` builds a job from: given on the command line, or stored in a checkpoint."""

    recipe: Recipe
    model_name: str
    out_dir: Path
    weights: Path | None
    weights_source: str
    resumed: dict[str, Any] | None = None
    resumed_identity: tuple[int, int, int] | None = None
    start_file: StartFile | None = None


def _new_run(command: Command, model_name, recipe_path, overrides, weights, out_dir) -> _RunSettings:
    if model_name is None:
        raise ManidpError("give a MODEL name (e.g. resnet18), or --resume --out DIR to continue a run")
    check_model_name(model_name)
    recipe = load_recipe(recipe_path, overrides)
    out_dir = check_writable_folder(out_dir or default_out_dir(command, model_name))
    _refuse_existing_run(out_dir)
    weights_source = str(weights) if weights else (HUB_START if command == "prune" else RANDOM_START)
    return _RunSettings(recipe, model_name, out_dir, weights, weights_source)


# how a run reads its images, not what it computes: a resumed run may change them (another machine)
_FREE_ON_RESUME = ("workers",)


def _stored_run(command: Command, model_name, recipe_path, overrides, weights, out_dir) -> _RunSettings:
    """The run in ``out_dir`` as its checkpoint stores it; given settings must match it."""
    if out_dir is None:
        if model_name is None:
            raise ManidpError("--resume needs --out DIR (or the MODEL of a run in runs/<command>-<MODEL>)")
        out_dir = default_out_dir(command, model_name)
    checkpoint = Path(out_dir).expanduser() / CHECKPOINT_FILE
    if not is_file(checkpoint, "--out"):
        raise ManidpError(f"nothing to resume: no {CHECKPOINT_FILE} in {out_dir}")
    out_dir = check_writable_folder(out_dir)  # the run goes on writing there
    identity = _file_identity(checkpoint)
    resumed = load_checkpoint(checkpoint)
    extra = resumed["extra"]
    if extra["kind"] != command:
        raise ManidpError(f"{checkpoint} belongs to a `manidp {capped(extra['kind'])}` run, not `{command}`")
    source = f"the recipe stored in {checkpoint}"
    recipe = validate_recipe(parse_yaml(extra["recipe"], source), source)
    conflicts = _resume_conflicts(extra, recipe, model_name, recipe_path, overrides, weights)
    if conflicts:
        raise ManidpError(
            f"--resume continues the run in {out_dir} with the settings it started with, but these differ: "
            f"{'; '.join(conflicts)}. Leave them out, or start a new run with another --out"
        )
    given = explicit_settings(recipe_path, overrides)
    changed = {key: given[key] for key in _FREE_ON_RESUME if key in given}
    if changed:
        recipe = validate_recipe({**recipe.model_dump(mode="json"), **changed}, "settings")
    start_file = StartFile.from_dict(extra.get(START_FILE))
    return _RunSettings(recipe, extra["model"], out_dir, None, extra["weights"], resumed, identity, start_file)


# recipe keys that have a flag, named as the flag in messages
_FLAGS = {
    "epochs": "--epochs",
    "target_flops": "--target-flops",
    "optimizer.lr": "--lr",
    "data": "--data",
    "img_size": "--img-size",
    "workers": "--workers",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "device": "--device",
    "amp": "--amp",
    "channels_last": "--channels-last",
}


def _resume_conflicts(extra, recipe: Recipe, model_name, recipe_path, overrides, weights) -> list[str]:
    """Settings given with --resume that differ from the stored run (they used to be ignored silently)."""
    conflicts = []
    if model_name is not None and model_name != extra["model"]:
        conflicts.append(f"MODEL (run: {extra['model']}, given: {capped(model_name)})")
    if weights is not None:
        conflicts.append(f"--weights (the run started from {capped(extra['weights'])})")
    given = explicit_settings(recipe_path, overrides)
    if not given:
        return conflicts
    wanted = load_recipe(recipe_path, overrides).model_dump(mode="json")  # validated and normalised
    stored = recipe.model_dump(mode="json")
    for key in _setting_keys(given):
        if key in _FREE_ON_RESUME:
            continue
        mine, theirs = _setting(stored, key), _setting(wanted, key)
        if mine != theirs:
            conflicts.append(f"{_FLAGS.get(key, key)} (run: {capped(mine)}, given: {capped(theirs)})")
    return conflicts


def _setting_keys(settings: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        keys += _setting_keys(value, name + ".") if isinstance(value, dict) else [name]
    return keys


def _setting(settings: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        settings = settings.get(part) if isinstance(settings, dict) else None
    return settings


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _check_unchanged(job: Job) -> None:
    """Under the folder's lock, what ``prepare`` found must still hold: another run may have
    written the folder between the two (prepare reads without a lock)."""
    if job.resume and _file_identity(job.checkpoint) != job.resumed_identity:
        raise ManidpError(
            f"{job.checkpoint} changed after it was read (another run used {job.out_dir}); run --resume again"
        )
    if not job.resume:
        _refuse_existing_run(job.out_dir)


def _refuse_existing_run(out_dir: Path) -> None:
    """A new run never writes over another run's checkpoint or export."""
    if exists(out_dir / CHECKPOINT_FILE, "--out") or exists(out_dir / MODEL_FILE, "--out"):
        raise ManidpError(f"{out_dir} already holds a run: pass --resume to continue it, or another --out")


@contextlib.contextmanager
def _out_dir_held(job: Job, world: World):
    """The output folder, locked by the main process for the whole run; every process learns
    whether that worked, so none is left waiting for a partner that gave up."""
    with contextlib.ExitStack() as stack:
        problem = None
        if world.is_main:
            try:
                stack.enter_context(run_folder_lock(job.out_dir))
                _check_unchanged(job)
                remove_stale_temporaries(job.out_dir)
            except ManidpError as exc:
                problem = exc
        problems = world.all_gather_object(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if problems[0] is not None:
            raise ManidpError(problems[0])
        yield


def _objective(job: Job, world: World):
    if job.command == "train":
        return CrossEntropyObjective()
    recipe = job.recipe
    shard = (world.rank, world.size)
    calibration = [
        x.to(world.device)
        for x, _ in job.data.train.batches(
            recipe.eval_batch_size, limit=recipe.schedule.calibration_images, shard=shard
        )
    ]
    _start_routing(job, world, calibration)
    schedule = recipe.schedule
    layer_scales = cost_weighted_scales(decided_flops(job.table), schedule.allocation)
    feedback = None
    if schedule.mode == "feedback":
        steps = recipe.epochs * job.data.train.num_batches(recipe.batch_size, recipe.train_images, shard)
        feedback = FeedbackThresholds(
            job.gate_target,
            round(schedule.ramp * steps),
            schedule.feedback_every,
            schedule.feedback_smoothing,
            layer_scales,
        )
    objective = ManiDPObjective(
        job.gates,
        job.table,
        ManiDPLoss(**recipe.loss.manidp_terms()),
        target=job.gate_target,
        epochs=recipe.epochs,
        hold_epochs=recipe.schedule.hold_epochs,
        # L_bar of the start, estimated on as many training images as calibration uses: a pass over
        # a whole epoch's images cost 12% of a full Fashion-MNIST epoch of `manidp prune` (2 threads)
        training_batches=lambda: job.data.train.batches(
            recipe.eval_batch_size, limit=_mean_loss_images(recipe), shard=shard
        ),
        calibration_batches=calibration,
        search_steps=recipe.schedule.search_steps,
        codebook=recipe.codebook,
        world=world,
        feedback=feedback,
        layer_scales=layer_scales,
        narrow=recipe.narrow_training,
    )
    if recipe.loss.distils():
        teacher = job.teacher.to(world.device)
        loss = recipe.loss
        return Distilled(
            objective,
            teacher,
            loss.distill_weight,
            loss.distill_temperature,
            loss.distill_where,
            feature_weight=loss.feature_distill_weight,
            decay=loss.distill_decay,
            teacher_stage_channels=job.kept_stage_channels,
            teacher_dtype=teacher_dtype(loss.teacher_dtype, world.device),
        )
    return objective


def _start_routing(job: Job, world: World, calibration: list[torch.Tensor]) -> None:
    """gates.routing_init: fit the gates' per-image part before the first step (not on resume: the
    checkpoint holds the fitted and trained gates). Ranks fit on their own shards and average."""
    if job.resumed is not None:
        job.routing_fit = job.resumed["extra"].get("routing_fit")
        return
    if job.recipe.gates.routing_init <= 0:
        return
    fitted = fit_gates_to_responses(job.model, calibration, job.recipe.gates.routing_init)
    if world.distributed:
        for gate in job.gates.values():
            for weight in (gate.fc1.weight, gate.fc2.weight):
                with torch.no_grad():
                    weight.copy_(world.all_reduce_sum(weight).to(weight) / world.size)
    job.routing_fit = fitted.explained_variance


def _mean_loss_images(recipe: Recipe) -> int:
    calibration = recipe.schedule.calibration_images
    return calibration if recipe.train_images is None else min(calibration, recipe.train_images)


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _metadata(job: Job, after: Evaluation, before: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "kind": "pruned" if job.command == "prune" else "dense",
        "model": job.model_name,
        "model_kwargs": {"num_classes": job.data.num_classes, "in_chans": job.data.in_chans},
        "input_shape": list(job.data.input_shape),
        "data": {"spec": job.data.spec, "description": job.data.description, "classes": job.data.classes},
        "recipe": job.recipe.model_dump(mode="json"),
        "weights_source": job.weights_source,
        **({START_FILE: job.start_file.to_dict()} if job.start_file is not None else {}),
        "accuracy": after.summary(),
        "flops_convention": FLOP_CONVENTION,
        "dense_flops": job.table.dense_flops,
    }
    if before is not None:
        meta["baseline"] = before
    if job.slimmed_start is not None:
        meta[NARROWED] = job.slimmed_start.widths
        meta["architecture_dense_flops"] = job.slimmed_start.architecture_flops
    if job.command == "prune":
        meta["gate_policy"] = job.recipe.gates.model_dump(mode="json")
        meta["gated_layers"] = sorted(job.gates.by_name())
        if job.routing_fit is not None:
            meta["routing_fit_r2"] = job.routing_fit
        stats = after.flops
        meta["signature"] = signature_dict(after.signature)
        meta["flops"] = {
            "target": job.recipe.target_flops,
            "dense": stats.dense_flops,
            "gates": stats.gate_flops,
            "mean": stats.mean_flops,
            "mean_ratio": stats.mean_ratio,
            "images": len(stats.per_image),
        }
        if job.slimmed_start is not None:  # mean_ratio is of the slimmed start; this, of timm's architecture
            meta["flops"]["mean_ratio_of_architecture"] = stats.mean_flops / job.slimmed_start.architecture_flops
        if job.static_flops_ratio is not None:  # recipe.static_share's share of the start's FLOPs
            meta["flops"]["static_ratio"] = job.static_flops_ratio
    return meta


def _report(job: Job, after: Evaluation) -> dict[str, Any]:
    report = {"convention": FLOP_CONVENTION, "model": job.model_name, "cost_table": job.table.to_dict()}
    if after.flops is not None:
        report["measured"] = after.flops.to_dict()
        report["per_image_loss"] = after.per_image_loss
    return report


def run(
    job: Job,
    on_step: Callable[[StepInfo], bool | None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> RunResult:
    """Train or prune; write checkpoints during and the export at the end into ``job.out_dir``.

    Under torchrun every process calls this; rank 0 alone writes, all ranks return the same result.
    """
    world = World.from_env(job.recipe.device)
    created = world.is_main and not job.out_dir.exists()
    try:
        with joined(world), _out_dir_held(job, world), _unstarted_files_removed(job, world):
            try:
                return _run(job, world, on_step, on_epoch)
            except OutputError as exc:  # a full disk: the last checkpoint is intact, nothing is lost
                if not job.checkpoint.is_file():
                    raise
                raise OutputError(f"{exc}; once there is room, continue with --resume --out {job.out_dir}") from exc
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                job.out_dir.rmdir()  # only if empty: the folder this run made and left nothing in
        raise


@contextlib.contextmanager
def _unstarted_files_removed(job: Job, world: World):
    """A new run that fails before its first checkpoint (bad image, diverged loss, second Ctrl-C)
    has nothing to resume: remove what it wrote, so a failed run leaves nothing behind. Runs
    inside the folder's lock, so the files are this run's own."""
    try:
        yield
    except BaseException:
        if world.is_main and not job.resume and not job.checkpoint.exists():
            for name in ("recipe.yaml", "metrics.jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    (job.out_dir / name).unlink()
        raise


def _baseline(job: Job, world: World) -> dict[str, Any] | None:
    """The "before" row of a prune: the starting model evaluated with its gates open."""
    if job.resumed is not None:
        return job.resumed["extra"].get("baseline")
    if job.command != "prune":
        return None
    return evaluate(job.model, job.data.eval, job.recipe.eval_batch_size, table=job.table, world=world).summary()


class _EpochLog:
    """metrics.jsonl, rewritten whole after every epoch (rank 0), and the caller's ``on_epoch``."""

    def __init__(self, job: Job, world: World, on_epoch: Callable[[dict[str, float]], None] | None):
        self.path = job.out_dir / "metrics.jsonl"
        self.world = world
        self.on_epoch = on_epoch
        self.history: list[dict[str, float]] = list(job.resumed["history"]) if job.resumed is not None else []

    def __call__(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        if self.world.is_main:
            atomic_write_text(self.path, "\n".join(json.dumps(m) for m in self.history) + "\n")
            if self.on_epoch is not None:
                self.on_epoch(metrics)


def _fit(job: Job, world: World, before: dict[str, Any] | None, on_step, on_epoch) -> FitResult:
    recipe = job.recipe
    table = job.table if job.command == "prune" else None

    def evaluate_epoch(model: nn.Module) -> dict[str, float]:
        result = evaluate(model, job.data.eval, recipe.eval_batch_size, table=table, world=world)
        return {f"eval_{k}": v for k, v in result.summary().items() if k != "images"}

    return fit(
        job.model,
        job.data,
        _objective(job, world),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        optimizer_config=recipe.optimizer,
        seed=recipe.seed,
        train_limit=recipe.train_images,
        checkpoint_path=job.checkpoint,
        resume_state=job.resumed,
        extra_state={
            "kind": job.command,
            "recipe": recipe.to_yaml(),
            "model": job.model_name,
            "weights": job.weights_source,
            START_FILE: job.start_file.to_dict() if job.start_file is not None else None,
            "baseline": before,
            "routing_fit": job.routing_fit,
            START_WIDTHS: job.start_widths,
            WIDTHS: job.slimmed_start.widths if job.slimmed_start is not None else {},
            KEPT_STAGE_CHANNELS: [c.tolist() for c in job.kept_stage_channels or []],
        },
        on_step=on_step if world.is_main else None,
        on_epoch=_EpochLog(job, world, on_epoch),
        evaluate_epoch=evaluate_epoch,
        world=world,
        amp=recipe.amp,
        channels_last=recipe.channels_last,
    )


def _export(job: Job, world: World, fitted: FitResult, before: dict[str, Any] | None) -> tuple[Evaluation, list[Path]]:
    """Check that every rank holds the same state, measure the result, write the export."""
    digests = world.all_gather_object(_state_digest(job.model))
    if len(set(digests)) != 1:
        raise ManidpError(f"the {world.size} processes ended with different weights or thresholds: {digests}")
    table = job.table if job.command == "prune" else None
    after = evaluate(
        job.model,
        job.data.eval,
        job.recipe.eval_batch_size,
        table=table,
        signature_batches=4 if table else 0,
        world=world,
    )
    files = [job.out_dir / name for name in (MODEL_FILE, CONFIG_FILE, "recipe.yaml", "metrics.jsonl", "report.json")]
    if world.is_main:
        metadata = {
            **_metadata(job, after, before),
            "history": fitted.history,
            "setup": fitted.setup_metrics,
            "world_size": world.size,
            "state_sha256": digests[0],
        }
        save_model(job.out_dir / MODEL_FILE, job.model, metadata)
        config = export_config(job.model, metadata, job.data.data_config, job.data.classes)
        save_timm_config(job.out_dir, config)
        atomic_write_text(job.out_dir / "report.json", json.dumps(_report(job, after), indent=1))
    world.barrier()
    return after, files


def _run(job: Job, world: World, on_step, on_epoch) -> RunResult:
    started = time.perf_counter()
    job.model.to(world.device)
    before = _baseline(job, world)
    if world.is_main:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.out_dir / "recipe.yaml", job.recipe.to_yaml())
    fitted = _fit(job, world, before, on_step, on_epoch)
    if fitted.interrupted:
        return RunResult(
            job.out_dir, True, fitted.history, before, None, time.perf_counter() - started, [job.checkpoint]
        )
    after, files = _export(job, world, fitted, before)
    architecture = job.slimmed_start.architecture_flops if job.slimmed_start is not None else None
    seconds = time.perf_counter() - started
    return RunResult(job.out_dir, False, fitted.history, before, after, seconds, files, architecture)
