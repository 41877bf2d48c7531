"""Row-sharded Over-Encoding tables (paper sec. 3.3): the fused table is split row-wise over the ranks of a
process group, so the input vocabulary grows with the number of GPUs instead of being bounded by one.

Each rank holds rows ``[rank * R, (rank + 1) * R)`` of the table (R = ceil(rows / world)). A lookup is two
all-to-all exchanges: every rank sends the ids it needs to their owners (ids sorted by owner, counts exchanged
first), the owners gather those rows and send them back. The backward pass sends each gradient row to the owner
of its id, which sums them into its shard's gradient (duplicates add up, as in ``nn.Embedding``). The result and
the shard gradients equal the unsharded lookup exactly (tests/test_sharded.py runs 2 and 3 gloo processes).

Used by the trainer when ``model.oe.shard`` is on in a data-parallel run (``overtok/train.py``): DDP leaves the
shards alone, shard gradients are divided by the world size (DDP's mean), clipping uses the global norm, every
rank evaluates and samples in lockstep (each lookup is a collective), and each rank > 0 checkpoints its own rows
and optimizer state next to rank 0's file. The table's initial values do not depend on the number of shards
(``model.init_table_rows``). Ids are not deduplicated before sending.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, shard: torch.Tensor, rows_per_rank: int, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        flat = ids.reshape(-1)
        owner = torch.div(flat, rows_per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts_t = torch.bincount(owner, minlength=world)
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        wanted = _exchange(flat[order], send_counts, recv_counts, group)  # ids other ranks need from this shard
        local = wanted - dist.get_rank(group) * rows_per_rank
        rows_sorted = _exchange(shard[local], recv_counts, send_counts, group)
        out = torch.empty_like(rows_sorted)
        out[order] = rows_sorted
        ctx.save_for_backward(order, local)
        ctx.counts, ctx.group, ctx.shard_shape = (send_counts, recv_counts), group, shard.shape
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
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_rows = num_rows
        self.rows_per_rank = -(-num_rows // world)
        self.lo = min(rank * self.rows_per_rank, num_rows)
        self.hi = min(self.lo + self.rows_per_rank, num_rows)
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
