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

from manidp_cli.config import OptimizerConfig
from manidp_cli.core.distributed import World
from manidp_cli.core.gating import is_gate_key
from manidp_cli.core.state import non_finite_tensors
from manidp_cli.data import ImageData
from manidp_cli.errors import ManidpError, TrainingError
from manidp_cli.training.checkpoint import Checkpointer


class Objective(Protocol):
    """What the engine asks of a training method."""

    def setup(self, model: nn.Module) -> dict[str, float]:
        """Once before epoch 0 (not on resume); returns metrics to record."""

    def epoch_context(self, model: nn.Module) -> ContextManager: ...

    def set_progress(self, fraction: float) -> None:
        """Before each step: the share of the run's steps already taken (0 to 1)."""

    def step(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one batch; return logits and named terms including a differentiable ``loss``."""

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def shared_state_dict(self) -> dict[str, Any]:
        """State that every process holds alike (a teacher): checkpointed once, not per process."""

    def load_shared_state_dict(self, state: dict[str, Any]) -> None: ...


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


def scheduled_lr(step: int, total: int, peak: float, min_lr: float = 0.0, warmup: int = 0) -> float:
    """Linear warm-up from peak / warmup to ``peak`` over the first ``warmup`` steps, then the cosine
    from ``peak`` to ``min_lr`` over the remaining ones."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine_lr(step - warmup, total - warmup, peak, min_lr)


def peak_lr(config: OptimizerConfig, batch_size: int, world_size: int) -> float:
    """``config.lr`` scaled linearly from the global batch it is meant for (``lr_batch``) to the real
    one, batch_size x processes (Goyal et al., 2017); without ``lr_batch``, ``lr`` as it is."""
    if config.lr_batch is None:
        return config.lr
    return config.lr * batch_size * world_size / config.lr_batch


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has it (every CPU, Ampere and later GPUs), fp16 elsewhere."""
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.SGD | GateAdam:
    """SGD with Nesterov momentum; weight decay on the network, ``gate_weight_decay`` on gates. With
    ``gate_optimizer: adam`` the gates get an Adam of their own (``GateAdam``)."""
    network, gates = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (gates if is_gate_key(name) else network).append(param)
    groups = [{"params": network, "weight_decay": config.weight_decay, "lr_scale": 1.0}]
    gate_group = {"params": gates, "weight_decay": config.gate_weight_decay, "lr_scale": config.gate_lr_scale}
    if gates and config.gate_optimizer == "sgd":
        groups.append(gate_group)
    nesterov = config.nesterov and config.momentum > 0
    sgd = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov)
    if not gates or config.gate_optimizer == "sgd":
        return sgd
    return GateAdam(sgd, torch.optim.Adam([gate_group], lr=config.lr))


class GateAdam:
    """The network's SGD and the gates' Adam stepped as one optimizer (one ``param_groups`` list for the
    learning-rate schedule, one state dict for checkpoints). Adam's step is about its learning rate
    whatever the gradient's size: on depthwise networks the early gates' saliencies get gradients so
    large that SGD's steps grow them to the cap within 20 steps and training diverges (docs/results.md)."""

    def __init__(self, network: torch.optim.SGD, gates: torch.optim.Adam):
        self.network, self.gates = network, gates

    @property
    def param_groups(self) -> list[dict]:
        return self.network.param_groups + self.gates.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.network.zero_grad(set_to_none=set_to_none)
        self.gates.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        self.network.step()
        self.gates.step()

    def state_dict(self) -> dict:
        return {"network": self.network.state_dict(), "gates": self.gates.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.network.load_state_dict(state_dict["network"])
        self.gates.load_state_dict(state_dict["gates"])


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
        raise _diverged(
            f"the weights became non-finite ({broken[0]}, {len(broken)} tensors) by {where}", lr, checkpoint
        )


class StopRequest:
    """Set by the first Ctrl-C or by an ``on_step`` callback: stop cleanly after the current step."""

    def __init__(self):
        self.requested = False


@contextlib.contextmanager
def _stop_on_sigint(stop: StopRequest):
    """First Ctrl-C asks for a clean stop after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _new_running() -> dict[str, Any]:
    """Per-epoch sums on this rank (a plain dict: it is stored in checkpoints as it is)."""
    return {"seen": 0, "correct": 0, "sums": {}}


@dataclass
class _Position:
    """Where training stands: the epoch and step to run next, and steps done over all epochs."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


class _Trainer:
    """One run of ``fit``: its state and the named steps the loop is made of."""

    def __init__(self, model: nn.Module, data: ImageData, objective: Objective, settings: dict[str, Any], world: World):
        self.model = model
        self.data = data
        self.objective = objective
        self.world = world
        self.epochs: int = settings["epochs"]
        self.batch_size: int = settings["batch_size"]
        self.config: OptimizerConfig = settings["optimizer_config"]
        self.seed: int = settings["seed"]
        self.train_limit: int | None = settings["train_limit"]
        self.amp: bool = settings["amp"]
        self.channels_last: bool = settings["channels_last"]
        self.checkpoint_path: Path | None = settings["checkpoint_path"]
        model.to(world.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(model, self.config)
        # what optimizer.gate_grad_clip clips, listed once rather than at every step
        self.gate_params = [p for name, p in model.named_parameters() if is_gate_key(name) and p.requires_grad]
        device = world.device
        self.autocast_dtype = autocast_dtype(device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and self.autocast_dtype == torch.float16)
        self.checkpointer = Checkpointer(
            self.checkpoint_path, model, self.optimizer, objective, world, settings["extra_state"], self.scaler
        )
        self.shard = (world.rank, world.size)
        self.steps_per_epoch = data.train.num_batches(self.batch_size, self.train_limit, self.shard)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.peak_lr = peak_lr(self.config, self.batch_size, world.size)
        self.warmup_steps = min(self.total_steps, round(self.config.warmup_epochs * self.steps_per_epoch))
        self.position = _Position()
        self.history: list[dict[str, float]] = []
        self.running = _new_running()
        self.setup_metrics: dict[str, float] = {}
        self.lr = self.peak_lr
        self.trained: nn.Module = model

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a loaded checkpoint (``checkpoint.load_checkpoint``)."""
        ranks = state["per_rank"]
        if len(ranks) != self.world.size:
            raise ManidpError(
                f"{self.checkpoint_path} was written by {len(ranks)} processes"
                f"; resume it with as many, not {self.world.size}"
            )
        mine = ranks[self.world.rank]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(mine["objective"])
        self.objective.load_shared_state_dict(state.get("shared", {}))
        torch.set_rng_state(mine["rng"])
        self.position = _Position(state["epoch"], state["step"], state["global_step"])
        self.history = list(state["history"])
        self.running = mine["running"]
        self.setup_metrics = dict(state.get("setup", {}))

    def start(self) -> None:
        """A fresh run: seed this rank, let the objective measure what it needs before epoch 0."""
        torch.manual_seed(self.seed + self.world.rank)
        self.setup_metrics = self.objective.setup(self.model)

    def wrap_for_ranks(self) -> None:
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel  # loads torch.distributed's machinery

            device = self.world.device
            self.trained = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )

    def save(self, epoch: int, step: int) -> None:
        where = (
            f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
        )  # epoch: the next one, 0-based
        _check_weights(self.model, where, self.lr, self.checkpoint_path)
        self.checkpointer.save(epoch, step, self.position.global_step, self.running, self.history, self.setup_metrics)

    def _any_rank_stops(self, stop: bool) -> bool:
        if not self.world.distributed:
            return stop
        return bool(self.world.all_reduce_sum(torch.tensor([float(stop)]))[0] > 0)

    def _train_step(self, epoch: int, step: int, images: torch.Tensor, targets: torch.Tensor) -> StepInfo:
        device = self.world.device
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.lr = scheduled_lr(
            self.position.global_step, self.total_steps, self.peak_lr, self.config.min_lr, self.warmup_steps
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        self.objective.set_progress(self.position.global_step / max(self.total_steps, 1))
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.amp):
            logits, terms = self.objective.step(self.trained, images, targets)
        _check_loss(terms["loss"], self.world, f"epoch {epoch + 1}, step {step + 1}", self.lr, self.checkpoint_path)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        if self.config.gate_grad_clip is not None:
            self._clip_gate_gradients(self.config.gate_grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.position.global_step += 1
        running = self.running
        running["seen"] += images.shape[0]
        running["correct"] += int((logits.detach().argmax(1) == targets).sum())
        scalars = {k: float(v.detach()) for k, v in terms.items() if v.dim() == 0}
        for key, value in scalars.items():
            running["sums"][key] = running["sums"].get(key, 0.0) + value * images.shape[0]
        accuracy = running["correct"] / running["seen"]
        return StepInfo(epoch, self.epochs, step + 1, self.steps_per_epoch, self.lr, scalars, accuracy)

    def _clip_gate_gradients(self, max_norm: float) -> None:
        self.scaler.unscale_(self.optimizer)  # the norm is of the true gradient, not the fp16-scaled one
        torch.nn.utils.clip_grad_norm_(self.gate_params, max_norm)  # parameters without a gradient are skipped

    def train_epoch(self, epoch: int, stop: StopRequest, on_step: Callable[[StepInfo], bool | None] | None) -> bool:
        """Run one epoch (from the resumed step); True when it was interrupted part-way (and saved)."""
        self.model.train()
        skip = self.position.step if epoch == self.position.epoch else 0
        batches = self.data.train.batches(
            self.batch_size,
            shuffle=True,
            augment=True,
            seed=self.seed,
            epoch=epoch,
            skip=skip,
            limit=self.train_limit,
            shard=self.shard,
        )
        with self.objective.epoch_context(self.model):
            for step, (images, targets) in enumerate(batches, start=skip):
                info = self._train_step(epoch, step, images, targets)
                if on_step is not None and on_step(info):
                    stop.requested = True
                if self._any_rank_stops(stop.requested):
                    stop.requested = True
                    if step + 1 == self.steps_per_epoch:
                        return False  # finish the epoch normally, then stop
                    self.save(epoch, step + 1)
                    return True
        return False

    def epoch_metrics(
        self, epoch: int, evaluate_epoch: Callable[[nn.Module], dict[str, float]] | None
    ) -> dict[str, float]:
        """Training means over every rank, the objective's end-of-epoch work, and the evaluation."""
        sums = self.running["sums"]
        totals = self.world.all_reduce_sum(
            torch.tensor(
                [self.running["seen"], self.running["correct"]] + [sums[k] for k in sorted(sums)], dtype=torch.float64
            )
        ).tolist()
        seen = max(totals[0], 1)
        metrics = {"epoch": epoch, "lr": self.lr}
        metrics.update({f"train_{k}": v / seen for k, v in zip(sorted(sums), totals[2:])})
        metrics["train_top1"] = totals[1] / seen
        self.world.broadcast_buffers(self.model)
        metrics.update(self.objective.end_epoch(self.model, epoch))
        if evaluate_epoch is not None:
            metrics.update(evaluate_epoch(self.model))
        return metrics

    def result(self, interrupted: bool) -> FitResult:
        return FitResult(self.history, interrupted, self.checkpoint_path, self.setup_metrics)


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
    settings = dict(
        epochs=epochs,
        batch_size=batch_size,
        optimizer_config=optimizer_config,
        seed=seed,
        train_limit=train_limit,
        checkpoint_path=checkpoint_path,
        extra_state=extra_state,
        amp=amp,
        channels_last=channels_last,
    )
    trainer = _Trainer(model, data, objective, settings, world)
    if resume_state is not None:
        trainer.restore(resume_state)
    else:
        trainer.start()
    trainer.wrap_for_ranks()
    stop = StopRequest()
    with _stop_on_sigint(stop):
        for epoch in range(trainer.position.epoch, epochs):
            if trainer.train_epoch(epoch, stop, on_step):
                return trainer.result(interrupted=True)
            metrics = trainer.epoch_metrics(epoch, evaluate_epoch)
            trainer.history.append(metrics)
            trainer.running = _new_running()
            trainer.save(epoch + 1, 0)
            if on_epoch is not None:
                on_epoch(metrics)
            if stop.requested and epoch + 1 < epochs:
                return trainer.result(interrupted=True)
    return trainer.result(interrupted=False)
