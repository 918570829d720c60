"""The student's losses against plain loops over pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaguar_reid.training.distill import (
    asymmetric_contrastive,
    distill_loss,
    regression_loss,
)


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _contrastive_by_loop(student, teacher, labels, margin):
    pos, neg = [], []
    for i in range(len(student)):
        for j in range(len(teacher)):
            if i == j:
                continue  # the regression's pair
            c = _cos(student[i], teacher[j])
            if labels[i] == labels[j]:
                pos.append(max(0.0, 1.0 - c))
            else:
                neg.append(max(0.0, c - margin))
    # each kind averaged over its non-zero terms
    mean_nonzero = [sum(x) / max(1, sum(v > 0 for v in x)) for x in (pos, neg)]
    return sum(mean_nonzero)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(8, 6, generator=g)
    teacher = torch.randn(8, 6, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    return student, teacher, labels


def test_regression_is_one_minus_the_cosine(batch):
    student, teacher, _ = batch
    expected = np.mean([1 - _cos(s, t) for s, t in zip(student.numpy(), teacher.numpy(),
                                                         strict=True)])
    assert regression_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert regression_loss(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_asymmetric_contrastive_matches_a_loop_over_pairs(batch, margin):
    student, teacher, labels = batch
    got = asymmetric_contrastive(student, teacher, labels, margin).item()
    expected = _contrastive_by_loop(student.numpy(), teacher.numpy(), labels.numpy(), margin)
    assert got == pytest.approx(expected, abs=1e-5)


def test_unlabelled_images_count_in_the_regression_only(batch):
    student, teacher, labels = batch
    partly = labels.clone()
    partly[5:] = -1  # three unlabelled images
    got = distill_loss(student, teacher, partly, "contr_reg", 0.3).item()
    expected = (regression_loss(student, teacher).item()
                + _contrastive_by_loop(student[:5].numpy(), teacher[:5].numpy(),
                                       partly[:5].numpy(), 0.3))
    assert got == pytest.approx(expected, abs=1e-5)
    none = torch.full_like(labels, -1)
    assert distill_loss(student, teacher, none, "contr_reg", 0.3).item() == pytest.approx(
        regression_loss(student, teacher).item())
    with pytest.raises(ValueError, match="reg, contr_reg"):
        distill_loss(student, teacher, labels, "triplet", 0.3)


def test_the_student_gets_finite_gradients(batch):
    student, teacher, labels = batch
    student = student.clone().requires_grad_(True)
    distill_loss(student, teacher, labels, "contr_reg", 0.3).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
