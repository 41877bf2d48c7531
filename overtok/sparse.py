"""Row-sparse Over-Encoding tables: only the rows a batch touches are read, get gradients and are updated.

A dense ``nn.Embedding`` with AdamW pays for every row every step (a 9.8B-row-parameter table means a 39 GB
fp32 gradient plus two 39 GB moments, and a full pass over all of them per step). Here:

- the table (and its Adam moments) are stored in ``table_dtype`` (bf16 halves the memory of fp32);
- forward gathers the rows of the batch (one gather over the fused table of all slices); backward captures the
  gradient of exactly those rows with a tensor hook, so no dense gradient is ever allocated;
- :meth:`RowSparseTable.apply_update` coalesces duplicate ids and applies Adam to the touched rows only; on CUDA
  the trainer compiles the coalescing, gathers and arithmetic (:meth:`RowSparseTable.compile_update`;
  benchmarks/RESULTS.md, section 2).

Optimizer semantics (``model.oe.sparse_mode``, recorded in every run as the ``optimizer`` param):

- **exact**: the table follows dense AdamW's trajectory. Dense AdamW keeps moving a row after its last touch (the
  momentum tail ``m / sqrt(v)``, with both moments decaying) and decays it every step. Here a row records the step
  it is up to date with; when it is touched again after s idle steps, those s steps are replayed for that row first
  (:meth:`RowSparseTable._catch_up`: the tail for the first ``tail_steps`` of them, after which it is below float32
  resolution, then the moments' and weight decay's closed forms), and then the step's own update applies. Before an
  evaluation or a checkpoint every row is brought up to date (:meth:`RowSparseTable.flush`). Equal to dense AdamW up
  to float rounding (tests/test_sparse.py, a few hundred steps of a small model with a cosine schedule).
- **lazy**: ``torch.optim.SparseAdam``'s rule: rows absent from a step keep their values and moments; the bias
  correction uses the global step; decoupled weight decay applies to touched rows only.

In both modes the tables' gradient (duplicates summed) counts in gradient clipping with the dense parameters'
(the trainer passes the clipping factor as ``grad_scale``), and bfloat16 storage rounds every new row value
stochastically (:func:`stochastic_round`), so updates below half an ulp still move a row in expectation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RowSparseTable(nn.Module):
    def __init__(self, num_rows: int, width: int, dtype: str = "float32", mode: str = "lazy"):
        super().__init__()
        if mode not in ("lazy", "exact"):
            raise ValueError(f"sparse mode must be 'lazy' or 'exact', got {mode!r}")
        self.mode = mode
        dt = DTYPES[dtype]
        # a Parameter (so it is counted and saved) that autograd never sees
        self.weight = nn.Parameter(torch.empty(num_rows, width, dtype=dt), requires_grad=False)
        self.register_buffer("exp_avg", torch.zeros(num_rows, width, dtype=dt))
        self.register_buffer("exp_avg_sq", torch.zeros(num_rows, width, dtype=dt))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._adam = adam_rows
        if mode == "exact":
            # the step each row is up to date with, and per global step i: (lr_i, sum_{j<=i} log(1 - lr_j wd_j))
            self.register_buffer("last", torch.zeros(num_rows, dtype=torch.int32))
            self.register_buffer("hist", torch.zeros(1024, 2, dtype=torch.float64))
            self._hp: tuple[float, float, float, float] | None = None  # (beta1, beta2, eps, weight_decay) in use

    def reset_parameters(self, std: float = 0.02) -> None:
        with torch.no_grad():
            self.weight.normal_(0, std) if std > 0 else self.weight.zero_()  # in place for bf16 storage too

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        hist = state_dict.get(prefix + "hist")
        if self.mode == "exact" and hist is not None and hist.shape != self.hist.shape:
            self.hist = torch.zeros_like(hist, device=self.hist.device)  # grown during the run it came from
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        on CUDA with ``runtime.compile``); the writes back into the table stay eager, in place."""
        self._adam = torch.compile(adam_rows)

    @property
    def update_compiled(self) -> bool:
        return self._adam is not adam_rows

    @torch.no_grad()
    def grad_sq_norm(self) -> torch.Tensor:
        """Squared norm of the table's gradient since the last update (duplicate ids summed first), as dense
        clipping would count it; 0 without pending gradients."""
        if not self._pending:
            return torch.zeros((), device=self.weight.device)
        ids, grads = self._take_pending()
        self._pending.append((ids, grads))
        return _coalesced_sq_norm(ids, grads)

    @torch.no_grad()
    def apply_update(self, lr: float, beta1: float, beta2: float, eps: float = 1e-8, weight_decay: float = 0.0,
                     grad_scale: torch.Tensor | float = 1.0) -> None:
        """One optimizer step with the rows touched since the last call (sums over micro-batches and duplicate ids),
        their gradient multiplied by ``grad_scale`` (the clipping factor). Exact mode counts a step without touched
        rows too; lazy mode only counts steps with pending gradients, as it always has."""
        if not self._pending:
            if self.mode == "exact":
                self._update_rows(torch.empty(0, dtype=torch.long, device=self.weight.device),
                                  torch.empty(0, self.weight.shape[1], device=self.weight.device), lr, beta1, beta2,
                                  eps, weight_decay)
            return
        ids, grads = self._take_pending()
        if not (isinstance(grad_scale, float) and grad_scale == 1.0):
            grads = grads.float() * grad_scale
        self._update_rows(ids, grads, lr, beta1, beta2, eps, weight_decay)

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
        if self.mode == "exact":
            self._record(lr, beta1, beta2, eps, weight_decay)
        if ids.numel() == 0:
            return
        if self.mode == "exact":
            self._catch_up(torch.unique(ids), int(self.step) - 1)
        lr_t = torch.full((), lr, device=ids.device)  # a tensor: a new lr each step never recompiles
        rows, p, m, v = self._adam(self.weight, self.exp_avg, self.exp_avg_sq, ids, grads, self.step, lr_t,
                                   beta1, beta2, eps, weight_decay)
        self.exp_avg[rows] = m
        self.exp_avg_sq[rows] = v
        self.weight[rows] = stochastic_round(p, self.weight.dtype, self.step * 2, rows)
        if self.mode == "exact":
            self.last[rows] = int(self.step)

    # ------------------------------------------------------------------------------------------
    # exact mode: replaying idle steps

    def _record(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """Keep step t's learning rate and the running log of weight decay's factors (one row per step)."""
        hp = (beta1, beta2, eps, weight_decay)
        if self._hp is not None and hp[:3] != self._hp[:3]:
            raise ValueError("exact row-sparse Adam needs the same betas and eps at every step")
        self._hp = hp
        t = int(self.step)
        if t >= self.hist.shape[0]:
            grown = torch.zeros(2 * t, 2, dtype=torch.float64, device=self.hist.device)
            grown[: self.hist.shape[0]] = self.hist
            self.hist = grown
        decay = math.log1p(-lr * weight_decay) if weight_decay else 0.0
        self.hist[t, 0] = lr
        self.hist[t, 1] = self.hist[t - 1, 1] + decay

    def tail_steps(self) -> int:
        """Idle steps replayed one by one: past them the momentum tail ``(beta1 / sqrt(beta2))^j`` is below 1e-10 of
        the row's last update; the moments and weight decay then follow in closed form."""
        beta1, beta2 = self._hp[:2]
        r = beta1 / math.sqrt(beta2)
        return 4096 if r >= 1 else max(1, min(4096, math.ceil(math.log(1e-10) / math.log(r))))

    @torch.no_grad()
    def _catch_up(self, rows: torch.Tensor, upto: int) -> None:
        """Bring ``rows`` (distinct) from their ``last`` step to step ``upto`` as dense AdamW would have moved them
        with zero gradients: per idle step i, ``p *= 1 - lr_i wd``, then ``p -= lr_i m_hat / (sqrt(v_hat) + eps)``
        with both moments decayed one step; the first ``tail_steps`` idle steps one by one (rows sorted by idle
        length, so each step touches only the rows still idle then), the rest in closed form."""
        if self._hp is None or rows.numel() == 0:
            return
        beta1, beta2, eps, wd = self._hp
        last = self.last[rows].long()
        idle = upto - last
        keep = idle > 0
        rows, last, idle = rows[keep], last[keep], idle[keep]
        if rows.numel() == 0:
            return
        idle, order = idle.sort(descending=True)
        rows, last = rows[order], last[order]
        p, m, v = (t[rows].float() for t in (self.weight, self.exp_avg, self.exp_avg_sq))
        K = self.tail_steps()
        counts = (idle.unsqueeze(0) >= torch.arange(1, min(int(idle[0]), K) + 1, device=idle.device)
                  .unsqueeze(1)).sum(1).tolist()  # rows idle for at least j steps, j = 1..
        lr_hist, log_decay = self.hist[:, 0], self.hist[:, 1]
        for j, n in enumerate(counts, start=1):
            i = last[:n] + j  # global step replayed
            lr = lr_hist[i].float().unsqueeze(1)
            m[:n] *= beta1
            v[:n] *= beta2
            bc1 = (1 - beta1 ** i.double()).float().unsqueeze(1)
            bc2 = (1 - beta2 ** i.double()).float().unsqueeze(1)
            if wd:
                p[:n] *= 1 - lr * wd
            p[:n] -= lr / bc1 * m[:n] / ((v[:n] / bc2).sqrt() + eps)
        rest = (idle - K).clamp(min=0)  # idle steps past the tail: moments and weight decay in closed form
        far = rest > 0
        if bool(far.any()):
            r = rest[far].double()
            m[far] *= (beta1**r).float().unsqueeze(1)
            v[far] *= (beta2**r).float().unsqueeze(1)
            if wd:
                p[far] *= (log_decay[upto] - log_decay[last[far] + K]).exp().float().unsqueeze(1)
        self.weight[rows] = stochastic_round(p, self.weight.dtype, upto * 2 + 1, rows)
        self.exp_avg[rows] = m.to(self.exp_avg.dtype)
        self.exp_avg_sq[rows] = v.to(self.exp_avg_sq.dtype)
        self.last[rows] = upto

    @torch.no_grad()
    def flush(self, chunk: int = 1 << 18) -> None:
        """Exact mode: bring every row up to the current step (before evaluation and checkpoints, so what is read or
        saved is what dense AdamW would hold). Rows are processed in chunks to bound memory. Lazy mode: nothing."""
        if self.mode != "exact" or self._hp is None:
            return
        upto = int(self.step)
        stale = (self.last < upto).nonzero()[:, 0]
        for lo in range(0, stale.numel(), chunk):
            self._catch_up(stale[lo : lo + chunk], upto)

    def zero_pending(self) -> None:
        self._pending.clear()


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, salt: torch.Tensor | int = 0,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``x`` in ``dtype``: bfloat16 rounded stochastically (up with probability equal to the distance to the
    lower neighbour over the gap, so the rounding is unbiased: E[round(x)] = x); other dtypes by a plain cast.

    The random bits are a hash of each element's identity (its table row, given as ``rows`` for the rows of a 2-D
    ``x``, and column; else its position in ``x``) and ``salt`` (the table's step), not draws from a torch generator:
    an update rounds the same way in every run, on every rank and after a resume, a row written twice in one update
    gets the same value both times, and no RNG stream is consumed.
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.float().contiguous().view(torch.int32)
    if rows is not None:
        idx = rows.long()[:, None] * bits.shape[1] + torch.arange(bits.shape[1], device=bits.device)
    else:
        idx = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64).view(bits.shape)
    z = (idx ^ ((salt * 0x9E3779B1) & 0xFFFFFFFF)) & 0xFFFFFFFF  # a 32-bit hash of (position, salt), in int64
    z = (((z >> 16) ^ z) * 0x45D9F3B) & 0xFFFFFFFF
    z = (((z >> 16) ^ z) * 0x45D9F3B) & 0xFFFFFFFF
    noise = ((z >> 16) ^ z) & 0xFFFF
    return ((bits.long() + noise) & -65536).to(torch.int32).view(torch.float32).to(torch.bfloat16)


def _coalesced_sq_norm(ids: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Squared norm of the gradient with duplicate ids summed."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    g = torch.zeros(uniq.numel(), grads.shape[1], device=grads.device, dtype=torch.float32)
    g.index_add_(0, inverse, grads.float())
    return (g * g).sum()


def adam_rows(weight, exp_avg, exp_avg_sq, ids, grads, step, lr, beta1: float, beta2: float, eps: float,
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
    return rows, p, m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)
