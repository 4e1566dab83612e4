r"""Contrastive representation distillation, simple memory-bounded form (after Tian, Krishnan & Isola
2020, "Contrastive Representation Distillation", ICLR).

The student's embedding must identify the teacher's embedding *of the same input* among the teacher
embeddings of other inputs. Both embeddings pass through learned linear projections to a common
dimension and are L2-normalised (s_i, t_i); with the other examples of the batch and a bounded FIFO
queue Q of earlier teacher embeddings as negatives, the InfoNCE objective is::

    L = mean_i  −log( exp(s_i·t_i/ν) / (Σ_j exp(s_i·t_j/ν) + Σ_{k∈Q} exp(s_i·q_k/ν)) )

i.e. a cross-entropy over the similarity logits whose target is the positive's column; it runs
through :func:`fastkd.kd_loss`. CRD proper uses an NCE critic with a memory bank of one entry per
training example; the paper notes the InfoNCE (softmax) critic as the alternative, used here with a
queue of at most ``queue_size`` entries, so memory stays ``queue_size × embed_dim`` whatever the
dataset size. The teacher network's features are detached (it is not trained); both projections are.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_positive, check_tensor, cross_entropy

__all__ = ["ContrastiveDistiller"]


class ContrastiveDistiller(nn.Module):
    """InfoNCE between projected student and teacher embeddings with a bounded negative queue.

    Args:
        student_dim, teacher_dim: sizes of the embeddings passed to ``forward``.
        embed_dim: size of the common projected space.
        queue_size: most teacher embeddings kept as extra negatives (0: in-batch negatives only).
        temperature: ν of the similarity logits (0.07 to 0.1 is usual for L2-normalised embeddings).

    ``forward(student_emb (N, student_dim), teacher_emb (N, teacher_dim), index=None)`` returns the
    loss; in training mode it then pushes the batch's (detached) projected teacher embeddings into
    the queue. ``index`` (optional, (N,) dataset ids of the batch) keeps a queued, older embedding of
    an anchor's own example out of that anchor's negatives, which matters when the dataset is not
    much larger than the queue. Equals, before the queue update, with ``Q`` the current queue rows
    and no index::

        s = F.normalize(self.student_proj(student_emb), dim=-1)
        t = F.normalize(self.teacher_proj(teacher_emb.detach()), dim=-1)
        logits = torch.cat([s @ t.T, s @ Q.T], dim=1) / temperature
        F.cross_entropy(logits, torch.arange(N))
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, embed_dim: int = 128, queue_size: int = 4096,
                 temperature: float = 0.1):
        super().__init__()
        for n, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("embed_dim", embed_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        check_positive("temperature", temperature)
        self.student_proj = nn.Linear(student_dim, embed_dim)
        self.teacher_proj = nn.Linear(teacher_dim, embed_dim)
        self.temperature = float(temperature)
        self.queue_size = queue_size
        self.register_buffer("queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))
        # Host-side counters (not tensors), so reading them never syncs with a device.
        self._ptr = 0
        self._filled = 0

    def reset_queue(self) -> None:
        self.queue.zero_()
        self.queue_ids.fill_(-1)
        self._ptr = 0
        self._filled = 0

    @torch.no_grad()
    def _enqueue(self, t: torch.Tensor, ids: torch.Tensor) -> None:
        if self.queue_size == 0:
            return
        t, ids = t[-self.queue_size:], ids[-self.queue_size:]
        n = t.shape[0]
        idx = (torch.arange(n, device=t.device) + self._ptr) % self.queue_size
        self.queue.index_copy_(0, idx, t.to(self.queue.dtype))
        self.queue_ids.index_copy_(0, idx, ids)
        self._ptr = (self._ptr + n) % self.queue_size
        self._filled = min(self._filled + n, self.queue_size)

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_tensor("student_emb", student_emb, min_dim=2)
        check_tensor("teacher_emb", teacher_emb, min_dim=2)
        if student_emb.dim() != 2 or student_emb.shape[1] != self.student_proj.in_features:
            raise ValueError(f"student_emb must have shape (N, {self.student_proj.in_features}), "
                             f"got {tuple(student_emb.shape)}")
        if teacher_emb.dim() != 2 or teacher_emb.shape != (student_emb.shape[0], self.teacher_proj.in_features):
            raise ValueError(f"teacher_emb must have shape ({student_emb.shape[0]}, {self.teacher_proj.in_features}), "
                             f"got {tuple(teacher_emb.shape)}")
        s = F.normalize(self.student_proj(student_emb), dim=-1)
        t = F.normalize(self.teacher_proj(teacher_emb.detach()), dim=-1)
        if index is not None:
            if not isinstance(index, torch.Tensor) or index.shape != (s.shape[0],) or index.is_floating_point():
                raise ValueError(f"index must be an integer tensor of shape ({s.shape[0]},) (dataset ids of the "
                                 f"batch), got {tuple(index.shape) if isinstance(index, torch.Tensor) else index!r}")
            index = index.to(device=s.device, dtype=torch.long)
        logits = s @ t.T
        if self._filled:
            # A copy: autograd saves the negatives for backward, and the queue is updated in place below.
            neg = s @ self.queue[: self._filled].to(s.dtype, copy=True).T
            if index is not None:
                # A queued copy of the anchor's own example is not a negative (CRD excludes the
                # positive's index from its memory bank); -inf removes the column from that row.
                same = self.queue_ids[: self._filled].unsqueeze(0) == index.unsqueeze(1)
                neg = neg.masked_fill(same, float("-inf"))
            logits = torch.cat([logits, neg], dim=1)
        logits = logits / self.temperature
        target = torch.arange(s.shape[0], device=s.device)
        loss = cross_entropy(logits, target)
        if self.training:
            ids = index if index is not None else torch.full((s.shape[0],), -1, dtype=torch.long, device=s.device)
            self._enqueue(t.detach(), ids)
        return loss
