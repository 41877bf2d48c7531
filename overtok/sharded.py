"""Row-sharded Over-Encoding tables (paper sec. 3.3): the fused table is split row-wise over the ranks of a
process group, so the input vocabulary grows with the number of GPUs instead of being bounded by one.

Each rank holds rows ``[rank * R, (rank + 1) * R)`` of the table (R = ceil(rows / world)). A lookup is two
all-to-all exchanges: every rank sends the ids it needs to their owners (ids sorted by owner, counts exchanged
first), the owners gather those rows and send them back. The backward pass sends each gradient row to the owner
of its id, which sums them into its shard's gradient (duplicates add up, as in ``nn.Embedding``). The result and
the shard gradients equal the unsharded lookup exactly (tests/test_sharded.py: 2 and 3 gloo processes, and NCCL
on two GPUs).
Reading the counts on the host costs a GPU sync per lookup; sending every owner a padded slot as large as the
lookup instead (equal parts, no sync) was tried and was slower.

Used by the trainer when ``model.oe.shard`` is on in a data-parallel run (``overtok/train.py``): DDP leaves the
shards alone, shard gradients are divided by the world size (DDP's mean), clipping uses the global norm, every
rank evaluates and samples in lockstep (each lookup is a collective), and each rank > 0 checkpoints its own rows
and optimizer state next to rank 0's file. The table's initial values do not depend on the number of shards
(``model.init_table_rows``). Ids are not deduplicated before sending.

With ``model.oe.sparse_update`` as well, the shards are row-sparse (``ShardedRowSparseTable``): the same two
all-to-alls per lookup, no dense shard gradient, and lazy Adam on the rows a step touched (overtok/sparse.py), run
by each row's owner on the gradient rows every rank sends it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from overtok.sparse import RowSparseTable, adam_rows


def _exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


def _shard_range(num_rows: int, group) -> tuple[int, int, int]:
    """(rows per rank, first row, end row) of this rank's shard: rows [rank * R, (rank + 1) * R), R = ceil(rows / world)."""
    rows_per_rank = -(-num_rows // dist.get_world_size(group))
    lo = min(dist.get_rank(group) * rows_per_rank, num_rows)
    return rows_per_rank, lo, min(lo + rows_per_rank, num_rows)


def _fetch_rows(flat_ids: torch.Tensor, shard: torch.Tensor, rows_per_rank: int, group):
    """The rows of global ids ``flat_ids`` from their owners' shards, in the ids' order; plus what the backward
    pass or the update needs to send gradients the same way: (rows, order, counts, local ids asked of this shard)."""
    owner = torch.div(flat_ids, rows_per_rank, rounding_mode="floor")
    order = torch.argsort(owner, stable=True)
    send_counts_t = torch.bincount(owner, minlength=dist.get_world_size(group))
    recv_counts_t = torch.empty_like(send_counts_t)
    dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
    wanted = _exchange(flat_ids[order], send_counts, recv_counts, group)  # ids other ranks need from this shard
    local = wanted - dist.get_rank(group) * rows_per_rank
    rows_sorted = _exchange(shard[local], recv_counts, send_counts, group)
    rows = torch.empty_like(rows_sorted)
    rows[order] = rows_sorted
    return rows, order, (send_counts, recv_counts), local


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, shard: torch.Tensor, rows_per_rank: int, group) -> torch.Tensor:
        out, order, counts, local = _fetch_rows(ids.reshape(-1), shard, rows_per_rank, group)
        ctx.save_for_backward(order, local)
        ctx.counts, ctx.group, ctx.shard_shape = counts, group, shard.shape
        return out.view(*ids.shape, shard.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, local = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        g = grad.reshape(-1, grad.shape[-1])[order]
        g_owned = _exchange(g, send_counts, recv_counts, ctx.group)
        grad_shard = torch.zeros(ctx.shard_shape, dtype=grad.dtype, device=grad.device)
        grad_shard.index_add_(0, local, g_owned)
        return None, grad_shard, None, None


class ShardedTable(nn.Module):
    """This rank's rows of a (num_rows, width) table; ``forward(ids)`` takes global row ids (any shape)."""

    def __init__(self, num_rows: int, width: int, group=None):
        super().__init__()
        self.group, self.num_rows = group, num_rows
        self.rows_per_rank, self.lo, self.hi = _shard_range(num_rows, group)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, width))  # filled by model.init_table_rows

    @classmethod
    def from_full(cls, full: torch.Tensor, group=None) -> ShardedTable:
        """This rank's shard of a full table (tests, and converting an unsharded checkpoint)."""
        t = cls(full.shape[0], full.shape[1], group)
        with torch.no_grad():
            t.weight.copy_(full[t.lo : t.hi])
        return t

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _ShardedLookup.apply(ids, self.weight, self.rows_per_rank, self.group)


