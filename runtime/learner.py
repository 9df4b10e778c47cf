"""Self-distillation of exit heads from the backbone's own outputs (no labels).

Each head's classifier is trained on standardised pooled features; on publish the
standardisation is folded into the first Linear so the head reads raw features again.
"""
import copy
import time
from typing import List

import torch
from torch import nn
from torch.nn import functional as F


# The first optimiser built in a process imports torch._dynamo (about 2 s). Pay it at import,
# not inside the first learning round, where close() could not interrupt it.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def classifier_flops(clf: nn.Sequential) -> int:
    """Forward FLOPs of one row through a classifier (multiply-add = 2)."""
    return sum(2 * m.in_features * m.out_features for m in clf if isinstance(m, nn.Linear))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL to the backbone's softmax plus cross-entropy to its argmax (what agreement counts)."""
    kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                  reduction="batchmean")
    return kl + F.cross_entropy(student, teacher.argmax(1))


class RoundCancelled(Exception):
    """A learning round was abandoned (the runtime is closing); nothing of it was kept."""


class NonFiniteRound(Exception):
    """A round's heads came out NaN or Inf; they were discarded and the heads keep what they had."""


class HeadLearner:
    """Trains copies of the heads' classifiers; the serving ones are swapped in on publish."""

    def __init__(self, classifiers: List[nn.Sequential], seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.models = []
        for clf in classifiers:
            m = copy.deepcopy(clf).float().cpu()
            for layer in m:
                if isinstance(layer, nn.Linear):  # fresh, seeded init in standardised space
                    bound = 1.0 / layer.in_features ** 0.5
                    with torch.no_grad():
                        layer.weight.uniform_(-bound, bound, generator=self.gen)
                        layer.bias.zero_()
            self.models.append(m)
        self.mean = [None] * len(classifiers)
        self.std = [None] * len(classifiers)
        self.flops = 0          # training FLOPs spent so far (forward + backward ~ 3x forward)
        self.rows = 0

    def adopt(self, classifiers: List[nn.Sequential]):
        """Continue from already-learned classifiers that read raw features."""
        self.models = [copy.deepcopy(c).float().cpu() for c in classifiers]
        self.mean = [torch.zeros(c[0].in_features) for c in classifiers]
        self.std = [torch.ones(c[0].in_features) for c in classifiers]

    def reset_normalisation(self):
        self.mean = [None] * len(self.models)
        self.std = [None] * len(self.models)

    @torch.enable_grad()
    def train(self, feats: List[torch.Tensor], teacher: torch.Tensor, epochs: int,
              batch_size: int, lr: float, weight_decay: float, should_stop=None):
        """One round of distillation for every head on (feats, teacher).

        The heads share nothing, so their losses are summed and stepped by one optimiser:
        each head gets exactly its own gradient, in one Python step for all of them instead of
        one each (a learner thread that competes with many serving threads for the GIL
        finishes its round several times sooner). ``should_stop`` is polled every step; when
        it returns True the round raises ``RoundCancelled`` and the heads keep what they had.
        """
        n = teacher.shape[0]
        if n == 0:
            return
        zs, mean, std = [], list(self.mean), list(self.std)
        for i, f in enumerate(feats):
            if mean[i] is None:
                mean[i] = f.mean(0)
                std[i] = f.std(0).clamp_min(1e-3) if n > 1 else torch.ones_like(f[0])
            zs.append((f - mean[i]) / std[i])
        work = [copy.deepcopy(m).train() for m in self.models]
        # fused: one kernel per step for every parameter rather than a Python loop of small
        # ops per parameter; the demo's rounds took 2.4-2.6 s against 2.7-2.8 s, same figures
        opt = torch.optim.Adam([p for m in work for p in m.parameters()], lr=lr,
                               weight_decay=weight_decay, fused=True)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=self.gen)
            for s in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    raise RoundCancelled()
                b = perm[s:s + batch_size]
                t = teacher[b]
                loss = sum(distill_loss(m(z[b]), t) for m, z in zip(work, zs))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                time.sleep(0)   # let a waiting serving thread take the GIL between steps
        bad = [i for i, m in enumerate(work) if not all(bool(torch.isfinite(p).all())
                                                        for p in m.parameters())]
        bad += [i for i in range(len(work)) if not (bool(torch.isfinite(mean[i]).all())
                                                     and bool(torch.isfinite(std[i]).all()))]
        if bad:
            raise NonFiniteRound(f"heads {sorted(set(bad))} came out non-finite")
        # Kept whole at the end: a cancelled or non-finite round leaves no trace.
        self.models, self.mean, self.std = [m.eval() for m in work], mean, std
        self.flops += sum(3 * classifier_flops(m) * n * epochs for m in work)
        self.rows += n * epochs

    @torch.no_grad()
    def predict(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Logits of head ``i`` on raw features (standardised here)."""
        return self.models[i]((f - self.mean[i]) / self.std[i])

    def trained(self, i: int) -> bool:
        return self.mean[i] is not None

    @torch.no_grad()
    def folded(self, i: int) -> nn.Sequential:
        """Head ``i``'s classifier with the standardisation folded in: reads raw features."""
        m = copy.deepcopy(self.models[i])
        if self.mean[i] is not None:
            first = m[0]
            w = first.weight / self.std[i]
            first.bias.sub_(w @ self.mean[i])
            first.weight.copy_(w)
        return m.eval()
