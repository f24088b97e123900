"""Training objectives for the engine: plain cross-entropy, and ManiDP pruning to a FLOPs target.

``ManiDPObjective`` wires the method's pieces together without containing their formulas: the loss
terms come from ``losses``, the target and thresholds from ``schedule``, FLOPs from ``flops``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.config import CodebookConfig
from manidp_cli.core.calibration import calibrate_thresholds, fit_codebook_widths, mean_saliency
from manidp_cli.core.codebook import install_codebooks, learn_codebooks
from manidp_cli.core.distributed import World
from manidp_cli.core.features import StageTap, stage_names
from manidp_cli.core.flops import CostTable, dynamic_flops
from manidp_cli.core.gating import GateSet
from manidp_cli.core.losses import (
    ManiDPLoss,
    TeacherLead,
    distillation_loss,
    feature_distillation_loss,
    teacher_fits_better,
)
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.narrow import NarrowPlan, NarrowTraining
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.core.schedule import FeedbackThresholds, RateSearch, flops_target


class CrossEntropyObjective:
    """Dense training: mean cross-entropy, nothing around epochs."""

    def setup(self, model: nn.Module) -> dict[str, float]:
        return {}

    def epoch_context(self, model: nn.Module):
        return contextlib.nullcontext()

    def set_progress(self, fraction: float) -> None:
        pass

    def step(self, model, images, targets):
        logits = model(images)
        ce = F.cross_entropy(logits.float(), targets)
        return logits, {"loss": ce, "ce": ce.detach()}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def shared_state_dict(self) -> dict[str, Any]:
        return {}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Distilled:
    """Any objective plus ``weight`` x distillation from a frozen ``teacher`` (the dense start):
    T^2 KL(teacher || student) at ``temperature`` (``core.losses.distillation_loss``), on every image,
    (``where="teacher_better"``) on the images whose true class the teacher fits better, or
    (``where="teacher_ahead"``) on every image of the steps where the teacher's running training
    accuracy is at least the student's (``core.losses.TeacherLead``). With ``feature_weight`` the
    stage outputs (timm's ``feature_info``) are distilled too (``core.losses.feature_distillation_loss``).
    With ``decay="linear"`` both weights fall linearly to 0 over the run's steps. With
    ``teacher_dtype=torch.bfloat16`` the teacher runs under bf16 autocast (``training.precision``),
    channels-last; the losses compare in float32 either way."""

    def __init__(
        self,
        objective,
        teacher: nn.Module,
        weight: float,
        temperature: float,
        where: str = "all",
        feature_weight: float = 0.0,
        decay: str = "none",
        teacher_stage_channels: list[torch.Tensor] | None = None,
        teacher_dtype: torch.dtype = torch.float32,
    ):
        self.objective = objective
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_dtype = teacher_dtype
        if teacher_dtype == torch.bfloat16:  # oneDNN's bf16 convolutions are fastest channels-last
            self.teacher.to(memory_format=torch.channels_last)
        self.weight = weight
        self.temperature = temperature
        self.where = where
        self.feature_weight = feature_weight
        self.decay = decay
        # a statically slimmed student's stages keep some of the teacher's channels: compare those
        self.teacher_stage_channels = teacher_stage_channels
        self.fade = 1.0  # with decay "linear": 1 - the share of the run's steps taken
        self.lead = TeacherLead()
        self.taps: tuple[StageTap, StageTap] | None = None

    def setup(self, model: nn.Module) -> dict[str, float]:
        # loss.teacher_dtype auto depends on the machine: the run's report says what it resolved to
        return {**self.objective.setup(model), "teacher_bfloat16": float(self.teacher_dtype == torch.bfloat16)}

    def epoch_context(self, model: nn.Module):
        return self.objective.epoch_context(model)

    def set_progress(self, fraction: float) -> None:
        self.fade = 1.0 - fraction if self.decay == "linear" else 1.0
        self.objective.set_progress(fraction)

    def _tap_stages(self, model: nn.Module) -> None:
        """Hooks on the student's and the teacher's stage outputs, on the first step (fresh or resumed)."""
        if self.feature_weight > 0 and self.taps is None:
            student = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            names = stage_names(student)
            self.taps = (StageTap(student, names), StageTap(self.teacher, names))

    def step(self, model, images, targets):
        self._tap_stages(model)
        for tap in self.taps or ():
            tap.armed = True
        try:
            logits, terms = self.objective.step(model, images, targets)
            teacher_logits = self._teacher_logits(images)
        finally:
            for tap in self.taps or ():
                tap.armed = False
        selected = teacher_fits_better(logits, teacher_logits, targets) if self.where == "teacher_better" else None
        distill = distillation_loss(logits, teacher_logits, self.temperature, selected)
        weight = self.weight * self.fade
        if self.where == "teacher_ahead":
            self.lead.update(logits, teacher_logits, targets)
            ahead = self.lead.teacher_ahead()
            weight = weight if ahead else 0.0
            terms["distilled_share"] = torch.tensor(float(ahead))
            terms["teacher_lead"] = torch.tensor(self.lead.margin())
        terms["loss"] = terms["loss"] + weight * distill
        terms["distill"] = distill.detach()
        if self.taps is not None:
            features = self._stage_distillation()
            terms["loss"] = terms["loss"] + self.feature_weight * self.fade * features
            terms["feature_distill"] = features.detach()
        if selected is not None:
            terms["distilled_share"] = selected.float().mean()
        return logits, terms

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return self.objective.end_epoch(model, epoch)

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        # float32 adds no context of its own: under the engine's --amp autocast it stays bf16 as before
        if self.teacher_dtype == torch.bfloat16:
            precision = torch.autocast(images.device.type, dtype=torch.bfloat16)
        else:
            precision = contextlib.nullcontext()
        with torch.no_grad(), precision:
            return self.teacher(images)

    def _stage_distillation(self) -> torch.Tensor:
        """The stage-output term of the step just taken, on the kept teacher channels if given."""
        student, teacher = self.taps[0].take(), self.taps[1].take()
        if self.teacher_stage_channels is not None:
            pairs = zip(teacher, self.teacher_stage_channels, strict=True)
            teacher = [t.index_select(1, c.to(t.device)) for t, c in pairs]
        return feature_distillation_loss(student, teacher)

    def state_dict(self) -> dict[str, Any]:
        return {"objective": self.objective.state_dict(), "lead": self.lead.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "teacher" in state:  # checkpoints of 0.1.0 kept it with every process's state
            self.teacher.load_state_dict(state["teacher"])
        if "lead" in state:  # absent from checkpoints written before loss.distill_where: teacher_ahead
            self.lead.load_state_dict(state["lead"])
        self.objective.load_state_dict(state["objective"])

    def shared_state_dict(self) -> dict[str, Any]:
        # the teacher travels with the checkpoint (a resumed run rebuilds its model from the
        # checkpoint alone, not from the starting weights), once: every process holds the same one
        return {"teacher": self.teacher.state_dict()}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])


class ManiDPObjective:
    """ManiDP fine-tuning (method.md): manifold-regularised loss, thresholds re-set after each epoch
    so that the measured mean FLOPs follow a cosine from 1.0 down to ``target``. With a codebook, the
    last ``codebook.epochs`` epochs train with keep-sets snapped to it (manidp_cli.core.codebook).
    With ``feedback`` the thresholds are calibrated to the (ramp's) target before the first step and
    then follow the FLOPs measured in training every few steps (``schedule.FeedbackThresholds``);
    the end of the last epoch calibrates them once more, to the target."""

    def __init__(
        self,
        gates: GateSet,
        table: CostTable,
        loss: ManiDPLoss,
        *,
        target: float,
        epochs: int,
        hold_epochs: int,
        training_batches,
        calibration_batches: list[torch.Tensor],
        search_steps: int = 24,
        codebook: CodebookConfig = CodebookConfig(),
        world: World = World(),
        feedback: FeedbackThresholds | None = None,
        layer_scales: dict[str, float] | None = None,
        narrow: bool = False,
    ):
        self.gates = gates
        self.narrow = narrow  # train with core.narrow.NarrowTraining
        self._narrow_plan: NarrowPlan | None = None
        self.layer_scales = layer_scales  # per-layer remain-rate scales (schedule.cost_weighted_scales)
        self.feedback = feedback
        self.table = table
        self.loss = loss
        self.target = target
        self.epochs = epochs
        self.hold_epochs = hold_epochs
        self.training_batches = training_batches  # callable -> iterable of (images, labels), no augmentation
        self.calibration_batches = calibration_batches
        self.search_steps = search_steps
        self.codebook = codebook
        self.world = world
        self.mean_loss = 0.0  # L_bar
        self._recorder: GateRecorder | None = None
        self._reset_epoch()

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        """Per gated layer, a float64 zero per output channel: the start of every saliency sum."""
        return {name: torch.zeros(g.out_channels, dtype=torch.float64) for name, g in self.gates.by_name().items()}

    def _reset_window(self) -> None:
        self.window_sums = self._zero_sums()
        self.window_count = 0
        self.window_flops = 0.0

    def _reset_epoch(self) -> None:
        self._reset_window()
        self.saliency_sums = self._zero_sums()
        self.saliency_count = 0
        self.ce_sum = 0.0
        self.flops_sum = 0.0

    def setup(self, model: nn.Module) -> dict[str, float]:
        """L_bar before epoch 0: the starting model's mean loss over ``training_batches`` (eval mode)."""
        total, count = 0.0, 0
        device = self.world.device
        with torch.no_grad(), eval_mode(model):
            for images, targets in self.training_batches():
                logits = model(images.to(device))
                total += float(F.cross_entropy(logits.float(), targets.to(device), reduction="sum"))
                count += images.shape[0]
        total, count = self.world.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        self.mean_loss = total / max(count, 1)
        metrics = {"initial_mean_loss": self.mean_loss}
        if self.feedback is not None:
            means = mean_saliency(model, self.calibration_batches)
            search = self.calibrate(model, self.feedback.target_at(0), means)
            self.feedback.rate, self.feedback.means = search.remain_rate, means
            metrics.update(initial_remain_rate=search.remain_rate, initial_calibrated_flops_ratio=search.flops_ratio)
        return metrics

    def _narrowing(self, model: nn.Module):
        if not self.narrow:
            return contextlib.nullcontext()
        input_shape = tuple(self.calibration_batches[0].shape[1:])
        narrowing = NarrowTraining(model, input_shape, self._narrow_plan)
        self._narrow_plan = narrowing.plan  # traced once per run
        return narrowing

    @contextlib.contextmanager
    def epoch_context(self, model: nn.Module):
        with GateRecorder(model, features=self.loss.lambda_sim > 0) as recorder, self._narrowing(model):
            self._recorder = recorder
            try:
                yield
            finally:
                self._recorder = None

    def set_progress(self, fraction: float) -> None:
        pass  # the thresholds follow epochs and the measured FLOPs, not the step count

    def step(self, model, images, targets):
        rec = self._recorder
        logits = model(images)
        # autocast may run the forward in bf16; the loss terms are kept in fp32 (ManiDPLoss casts)
        terms = self.loss(logits, targets, rec.saliency, rec.features, self.mean_loss)
        per_image_ce = terms.pop("per_image_ce")
        batch = images.shape[0]
        with torch.no_grad():
            for name, saliency in rec.saliency.items():
                self.saliency_sums[name] += saliency.detach().double().sum(0).cpu()
            self.saliency_count += batch
            self.ce_sum += float(per_image_ce.sum())
            per_image_flops, _ = dynamic_flops(self.table, rec.active_outputs(), batch)
            ratio = per_image_flops.mean() / self.table.dense_flops
            self.flops_sum += float(ratio) * batch
            if self.feedback is not None:
                self._follow_flops(rec.saliency, float(ratio), batch)
        terms["flops_ratio"] = ratio.to(torch.float32)
        return logits, terms

    def _follow_flops(self, saliency: dict[str, torch.Tensor], ratio: float, batch: int) -> None:
        """Feedback mode: collect one step; at the end of a window (summed over every process, so
        all of them set the same thresholds) move the thresholds towards the target."""
        for name, values in saliency.items():
            self.window_sums[name] += values.detach().double().sum(0).cpu()
        self.window_count += batch
        self.window_flops += ratio * batch
        self.feedback.count_step()
        if not self.feedback.due():
            return
        names = sorted(self.window_sums)
        totals = self.world.all_reduce_sum(torch.tensor([self.window_count, self.window_flops], dtype=torch.float64))
        count = max(float(totals[0]), 1.0)
        means = {n: self.world.all_reduce_sum(self.window_sums[n]) / count for n in names}
        self.gates.set_thresholds(self.feedback.update(float(totals[1]) / count, means))
        self._reset_window()

    def calibrate(
        self, model: nn.Module, target: float, mean_saliency: dict[str, torch.Tensor], start: float | None = None
    ):
        """Thresholds for ``target``, the rate search starting at ``start`` (None: its own guess)."""
        return calibrate_thresholds(
            model,
            self.table,
            mean_saliency,
            self.calibration_batches,
            target,
            self.search_steps,
            self.world,
            self.layer_scales,
            start,
        )

    def _reduce_epoch(self) -> None:
        """Sums and counts of all ranks, so that every rank derives the same L_bar and thresholds."""
        names = sorted(self.saliency_sums)
        scalars = self.world.all_reduce_sum(
            torch.tensor([self.saliency_count, self.ce_sum, self.flops_sum], dtype=torch.float64)
        )
        self.saliency_count, self.ce_sum, self.flops_sum = int(scalars[0]), float(scalars[1]), float(scalars[2])
        self.saliency_sums = {n: self.world.all_reduce_sum(self.saliency_sums[n]) for n in names}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self._reduce_epoch()
        count = max(self.saliency_count, 1)
        metrics = {"train_flops_ratio": self.flops_sum / count, "mean_loss": self.ce_sum / count}
        self.mean_loss = self.ce_sum / count  # L_bar for the next epoch
        build_codebook = self.codebook.enabled and epoch + 1 == self.epochs - self.codebook.epochs
        if self.feedback is not None:  # the target is in force from the first step
            next_target = self.target
        elif epoch + 1 < self.epochs:
            next_target = flops_target(epoch + 1, self.epochs, self.target, self.hold_epochs)
        else:
            next_target = self.target
        if self.feedback is not None and self.feedback.means:
            # the moving averages the thresholds followed: the saliencies the network ended training
            # with. The epoch's means still hold its first steps, which the gates have since left,
            # and thresholds from them kept 2% of a resnet34 layer that had trained at 21%
            means = dict(self.feedback.means)
        else:
            means = {name: s / count for name, s in self.saliency_sums.items()}
        calibrate = self.feedback is None or epoch + 1 == self.epochs or build_codebook
        # the feedback controller has held the training FLOPs near the target: its rate is a close start
        start = self.feedback.rate if self.feedback is not None else None
        if next_target < 1.0 and calibrate:
            search = self.calibrate(model, next_target, means, start)
            if build_codebook:
                search = self._snap_to_codebooks(model, next_target, means, search, metrics)
            metrics.update(
                next_target=next_target,
                remain_rate=search.remain_rate,
                calibrated_flops_ratio=search.flops_ratio,
            )
        self._reset_epoch()
        return metrics

    def _snap_to_codebooks(
        self, model: nn.Module, target: float, means: dict[str, torch.Tensor], search: RateSearch, metrics: dict
    ) -> RateSearch:
        """Codebooks learned under the thresholds just calibrated, put in force at the FLOPs target:
        snapping and rounding widths move FLOPs, so either the widths are fitted to the target
        (``codebook.fit_widths``) or the thresholds are calibrated again."""
        learned = learn_codebooks(model, self.calibration_batches, self.codebook, self.world)
        if self.codebook.fit_widths:
            fit = fit_codebook_widths(
                model,
                self.table,
                learned,
                self.codebook.channel_multiple,
                self.calibration_batches,
                target,
                world=self.world,
            )
            metrics["codebook_width_scale"] = fit.remain_rate
            search = RateSearch(search.remain_rate, fit.flops_ratio, search.evaluations + fit.evaluations)
        else:
            install_codebooks(model, learned, self.codebook.channel_multiple)
            search = self.calibrate(model, target, means, search.remain_rate)
        entries = [len(gate.codebook) for gate in self.gates.values()]
        metrics["codebook_entries"] = sum(entries) / len(entries)
        return search

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean_loss": self.mean_loss,
            "saliency_sums": dict(self.saliency_sums),
            "saliency_count": self.saliency_count,
            "ce_sum": self.ce_sum,
            "flops_sum": self.flops_sum,
            "feedback": self.feedback.state_dict() if self.feedback is not None else None,
            "window": {"sums": dict(self.window_sums), "count": self.window_count, "flops": self.window_flops},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean_loss = state["mean_loss"]
        self.saliency_sums = dict(state["saliency_sums"])
        self.saliency_count = state["saliency_count"]
        self.ce_sum = state["ce_sum"]
        self.flops_sum = state["flops_sum"]
        if self.feedback is not None and state.get("feedback") is not None:
            self.feedback.load_state_dict(state["feedback"])
            window = state["window"]
            self.window_sums, self.window_count, self.window_flops = (
                dict(window["sums"]),
                window["count"],
                window["flops"],
            )

    def shared_state_dict(self) -> dict[str, Any]:
        return {}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        pass