class ShardedRowSparseTable(RowSparseTable):
    """This rank's rows of a row-sparse (num_rows, width) table (bf16 storage possible, lazy Adam: overtok/sparse.py);
    ``forward(ids)`` takes global row ids. A lookup fetches rows from their owners (two all-to-alls) and, with
    autograd on, keeps its routing (the order, the counts, the local ids this shard served); the rows' gradient is
    captured by a hook as in ``RowSparseTable``. ``grad_sq_norm`` and ``apply_update`` send every lookup's gradient
    rows back the way their rows came (one all-to-all per lookup, no new routing: no host sync), divide them by the
    world size (the mean over ranks, as DDP averages the replicated gradients); ``grad_sq_norm`` sums the squared
    norm over the shards (gradient clipping counts the table as a dense one) and ``apply_update`` applies lazy Adam
    to the owner's touched rows.
    Lookups are collectives, so every rank makes the same number; ``apply_update`` is one too and counts as one
    optimizer step on every rank: call it once per step on every rank, after the backward of every lookup made
    with autograd on since the last call."""

    def __init__(self, num_rows: int, width: int, dtype: str = "float32", mode: str = "lazy", group=None):
        rows_per_rank, lo, hi = _shard_range(num_rows, group)
        super().__init__(hi - lo, width, dtype, mode)
        self.group, self.num_rows, self.rows_per_rank, self.lo, self.hi = group, num_rows, rows_per_rank, lo, hi
        self._lookups: list[dict] = []  # routing of the lookups since the last update, and their gradients

    def compile_update(self) -> None:
        """As ``RowSparseTable.compile_update``, for dynamic shapes from the start: the number of rows a shard
        receives changes every step, and a shape-specialised compile would be redone on the next one."""
        self._adam = torch.compile(adam_rows, dynamic=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, order, counts, local = _fetch_rows(ids.reshape(-1), self.weight, self.rows_per_rank, self.group)
        rows = rows.float().view(*ids.shape, self.weight.shape[1])
        if torch.is_grad_enabled():
            lookup = {"order": order, "counts": counts, "local": local, "grad": None}
            self._lookups.append(lookup)
            rows.requires_grad_(True)
            rows.register_hook(lambda g: lookup.update(grad=g.reshape(-1, g.shape[-1])))
        return rows

    @torch.no_grad()
    def _route_back(self) -> None:
        """Send the gradient rows of the lookups since the last call to the rows' owners (one all-to-all per lookup,
        a collective) and keep what this shard received, divided by the world size, as its pending gradient."""
        lookups, self._lookups = self._lookups, []
        for lk in lookups:
            g = lk["grad"]
            if g is None:
                if lk["order"].numel():
                    raise RuntimeError("ShardedRowSparseTable.apply_update: a lookup made with autograd on has had "
                                       "no backward pass")
                g = torch.empty(0, self.weight.shape[1], device=self.weight.device)
            send_counts, recv_counts = lk["counts"]
            got = _exchange(g[lk["order"]].float(), send_counts, recv_counts, self.group)
            self._pending.append((lk["local"], got / dist.get_world_size(self.group)))

    @torch.no_grad()
    def grad_sq_norm(self) -> torch.Tensor:
        """Squared norm of the whole table's rank-averaged gradient (duplicate ids summed), over every shard: a
        collective, so every rank calls it or none."""
        self._route_back()
        sq = super().grad_sq_norm()
        dist.all_reduce(sq, group=self.group)
        return sq

    @torch.no_grad()
    def apply_update(self, lr: float, beta1: float, beta2: float, eps: float = 1e-8, weight_decay: float = 0.0,
                     grad_scale: torch.Tensor | float = 1.0) -> None:
        self._route_back()
        if self._pending:
            ids, grads = self._take_pending()
            grads = grads * grad_scale
        else:
            ids = torch.empty(0, dtype=torch.long, device=self.weight.device)
            grads = torch.empty(0, self.weight.shape[1], device=self.weight.device)
        self._update_rows(ids, grads, lr, beta1, beta2, eps, weight_decay)


def leave_group_together(done_file: str, rank: int, world: int) -> None:
    """Leave the default process group once every rank has got here, checked through a file store of its own (no
    collective). A rank that tears gloo down while a peer still finishes a collective with it can abort that peer
    (SIGABRT, "terminate called without an active exception", seen once in CI). For process groups started by hand
    (tests, benchmarks); Ray Train ends its workers' groups itself."""
    done = dist.FileStore(done_file, world)
    done.set(f"rank{rank}", "done")
    done.wait([f"rank{r}" for r in range(world)])
    dist.destroy_process_group()
