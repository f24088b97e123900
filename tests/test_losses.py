import math

import pytest
import torch

from manidp_cli.core.losses import (
    ManiDPLoss,
    TeacherLead,
    complexity_weight,
    distillation_loss,
    feature_distillation_loss,
    similarity_loss,
    sparsity_loss,
    teacher_fits_better,
)


def test_complexity_weight_by_hand():
    # kappa * L_bar = 0.5 * 2.0 = 1.0; gamma = 2
    losses = torch.tensor([0.0, 0.5, 1.0, 3.0])
    w = complexity_weight(losses, mean_loss=2.0, kappa=0.5, gamma=2.0)
    assert w.tolist() == pytest.approx([1.0, 0.25, 0.0, 0.0])


def test_sparsity_and_similarity_by_hand():
    pi = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # two images, two channels
    weights = torch.tensor([1.0, 0.5])
    # mean_i(w_i * mean_k pi) = (1 * 0.5 + 0.5 * 1.0) / 2
    assert float(sparsity_loss([pi], weights)) == pytest.approx(0.5)
    features = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # identical images
    # F F^T = all ones; P P^T = identity (orthogonal rows): ||.||^2 = 2 (off-diagonal ones) / B^2 = 4
    assert float(similarity_loss([features], [pi])) == pytest.approx(2 / 4)
    assert float(similarity_loss([features], [features * 3])) == pytest.approx(0.0)


def test_manidp_loss_terms_on_a_tiny_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2])
    pi = torch.rand(3, 5, requires_grad=True)
    feat = torch.randn(3, 5)
    loss = ManiDPLoss(kappa=0.5, gamma=1.0, lambda_sparse=0.1, lambda_sim=0.2)
    terms = loss(logits, targets, {"a": pi}, {"a": feat}, mean_loss=4.0)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none").detach()
    bound = 0.5 * 4.0
    w = torch.where(ce < bound, (bound - ce) / bound, torch.zeros_like(ce)).detach()
    sparse = (w * pi.mean(1)).mean().detach()
    f = feat / feat.norm(dim=1, keepdim=True)
    p = (pi / pi.norm(dim=1, keepdim=True)).detach()
    sim = ((f @ f.T - p @ p.T) ** 2).sum() / 9
    assert float(terms["ce"]) == pytest.approx(float(ce.mean()))
    assert float(terms["sparsity"]) == pytest.approx(float(sparse), rel=1e-5)
    assert float(terms["similarity"]) == pytest.approx(float(sim), rel=1e-5)
    total = ce.mean() + 0.1 * sparse + 0.2 * sim
    assert float(terms["loss"].detach()) == pytest.approx(float(total), rel=1e-5)
    terms["loss"].backward()
    assert pi.grad is not None and pi.grad.abs().sum() > 0
    assert not math.isnan(float(logits.grad.sum()))


def test_uniform_weighting_ablation():
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    targets = torch.tensor([1, 1])  # one very hard, one very easy image
    pi = torch.ones(2, 3)
    on = ManiDPLoss(lambda_sim=0.0)(logits, targets, {"a": pi}, {}, mean_loss=1.0)
    off = ManiDPLoss(lambda_sim=0.0, complexity_weighting=False)(logits, targets, {"a": pi}, {}, mean_loss=1.0)
    assert float(off["sparsity"]) == pytest.approx(1.0)  # every image weighs 1
    assert float(on["sparsity"]) < 0.5  # the hard image weighs 0


def test_distillation_only_where_the_teacher_fits_better():
    """Images the teacher fits worse than the student add nothing, and the term is still divided by
    the whole batch, so it fades as the student outgrows its teacher."""
    targets = torch.tensor([0, 0, 1])
    student = torch.tensor([[0.0, 0.0], [4.0, -4.0], [0.0, 0.0]])
    teacher = torch.tensor([[3.0, -3.0], [0.0, 0.0], [-2.0, 2.0]])
    selected = teacher_fits_better(student, teacher, targets)
    assert selected.tolist() == [True, False, True]  # image 1: the student is surer of the true class
    per_image = [float(distillation_loss(student[i : i + 1], teacher[i : i + 1], 2.0)) for i in range(3)]
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(sum(per_image) / 3)
    assert float(distillation_loss(student, teacher, 2.0, selected)) == pytest.approx((per_image[0] + per_image[2]) / 3)
    assert float(distillation_loss(student, teacher, 2.0, torch.zeros(3, dtype=torch.bool))) == 0.0


def test_teacher_lead_follows_running_accuracy_and_survives_a_checkpoint():
    """The teacher is ahead until the student's running accuracy passes its own, not at the first
    batch the student wins; the state round-trips through a checkpoint."""
    targets = torch.tensor([0, 1, 0, 1])
    right = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    wrong = -right
    lead = TeacherLead(momentum=0.9)
    assert lead.teacher_ahead()  # no batch seen yet
    for _ in range(5):
        lead.update(wrong, right, targets)
    assert lead.teacher_ahead()
    lead.update(right, wrong, targets)
    assert lead.teacher_ahead()  # one batch does not overturn five
    for _ in range(20):
        lead.update(right, wrong, targets)
    assert not lead.teacher_ahead()
    restored = TeacherLead(momentum=0.9)
    restored.load_state_dict(lead.state_dict())
    assert (restored.steps, restored.teacher_ahead()) == (26, False)


def test_feature_distillation_is_relative_per_stage():
    """Each stage weighs by its error relative to the teacher's own magnitude, so a stage with large
    activations does not outweigh the others; equal features cost nothing."""
    small, large = torch.ones(2, 3, 4, 4), 100 * torch.ones(2, 8, 2, 2)
    assert float(feature_distillation_loss([small, large], [small, large])) == 0.0
    off = feature_distillation_loss([small * 1.5, large * 1.5], [small, large])
    assert float(off) == pytest.approx(0.25)  # (0.5)^2 relative error on both stages
    student = small.clone().requires_grad_(True)
    feature_distillation_loss([student], [small * 2]).backward()
    assert float(student.grad.abs().sum()) > 0.0
