"""Asymmetric metric learning (Budnik & Avrithis, CVPR 2021): a student's embedding is pushed
into a fixed teacher's embedding space, so one student can stand in for a whole ensemble.

`reg`: 1 - cos(student(a), teacher(a)) for every image, labelled or not.
`contr_reg` (the paper's Contr+): reg plus the asymmetric contrastive loss on the labelled
images: the student's anchor against the *teacher's* embeddings of the batch's other images,
pulled towards those of its identity and pushed below `margin` cosine from the others
(pytorch-metric-learning's ContrastiveLoss with the teacher's embeddings as its reference set:
the optional extra `losses`, imported only for `contr_reg`; `reg` needs torch alone).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from jaguar_reid.extras import require
from jaguar_reid.keys import choices

DISTILL_LOSSES = choices("train.distill_loss")


def metric_learning() -> tuple[ModuleType, ModuleType]:
    """pytorch_metric_learning's `losses` and `distances` for `contr_reg`, or one line naming
    the setting and the extra that provides them."""
    setting = "train.distill_loss=contr_reg"
    return (require("pytorch_metric_learning.losses", setting),
            require("pytorch_metric_learning.distances", setting))


def regression_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over the rows (0 when the student matches the teacher's directions)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def asymmetric_contrastive(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                           margin: float) -> torch.Tensor:
    """Student anchor i against teacher embedding j of the batch's *other* images (the pair
    i, i is the regression's): positives relu(1 - cos(s_i, t_j)), negatives
    relu(cos(s_i, t_j) - margin), each kind averaged over its non-zero terms
    (pytorch-metric-learning's default reducer for this loss)."""
    same = labels[:, None] == labels[None, :]
    other = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    anchors_p, positives = torch.nonzero(same & other, as_tuple=True)
    anchors_n, negatives = torch.nonzero(~same, as_tuple=True)
    losses, distances = metric_learning()
    loss = losses.ContrastiveLoss(pos_margin=1.0, neg_margin=margin,
                                  distance=distances.CosineSimilarity())
    # The teacher is fixed: its embeddings are the reference set, never trained.
    return loss(student.float(), labels, indices_tuple=(anchors_p, positives, anchors_n,
                                                        negatives),
                ref_emb=teacher.float().detach(), ref_labels=labels)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 kind: str, margin: float) -> torch.Tensor:
    """The student's loss for one batch; `labels` -1 marks unlabelled images (regression
    only)."""
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"distill loss must be one of {', '.join(DISTILL_LOSSES)}; got {kind!r}")
    loss = regression_loss(student, teacher)
    labelled = labels >= 0
    if kind == "contr_reg" and int(labelled.sum()) >= 2:
        loss = loss + asymmetric_contrastive(student[labelled], teacher[labelled],
                                             labels[labelled], margin)
    return loss
