"""The ManiDP loss (method.md, "Loss"), symbol for symbol.

    l_i      per-image cross-entropy
    w_i      = [l_i < kappa * L_bar] * ((kappa * L_bar - l_i) / (kappa * L_bar)) ** gamma
    L_sparse = sum_l mean_i(w_i * mean_k pi_l[i, k])
    L_sim    = sum_l ||F F^T - P P^T||_F^2 / B^2     (F, P: row-normalised features, saliencies)
    L        = mean_i(l_i) + lambda_sparse * L_sparse + lambda_sim * L_sim

Example::

    loss = ManiDPLoss(lambda_sparse=0.1, lambda_sim=0.1)
    terms = loss(logits, targets, rec.saliency, rec.features, mean_loss=0.7)
    terms["loss"].backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def complexity_weight(per_image_loss: torch.Tensor, mean_loss: float, kappa: float, gamma: float) -> torch.Tensor:
    """w_i: near 1 for easy images (loss far below kappa * L_bar), 0 for hard ones. No gradient."""
    bound = kappa * mean_loss
    loss = per_image_loss.detach()
    if bound <= 0:
        return torch.zeros_like(loss)
    return (loss < bound).to(loss.dtype) * ((bound - loss).clamp(min=0) / bound) ** gamma


def sparsity_loss(saliencies: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_l mean_i(w_i * mean_k pi_l[i, k])."""
    return sum((weights * pi.mean(dim=1)).mean() for pi in saliencies)


def similarity_loss(features: list[torch.Tensor], saliencies: list[torch.Tensor]) -> torch.Tensor:
    """sum_l ||F F^T - P P^T||_F^2 / B^2: similar images should get similar sub-networks."""
    total = 0.0
    for feature, pi in zip(features, saliencies, strict=True):
        f = F.normalize(feature, dim=1)
        p = F.normalize(pi, dim=1)
        batch = f.shape[0]
        total = total + ((f @ f.T - p @ p.T) ** 2).sum() / batch**2
    return total


class ManiDPLoss(nn.Module):
    """Returns the named terms ``ce``, ``sparsity``, ``similarity`` and their weighted ``loss``."""

    def __init__(
        self,
        kappa: float = 0.5,
        gamma: float = 1.0,
        lambda_sparse: float = 0.1,
        lambda_sim: float = 0.1,
        complexity_weighting: bool = True,
    ):
        super().__init__()
        self.kappa = kappa
        self.gamma = gamma
        self.lambda_sparse = lambda_sparse
        self.lambda_sim = lambda_sim
        self.complexity_weighting = complexity_weighting

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        saliency: dict[str, torch.Tensor],
        features: dict[str, torch.Tensor],
        mean_loss: float,
    ) -> dict[str, torch.Tensor]:
        per_image = F.cross_entropy(logits.float(), targets, reduction="none")
        names = sorted(saliency)
        pis = [saliency[n].float() for n in names]
        if self.complexity_weighting:
            weights = complexity_weight(per_image, mean_loss, self.kappa, self.gamma)
        else:
            weights = torch.ones_like(per_image)
        ce = per_image.mean()
        sparse = sparsity_loss(pis, weights) if pis else ce.new_zeros(())
        if self.lambda_sim > 0 and pis:
            sim = similarity_loss([features[n].float() for n in names], pis)
        else:
            sim = ce.new_zeros(())
        loss = ce + self.lambda_sparse * sparse + self.lambda_sim * sim
        return {
            "loss": loss,
            "ce": ce.detach(),
            "sparsity": torch.as_tensor(sparse).detach(),
            "similarity": torch.as_tensor(sim).detach(),
            "per_image_ce": per_image.detach(),
        }


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 KL(teacher || student) on temperature-softened class probabilities (Hinton et al.), in fp32,
    averaged over the batch. With ``selected`` (a boolean per image) the other images contribute 0,
    still divided by the whole batch: the term shrinks as fewer images are selected."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.softmax(teacher_logits.detach().float() / t, dim=1)
    if selected is None:
        return F.kl_div(student, teacher, reduction="batchmean") * t * t
    per_image = F.kl_div(student, teacher, reduction="none").sum(dim=1)
    return (per_image * selected.to(per_image.dtype)).sum() / len(per_image) * t * t


def feature_distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over stages of ||student - teacher||^2 / ||teacher||^2 on the batch's stage outputs, in
    fp32: relative, so that a deep stage with large activations does not outweigh the others."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.detach().float()
        terms.append((s.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def teacher_fits_better(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per image: the teacher's cross-entropy on the true class is below the student's."""
    with torch.no_grad():
        student = F.cross_entropy(student_logits.detach().float(), targets, reduction="none")
        teacher = F.cross_entropy(teacher_logits.float(), targets, reduction="none")
    return teacher < student


class TeacherLead:
    """Whether the teacher still classifies the training batches at least as well as the student: running
    means (bias-corrected exponential, ``momentum`` per step) of both top-1 accuracies on the same
    batches. Distillation from a teacher the student has overtaken pulls the student back towards
    it (docs/results.md, 180,000 images); one batch is too noisy to decide on, and per image the
    student is ahead on most images even while it is behind on the whole (``teacher_fits_better``)."""

    def __init__(self, momentum: float = 0.98):
        self.momentum = momentum
        self.steps = 0
        self.student = 0.0
        self.teacher = 0.0

    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            student = float((student_logits.argmax(dim=1) == targets).float().mean())
            teacher = float((teacher_logits.argmax(dim=1) == targets).float().mean())
        self.steps += 1
        self.student = self.momentum * self.student + (1 - self.momentum) * student
        self.teacher = self.momentum * self.teacher + (1 - self.momentum) * teacher

    def margin(self) -> float:
        """Teacher's running accuracy minus the student's, bias-corrected (0 before the first batch)."""
        if self.steps == 0:
            return 0.0
        return (self.teacher - self.student) / (1 - self.momentum**self.steps)

    def teacher_ahead(self) -> bool:
        """True before the first batch and on a tie (the student has not outgrown its teacher); the bias
        correction is common to both means, so it cancels."""
        return self.steps == 0 or self.teacher >= self.student

    def state_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "student": self.student, "teacher": self.teacher}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.steps = int(state["steps"])
        self.student = float(state["student"])
        self.teacher = float(state["teacher"])
