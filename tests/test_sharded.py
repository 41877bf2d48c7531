"""Row-sharded OE tables over real gloo process groups (2 and 3 processes): lookups and gradients equal the
unsharded table exactly, for the hashed ids of a real OverEncoding."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_config


def _worker(rank: int, world: int, init_file: str, n_rows_override: int | None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from overtok.model import OverEncoding
        from overtok.sharded import ShardedTable

        cfg = tiny_config(**{"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1009})
        torch.manual_seed(0)  # the same full table everywhere
        oe = OverEncoding(cfg.model)
        full = oe.tables.weight.detach().clone()
        if n_rows_override:  # a row count that does not divide by the world size
            full = torch.randn(n_rows_override, full.shape[1])
        table = ShardedTable.from_full(full, None)
        assert table.weight.shape[0] <= -(-full.shape[0] // world)

        g = torch.Generator().manual_seed(100 + rank)  # every rank looks up different ids
        tokens = torch.randint(0, cfg.model.vocab_size, (3, 17), generator=g)
        ids = oe.slice_ids(tokens) if not n_rows_override else torch.randint(0, full.shape[0], (5, 7, 2), generator=g)
        rows = table(ids)
        assert torch.equal(rows, full[ids]), "sharded lookup differs from the full table"

        upstream = torch.randn(rows.shape, generator=g)
        (rows * upstream).sum().backward()
        ref = full.clone().requires_grad_(True)
        (ref[ids] * upstream).sum().backward()
        ref_grad = ref.grad.clone()
        dist.all_reduce(ref_grad)  # the full table's gradient from every rank's batch
        assert torch.allclose(table.weight.grad, ref_grad[table.lo : table.hi], atol=1e-6), "shard gradient differs"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,rows", [(2, None), (3, None), (3, 1000)])
def test_sharded_lookup_and_gradients_equal_the_full_table(tmp_path, world, rows):
    init_file = str(tmp_path / "store")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(world, init_file, rows), nprocs=world, join=True)
