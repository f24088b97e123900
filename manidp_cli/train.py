"""The training engine: epochs, optimiser, cosine learning rate, checkpoints and resume.

It knows no pruning formula. An *objective* computes the loss of a batch and does whatever it needs
around epochs (ManiDP: L_bar, saliency statistics, thresholds); the engine calls it.

Interruption: SIGINT (Ctrl-C) or an ``on_step`` callback returning True stops after the current
step; the engine then writes a checkpoint and returns ``interrupted=True``. Checkpoints are written
atomically at every epoch end; ``resume_state`` (a loaded checkpoint) continues to the same final weights as an
uninterrupted run (data order and augmentation are a function of (seed, epoch), the model's RNG
state is saved).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch
from torch import nn

from manidp_cli.data import ImageData
from manidp_cli.distributed import World
from manidp_cli.errors import ManidpError, TrainingError
from manidp_cli.gating import GATE_PREFIX
from manidp_cli.inputs import capped, exception_text
from manidp_cli.recipe import OptimizerConfig

CHECKPOINT_FORMAT = 2


class Objective(Protocol):
    """What the engine asks of a training method."""

    def setup(self, model: nn.Module) -> dict[str, float]:
        """Once before epoch 0 (not on resume); returns metrics to record."""

    def epoch_context(self, model: nn.Module) -> ContextManager: ...

    def step(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one batch; return logits and named terms including a differentiable ``loss``."""

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepInfo:
    epoch: int
    epochs: int
    step: int
    steps: int
    lr: float
    terms: dict[str, float]
    running_accuracy: float


@dataclass
class FitResult:
    history: list[dict[str, float]]
    interrupted: bool
    checkpoint: Path | None
    setup_metrics: dict[str, float] = field(default_factory=dict)


