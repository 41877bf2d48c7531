"""Row-sparse Over-Encoding tables: only the rows a batch touches are read, get gradients and are updated.

A dense ``nn.Embedding`` with AdamW pays for every row every step (a 9.8B-row-parameter table means a 39 GB
fp32 gradient plus two 39 GB moments, and a full pass over all of them per step). Here:

- the table (and its Adam moments) are stored in ``table_dtype`` (bf16 halves the memory of fp32);
- forward gathers the rows of the batch (one gather over the fused table of all slices); backward captures the
  gradient of exactly those rows with a tensor hook, so no dense gradient is ever allocated;
- :meth:`RowSparseTable.apply_update` coalesces duplicate ids and applies Adam to the touched rows only; on CUDA
  the trainer compiles the coalescing, gathers and arithmetic (:meth:`RowSparseTable.compile_update`; H200,
  OE-12.8M: 1.03-1.05x the step time of no OE, benchmarks/RESULTS.md).

Optimizer semantics (recorded in every run as ``optimizer``): **lazy Adam**, as ``torch.optim.SparseAdam``:
rows absent from a step keep their values and moments (dense AdamW would still move them by momentum and
decay their moments); the bias correction uses the global step; decoupled weight decay, if any, applies to
touched rows only; the table is not included in gradient clipping. With every row touched at every step and
no weight decay it equals dense AdamW (tests/test_sparse.py). ``model.oe.sparse_update: false`` keeps exact
dense AdamW.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RowSparseTable(nn.Module):
    def __init__(self, num_rows: int, width: int, dtype: str = "float32"):
        super().__init__()
        dt = DTYPES[dtype]
        # a Parameter (so it is counted and saved) that autograd never sees
        self.weight = nn.Parameter(torch.empty(num_rows, width, dtype=dt), requires_grad=False)
        self.register_buffer("exp_avg", torch.zeros(num_rows, width, dtype=dt))
        self.register_buffer("exp_avg_sq", torch.zeros(num_rows, width, dtype=dt))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._adam = _adam_rows

    def reset_parameters(self, std: float = 0.02) -> None:
        with torch.no_grad():
            self.weight.normal_(0, std)  # normal_ works in place for bf16 storage too

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., S) -> rows (..., S, w) in float32; their gradient is kept for :meth:`apply_update`."""
        rows = self.weight[ids].float()
        if torch.is_grad_enabled():
            rows.requires_grad_(True)
            flat_ids = ids.reshape(-1)
            rows.register_hook(lambda g: self._pending.append((flat_ids, g.reshape(-1, g.shape[-1]))))
        return rows

    def compile_update(self) -> None:
        """Compile the coalescing of duplicate ids, the row gathers and the Adam arithmetic (the trainer does this
        on CUDA with ``train.compile``); the writes back into the table stay eager, in place."""
        self._adam = torch.compile(_adam_rows)

    @property
    def update_compiled(self) -> bool:
        return self._adam is not _adam_rows

    @torch.no_grad()
    def apply_update(self, lr: float, beta1: float, beta2: float, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        """Lazy Adam on the rows touched since the last call (sums over micro-batches and duplicate ids)."""
        if not self._pending:
            return
        self._update_rows(*self._take_pending(), lr, beta1, beta2, eps, weight_decay)

    def _take_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (ids, gradient rows) captured since the last update, concatenated; cleared."""
        ids, grads = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*self._pending))
        self._pending.clear()
        return ids, grads

    def _update_rows(self, ids: torch.Tensor, grads: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
        """One optimizer step: the step count advances; the rows in ``ids`` (local row numbers, duplicates summed;
        none is allowed) get lazy Adam with ``grads``."""
        self.step += 1
        if ids.numel() == 0:
            return
        lr_t = torch.full((), lr, device=ids.device)  # a tensor: a new lr each step never recompiles
        rows, p, m, v = self._adam(self.weight, self.exp_avg, self.exp_avg_sq, ids, grads, self.step, lr_t,
                                   beta1, beta2, eps, weight_decay)
        self.exp_avg[rows] = m
        self.exp_avg_sq[rows] = v
        self.weight[rows] = p

    def zero_pending(self) -> None:
        self._pending.clear()


def _adam_rows(weight, exp_avg, exp_avg_sq, ids, grads, step, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float):
    """One lazy-Adam step of the rows in ``ids`` (N occurrences, duplicates allowed) with gradients ``grads``
    (N, w): returns N row indices and their new (param, exp_avg, exp_avg_sq) in the table's dtype, math in float32.

    No host sync (``torch.unique`` would wait for the GPU to learn the number of distinct rows): ids are sorted
    into segments of equal id, gradients summed per segment into N slots, and the slots past the last segment
    repeat the last one, so every returned row is either unique or carries identical values.
    """
    n = ids.numel()
    sorted_ids, perm = ids.sort()
    first = torch.ones(n, dtype=torch.bool, device=ids.device)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    seg = torch.cumsum(first, 0) - 1  # segment of each sorted occurrence
    seg_of = torch.empty_like(seg).scatter_(0, perm, seg)  # ... and of each occurrence in batch order
    g = torch.zeros(n, grads.shape[1], device=grads.device, dtype=torch.float32).index_add_(0, seg_of, grads.float())
    slot_rows = torch.zeros(n, dtype=ids.dtype, device=ids.device).scatter_(0, seg, sorted_ids)
    slot = torch.minimum(torch.arange(n, device=ids.device), seg[-1])  # slots past the last repeat it
    rows = slot_rows[slot]
    g = g[slot]
    m = exp_avg[rows].float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq[rows].float() * beta2 + g * g * (1 - beta2)
    p = weight[rows].float()
    if weight_decay:
        p = p * (1 - lr * weight_decay)
    t = step.to(torch.float32)
    p = p - lr / (1 - beta1**t) * m / ((v / (1 - beta2**t)).sqrt() + eps)
    return rows, p.to(weight.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)
