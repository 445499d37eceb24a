"""DINO self-distillation (Caron et al. 2021): projection head, EMA teacher with centring, multi-crop loss.

The student is the backbone + `DinoHead` inside the trained model; the teacher is an EMA copy of
both that never receives gradients. The teacher sees the global crops; its outputs, centred and
sharpened, are the targets of the student's outputs on every other crop. Needs no labels. The
teacher, its center and the student's head are training state (checkpointed, never exported).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PretrainConfig
from .model import view_features


class DinoHead(nn.Module):
    """3-layer MLP -> L2-normalised bottleneck -> weight-normalised linear layer onto `out_dim` prototypes."""

    def __init__(self, in_dim: int, *, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # weight norm with its gain fixed at 1 (DINO's norm_last_layer): only the directions are learnt
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(features), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


def cosine_schedule(start: float, end: float, fraction: float) -> float:
    """start at fraction 0, end at fraction >= 1, cosine in between (DINO's teacher momentum)."""
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


class DinoTeacher(nn.Module):
    """EMA copy of the student (backbone + DinoHead) and the center of its outputs; computes the DINO loss.

    Deterministic given the student's weights, so DDP processes stay in sync: they hold the same
    student after each optimizer step, and the center's update averages the batch means of all
    processes.
    """

    def __init__(self, backbone: nn.Module, head: DinoHead, config: PretrainConfig) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.head = copy.deepcopy(head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, head.prototypes.shape[0]))
        self.n_global = 2
        self.momentum = config.teacher_momentum
        self.teacher_temp, self.student_temp = config.teacher_temp, config.student_temp
        self.center_momentum = config.center_momentum

    @torch.no_grad()
    def forward(self, global_views: torch.Tensor) -> torch.Tensor:
        """Teacher logits of the global crops (view-major)."""
        return self.head(view_features(self.backbone, global_views))

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of teacher(global view i) and student(view j) over pairs j != i; updates the center.

        student: [V * N, out_dim] for the V views (globals first), teacher: [2 * N, out_dim].
        """
        n_views = student.shape[0] // (teacher.shape[0] // self.n_global)
        log_p = F.log_softmax(student.float() / self.student_temp, dim=-1).chunk(n_views)
        targets = F.softmax((teacher.float() - self.center) / self.teacher_temp, dim=-1).chunk(self.n_global)
        pairs = [(q * log_p[j]).sum(-1).mean() for i, q in enumerate(targets) for j in range(n_views) if j != i]
        self._update_center(teacher.float())
        return -torch.stack(pairs).mean()

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        batch_center = teacher.mean(0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: DinoHead, fraction: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, m on a cosine from teacher_momentum[0] to [1]."""
        m = cosine_schedule(*self.momentum, fraction)
        teacher = [*self.backbone.parameters(), *self.head.parameters()]
        student = [p.detach() for p in (*backbone.parameters(), *head.parameters())]
        torch._foreach_lerp_(teacher, student, 1 - m)