def cosine_lr(step: int, total: int, lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration cosine decay from ``lr`` at step 0 towards ``min_lr`` at ``total``."""
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on the network, ``gate_weight_decay`` on gates."""
    network, gates = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (gates if name.startswith(GATE_PREFIX + ".") else network).append(param)
    groups = [{"params": network, "weight_decay": config.weight_decay}]
    if gates:
        groups.append({"params": gates, "weight_decay": config.gate_weight_decay})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through files.atomic_write: a full disk leaves the previous checkpoint as it was
    and no temporary file behind."""
    from manidp_cli.files import atomic_write

    atomic_write(path, lambda handle: torch.save(obj, handle))


CHECKPOINT_KEYS = ("epoch", "step", "global_step", "model", "optimizer", "per_rank", "history", "extra")
RUN_KEYS = ("kind", "recipe", "model", "weights")  # of the checkpoint's "extra": what --resume rebuilds from


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` and checked to be complete and finite."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a zero-byte or truncated file raises EOFError with no message
        raise ManidpError(f"cannot read checkpoint {capped(path)}: {exception_text(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ManidpError(f"{capped(path)} is not a manidp checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    extra = state.get("extra")
    if not missing and isinstance(extra, dict):
        missing = [f"extra.{key}" for key in RUN_KEYS if not isinstance(extra.get(key), str)]
    if missing or not isinstance(state["model"], dict):
        raise ManidpError(f"{capped(path)} is an incomplete manidp checkpoint (missing {', '.join(missing) or 'model'})")
    broken = non_finite_tensors(state["model"])
    if broken:
        raise ManidpError(f"{capped(path)} holds non-finite weights ({capped(broken[0])}); it cannot be resumed")
    return state


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating tensors holding NaN, or infinity anywhere but in a gate threshold (where
    -inf means "keep every channel")."""
    broken = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        threshold = name.startswith(GATE_PREFIX + ".") and name.endswith("threshold")
        if bool(torch.isnan(value).any()) if threshold else not bool(torch.isfinite(value).all()):
            broken.append(name)
    return broken


def _diverged(what: str, lr: float, checkpoint: Path | None) -> TrainingError:
    if checkpoint is not None and checkpoint.is_file():
        kept = f"the last good checkpoint {checkpoint} is kept (it holds the state before this)"
    else:
        kept = "no checkpoint had been written"
    return TrainingError(
        f"training stopped: {what} (learning rate {lr:.3g}). The learning rate is too high (--lr, "
        f"optimizer.lr) or the starting weights are broken; nothing of the broken state was saved, {kept}"
    )


def _check_loss(loss: torch.Tensor, world: World, where: str, lr: float, checkpoint: Path | None) -> None:
    """Stop on a NaN or infinite loss (on any rank: every rank stops together)."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if world.distributed:
        bad = bool(world.all_reduce_sum(torch.tensor([float(bad)]))[0] > 0)
    if bad:
        value = float(loss.detach())
        what = f"the loss is {value}" if not math.isfinite(value) else "the loss of another process is not finite"
        raise _diverged(f"{what} at {where}", lr, checkpoint)


def _check_weights(model: nn.Module, where: str, lr: float, checkpoint: Path | None) -> None:
    """Refuse to checkpoint non-finite weights (ranks hold identical weights, so all agree)."""
    broken = non_finite_tensors(model.state_dict())
    if broken:
        raise _diverged(f"the weights became non-finite ({broken[0]}, {len(broken)} tensors) by {where}", lr, checkpoint)


@contextlib.contextmanager
def _stop_on_sigint(flag: dict):
    """First Ctrl-C asks for a clean stop after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _per_rank(world: World, local: dict[str, Any]) -> list[dict[str, Any]]:
    return world.all_gather_object(local)


def fit(
    model: nn.Module,
    data: ImageData,
    objective: Objective,
    *,
    epochs: int,
    batch_size: int,
    optimizer_config: OptimizerConfig,
    seed: int = 0,
    train_limit: int | None = None,
    checkpoint_path: Path | None = None,
    resume_state: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    on_step: Callable[[StepInfo], bool | None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    evaluate_epoch: Callable[[nn.Module], dict[str, float]] | None = None,
    world: World = World(),
    amp: bool = False,
    channels_last: bool = False,
) -> FitResult:
    """Train ``model`` with ``objective`` for ``epochs``; see the module docstring for interruption.

    Under torchrun (``world.size`` > 1) the model is wrapped in DistributedDataParallel, each rank
    takes its share of every epoch's images (``batch_size`` per rank), and only rank 0 writes.
    """
    device = world.device
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, optimizer_config)
    shard = (world.rank, world.size)
    steps_per_epoch = data.train.num_batches(batch_size, train_limit, shard)
    total_steps = epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    start_epoch, start_step, global_step = 0, 0, 0
    running = {"seen": 0, "correct": 0, "sums": {}}
    setup_metrics: dict[str, float] = {}
    if resume_state is not None:
        state = resume_state
        ranks = state["per_rank"]
        if len(ranks) != world.size:
            raise ManidpError(f"{checkpoint_path} was written by {len(ranks)} processes; resume it with as many, not {world.size}")
        mine = ranks[world.rank]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(mine["objective"])
        torch.set_rng_state(mine["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        history = list(state["history"])
        running = mine["running"]
        setup_metrics = dict(state.get("setup", {}))
    else:
        torch.manual_seed(seed + world.rank)
        setup_metrics = objective.setup(model)
    trained = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(epoch: int, step: int) -> None:
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"  # epoch: the next one, 0-based
        _check_weights(model, where, lr, checkpoint_path)
        ranks = _per_rank(world, {"rng": torch.get_rng_state(), "objective": objective.state_dict(), "running": running})
        if checkpoint_path is None or not world.is_main:
            world.barrier()
            return
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "per_rank": ranks,
                "history": history,
                "setup": setup_metrics,
                "extra": extra_state or {},
            },
            checkpoint_path,
        )
        world.barrier()

    def any_rank_stops(stop: bool) -> bool:
        if not world.distributed:
            return stop
        return bool(world.all_reduce_sum(torch.tensor([float(stop)]))[0] > 0)

    flag = {"stop": False}
    lr = optimizer_config.lr
    autocast_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    with _stop_on_sigint(flag):
        for epoch in range(start_epoch, epochs):
            model.train()
            skip = start_step if epoch == start_epoch else 0
            batches = data.train.batches(
                batch_size, shuffle=True, augment=True, seed=seed, epoch=epoch, skip=skip, limit=train_limit, shard=shard
            )
            with objective.epoch_context(model):
                for step, (images, targets) in enumerate(batches, start=skip):
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    lr = cosine_lr(global_step, total_steps, optimizer_config.lr, optimizer_config.min_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=amp):
                        logits, terms = objective.step(trained, images, targets)
                    _check_loss(terms["loss"], world, f"epoch {epoch + 1}, step {step + 1}", lr, checkpoint_path)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    optimizer.step()
                    global_step += 1
                    running["seen"] += images.shape[0]
                    running["correct"] += int((logits.detach().argmax(1) == targets).sum())
                    scalars = {k: float(v.detach()) for k, v in terms.items() if v.dim() == 0}
                    for key, value in scalars.items():
                        running["sums"][key] = running["sums"].get(key, 0.0) + value * images.shape[0]
                    info = StepInfo(epoch, epochs, step + 1, steps_per_epoch, lr, scalars, running["correct"] / running["seen"])
                    if on_step is not None and on_step(info):
                        flag["stop"] = True
                    if any_rank_stops(flag["stop"]):
                        flag["stop"] = True
                        done = step + 1
                        if done == steps_per_epoch:
                            break  # finish the epoch normally, then stop
                        save(epoch, done)
                        return FitResult(history, True, checkpoint_path, setup_metrics)
            totals = world.all_reduce_sum(
                torch.tensor([running["seen"], running["correct"]] + [running["sums"][k] for k in sorted(running["sums"])], dtype=torch.float64)
            ).tolist()
            seen = max(totals[0], 1)
            metrics = {"epoch": epoch, "lr": lr}
            metrics.update({f"train_{k}": v / seen for k, v in zip(sorted(running["sums"]), totals[2:])})
            metrics["train_top1"] = totals[1] / seen
            world.broadcast_buffers(model)
            metrics.update(objective.end_epoch(model, epoch))
            if evaluate_epoch is not None:
                metrics.update(evaluate_epoch(model))
            history.append(metrics)
            running = {"seen": 0, "correct": 0, "sums": {}}
            save(epoch + 1, 0)
            if on_epoch is not None:
                on_epoch(metrics)
            if flag["stop"] and epoch + 1 < epochs:
                return FitResult(history, True, checkpoint_path, setup_metrics)
    return FitResult(history, False, checkpoint_path, setup_metrics)
