"""Device-side bookkeeping of the training steps: logged loss sums and the first non-finite value, with no
host synchronisation in a step.

Each step hands :meth:`StepLog.record` its loss terms (per micro-batch: the raw value, the value times its
weight, the weighted total) and the gradients. On the device, the log

- adds the step's logged values (term means over micro-batches, and the total ``loss``) to float64
  accumulators (the same float64 sums the host used to make, so the logged numbers are unchanged);
- checks every value, and the gradients (GradScaler's multi-tensor check), for finiteness and keeps the first failure of the epoch as one float64
  *key* ``(step · codes + code) · 3 + kind`` (``code``: which value, ``kind``: nan, +inf or -inf), the
  minimum over all failures, so a later failure never hides an earlier one; under DDP the key is
  all-reduced (MIN) every step (a collective, not a host sync), so all ranks agree;
- makes the optimiser step conditional on the device: it sets the optimiser's ``found_inf`` (the fused
  optimisers' AMP mechanism, :class:`torch.amp.GradScaler` uses the same), so a step whose values or
  gradients are not all finite, and every step after it, changes no parameter and no moment estimate or step
  count (a skipped first step of SGD with momentum leaves its buffers allocated but unwritten; the run stops).

:meth:`StepLog.read` copies everything to the host in one transfer (the only sync: every ``sync_every``
steps and at the end of each epoch), averages over DDP ranks, and raises :class:`NonFiniteLossError` naming
the first non-finite term, epoch and step (``sync_every`` bounds how many skipped steps run before it).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the total loss, or a gradient) became NaN or infinite."""


_KINDS = ("nan", "inf", "-inf")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StepLog:
    """Accumulators and finiteness record of one epoch's steps, on ``device``.

    ``terms``: ``[(name, weight)]`` of the active loss terms in evaluation order; ``chunks``: micro-batches
    per step; ``run``: the run's name (for error messages).
    """

    def __init__(self, terms: Sequence[tuple[str, float]], chunks: int, device: torch.device, run: str = "run"):
        self.names = [name for name, _ in terms] + ["loss"]
        self.chunks, self.device, self.run = chunks, torch.device(device), run
        # what each checked value is, in the order of `record`'s `checks`
        labels = []
        for _ in range(chunks):
            labels += [f"loss term {name!r} is {{}}" for name, _ in terms]
            labels += [f"loss term {name!r} times its weight {weight:g} is {{}}" for name, weight in terms]
            labels.append("the total loss is {} (every weighted term finite)")
        labels.append("a gradient of the loss is not finite (every loss term finite)")
        self.labels = labels
        self._codes = torch.arange(len(labels), device=self.device, dtype=torch.float64) * 3
        self._one = torch.ones((), device=self.device)
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Zero the accumulators and the failure record (a failure always raises before the epoch ends)."""
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.failure = torch.full((), math.inf, dtype=torch.float64, device=self.device)
        self.steps = 0

    def record(self, step: int, terms: list[list[torch.Tensor]], weighted: list[list[torch.Tensor]],
               totals: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """Add one step (``terms[i][k]``: term k of micro-batch i, float32 0-dim; ``weighted`` likewise; ``totals[i]``
        the weighted sum) and check it; returns ``found_inf`` (float 0-dim, 1.0 once anything was non-finite)."""
        logged = torch.stack([torch.stack(list(t) + [total]) for t, total in zip(terms, totals)]).double()
        self.sums += (logged / self.chunks).sum(0)
        checks = []
        for t, w, total in zip(terms, weighted, totals):
            checks += list(t) + list(w) + [total]
        values = torch.stack(checks + [self._gradient_check(grads)]).double()
        kind = torch.where(torch.isnan(values), 0.0, torch.where(values > 0, 1.0, 2.0))
        keys = torch.where(torch.isfinite(values), math.inf, self._codes + kind + step * 3.0 * len(self.labels))
        torch.minimum(self.failure, keys.min(), out=self.failure)
        if _distributed():
            dist.all_reduce(self.failure, op=dist.ReduceOp.MIN)
        self.steps += 1
        return torch.isfinite(self.failure).float()

    def _gradient_check(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """0, or nan if any gradient element is not finite: GradScaler's multi-tensor check (unscale by 1, exact;
        one read and write of the gradients, no false alarm for large finite values)."""
        found = torch.zeros((), device=self.device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, self._one)
        return torch.where(found > 0, math.nan, 0.0)

    def guarded_step(self, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        """``optimizer.step()``, a no-op on the device where ``found_inf`` is 1 (fused optimisers only)."""
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise TypeError("StepLog.guarded_step needs a fused optimiser (fused=True): it skips steps on the device")
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def read(self, epoch: int) -> dict[str, float]:
        """The means so far of this epoch's logged values (``{name: mean}``, averaged over DDP ranks); one host
        sync. Raises :class:`NonFiniteLossError` if any step of the epoch had a non-finite value."""
        sums = self.sums
        if _distributed():
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        host = torch.cat([sums, self.failure.view(1)]).tolist()
        failure = host[-1]
        if math.isfinite(failure):
            raise NonFiniteLossError(self.describe(int(failure), epoch))
        return {name: value / max(self.steps, 1) for name, value in zip(self.names, host[:-1])}

    def describe(self, key: int, epoch: int) -> str:
        """The message of failure ``key``: what was non-finite, where."""
        step, rest = divmod(key, 3 * len(self.labels))
        code, kind = divmod(rest, 3)
        what = self.labels[code].format(_KINDS[kind])
        return (f"{what} at epoch {epoch}, step {step} (run {self.run!r}); no optimiser step was taken with it. "
                f"Lower the learning rate or the term's weight, or check the inputs")

