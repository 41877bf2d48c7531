"""Data parallelism over real gloo process groups (2 and 3 processes): row-sharded OE tables (lookups and gradients
equal the unsharded table exactly, for the hashed ids of a real OverEncoding) and the trainer's DDP wrapper. The
table-level tests run over NCCL too where a machine has two GPUs (marked gpu, skipped elsewhere)."""

import contextlib
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overtok.sharded import leave_group_together
from tests.conftest import tiny_config

NCCL_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                   reason="needs two CUDA devices")]


def nccl(*values):
    """A parameter row run over NCCL on two GPUs (skipped elsewhere)."""
    return pytest.param(*values, "nccl", marks=NCCL_MARKS, id="-".join(map(str, values)) + "-nccl")


@contextlib.contextmanager
def _group(rank: int, world: int, run_dir: str, backend: str = "gloo"):
    """Join the process group for a worker's body and yield the device this rank's tensors live on (its own GPU
    under NCCL). After a body that ran through, leave the group once every rank's has (``leave_group_together``). A
    body that raised leaves without either; mp.spawn then ends the other ranks."""
    dev = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = torch.device(f"cuda:{rank}")
    dist.init_process_group(backend, init_method=f"file://{run_dir}/store", rank=rank, world_size=world)
    yield dev
    leave_group_together(f"{run_dir}/done", rank, world)


def _spawn(worker, tmp_path, *args, world: int = 2):
    """Run ``worker(rank, world, run_dir, *args)`` in ``world`` processes; the group meets through a file in
    ``run_dir``, a fresh folder under ``tmp_path``, which is returned. If a rank died by a signal rather than by a
    failed check, run the whole group once more in a new folder (gloo's teardown aborts, rarely, under load) and
    say so; a second death, or any exception, fails the test."""
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        try:
            mp.spawn(worker, args=(world, str(run_dir), *args), nprocs=world, join=True)
            return run_dir
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt:
                raise
            warnings.warn(f"rank {e.error_index} died by {e.signal_name}; running the group once more", stacklevel=2)


def _worker(rank: int, world: int, run_dir: str, n_rows_override: int | None, backend: str):
    with _group(rank, world, run_dir, backend) as dev:
        from overtok.model import OverEncoding
        from overtok.sharded import ShardedTable

        cfg = tiny_config(**{"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1009})
        torch.manual_seed(0)  # the same full table everywhere
        oe = OverEncoding(cfg.model)
        full = oe.tables.weight.detach().clone()
        if n_rows_override:  # a row count that does not divide by the world size
            full = torch.randn(n_rows_override, full.shape[1])
        full = full.to(dev)
        with torch.device(dev):
            table = ShardedTable.from_full(full, None)
        assert table.weight.shape[0] <= -(-full.shape[0] // world)

        g = torch.Generator().manual_seed(100 + rank)  # every rank looks up different ids
        tokens = torch.randint(0, cfg.model.vocab_size, (3, 17), generator=g)
        ids = oe.slice_ids(tokens) if not n_rows_override else torch.randint(0, full.shape[0], (5, 7, 2), generator=g)
        ids = ids.to(dev)
        rows = table(ids)
        assert torch.equal(rows, full[ids]), "sharded lookup differs from the full table"

        upstream = torch.randn(rows.shape, generator=g).to(dev)
        (rows * upstream).sum().backward()
        ref = full.clone().requires_grad_(True)
        (ref[ids] * upstream).sum().backward()
        ref_grad = ref.grad.clone()
        dist.all_reduce(ref_grad)  # the full table's gradient from every rank's batch
        assert torch.allclose(table.weight.grad, ref_grad[table.lo : table.hi], atol=1e-6), "shard gradient differs"


@pytest.mark.parametrize("world,rows,backend", [(2, None, "gloo"), (3, None, "gloo"), (3, 1000, "gloo"),
                                                nccl(2, None), nccl(2, 1001)])
def test_sharded_lookup_and_gradients_equal_the_full_table(tmp_path, world, rows, backend):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _spawn(_worker, tmp_path, rows, backend, world=world)


def _sparse_worker(rank: int, world: int, run_dir: str, compiled: bool, backend: str):
    with _group(rank, world, run_dir, backend) as dev:
        from torch._dynamo.utils import counters

        from overtok.model import init_table_rows
        from overtok.sharded import ShardedRowSparseTable
        from overtok.sparse import RowSparseTable

        rows, width, seed = 1009, 8, 1234
        with torch.device(dev):
            full = RowSparseTable(rows, width)  # the whole table, updated from every rank's gradients
            table = ShardedRowSparseTable(rows, width)
        init_table_rows(full.weight, 0, seed)
        init_table_rows(table.weight, table.lo, seed)
        if compiled:  # as the trainer on CUDA; the rows a shard receives differ in number every step
            table.compile_update()
            counters.clear()
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(3):
            looks = not (step == 1 and rank == 0)  # at step 1 rank 0 looks nothing up (the update still runs)
            ids = torch.randint(0, rows, (3, 5, 2), generator=g) if looks else torch.zeros(0, 5, 2, dtype=torch.long)
            upstream = torch.randn(*ids.shape, width, generator=g)
            ids, upstream = ids.to(dev), upstream.to(dev)
            if looks:
                got = table(ids)
                want = full.weight[ids]  # compiled arithmetic may round differently from the eager reference
                same = torch.allclose(got, want, rtol=0, atol=1e-6) if compiled else torch.equal(got, want)
                assert same, f"step {step}: sharded lookup differs from the full table"
                (got * upstream).sum().backward()
            else:
                table(ids)  # a lookup of no ids is still a collective
            # the reference: every rank's (ids, gradient rows), averaged over the ranks, one lazy-Adam step
            every = [None] * world  # (CPU tensors: a pickled CUDA tensor would come back on its sender's device)
            dist.all_gather_object(every, (ids.reshape(-1).cpu(), upstream.reshape(-1, width).cpu()))
            full._pending.append((torch.cat([i for i, _ in every]).to(dev), torch.cat([u for _, u in every]).to(dev) / world))
            scale = 1.0
            if step != 1:  # clipping's norm: over every shard, the whole table's as dense clipping counts it
                sq, want = table.grad_sq_norm(), full.grad_sq_norm()
                assert torch.allclose(sq, want, rtol=1e-5), f"step {step}: squared norm {sq} != whole table's {want}"
                scale = 0.5 if step == 2 else 1.0  # a clipping factor reaches every shard's update
            table.apply_update(1e-2, 0.9, 0.95, weight_decay=0.1, grad_scale=scale)
            full.apply_update(1e-2, 0.9, 0.95, weight_decay=0.1, grad_scale=scale)
            lo, hi = table.lo, table.hi
            for name in ("weight", "exp_avg", "exp_avg_sq"):
                mine, ref = getattr(table, name), getattr(full, name)[lo:hi]
                assert torch.allclose(mine, ref, rtol=0, atol=1e-6), f"step {step}: {name} differs from the full table"
            assert int(table.step) == int(full.step) == step + 1
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1, "the compiled row update was recompiled"
        table(torch.randint(0, rows, (2, 3), generator=g).to(dev))  # looked up with autograd on, never backpropagated
        with pytest.raises(RuntimeError, match="no backward pass"):
            table.apply_update(1e-2, 0.9, 0.95)


def _ddp_buffers_worker(rank: int, world: int, run_dir: str):
    with _group(rank, world, run_dir):
        from overtok.engine import shard_state, wrap_ddp
        from overtok.model import Transformer

        cfg = tiny_config(**{"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1009, "model.oe.shard": True,
                             "model.oe.sparse_update": True})
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        table = model.embed.tables
        _, ignore = shard_state(model)
        with torch.no_grad():
            table.exp_avg.fill_(rank + 1)  # this rank's own moments
        ddp = wrap_ddp(model, cfg, torch.device("cpu"), ignore)  # DDP broadcasts rank 0's state here ...
        ddp(torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1)))  # ... and its buffers every forward
        assert (table.exp_avg == rank + 1).all(), "DDP overwrote a shard's Adam moments with rank 0's"


def test_ddp_leaves_each_row_sparse_shard_its_own_moments(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _spawn(_ddp_buffers_worker, tmp_path)


@pytest.mark.parametrize("world,compiled,backend", [(2, False, "gloo"), (3, False, "gloo"), (2, True, "gloo"),
                                                    nccl(2, False), nccl(2, True)])
def test_sharded_row_sparse_table_updates_like_the_full_table(tmp_path, world, compiled, backend):
    """Row-sparse shards (lazy Adam run by each row's owner on the gradient rows every rank sends it) give the rows,
    moments and step count of the whole row-sparse table updated with every rank's averaged gradients; the compiled
    update too, compiled once for every number of rows."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _spawn(_sparse_worker, tmp_path, compiled, backend, world=world)


def _train_worker(rank: int, world: int, out_dir: str):
    import json

    with _group(rank, world, out_dir):
        from torch.nn.parallel import DistributedDataParallel as DDP

        from overtok.engine import shard_state, wrap_ddp
        from overtok.model import Transformer
        from overtok.optim import clip_sharded, clip_with_tables
        from overtok.tracking import MemorySink
        from overtok.train import train

        # one step's gradients: shard = the DDP-averaged whole-table gradient's rows; the same global norm
        grads = {}
        for name, shard in (("whole", False), ("sharded", True)):
            cfg = tiny_config(**{"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1009, "model.oe.shard": shard})
            torch.manual_seed(0)
            model = Transformer(cfg.model)
            if shard:
                DDP._set_params_and_buffers_to_ignore_for_model(model, ["embed.tables.weight"])
            ddp = DDP(model)
            tok = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(rank))
            ddp(tok)[1]["total"].backward()
            if shard:
                norm = clip_sharded(model, [model.embed.tables.weight], world, 0.0)
                lo, hi = model.embed.tables.lo, model.embed.tables.hi
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            grads[name] = (model.embed.tables.weight.grad.clone(), float(norm))
        assert torch.allclose(grads["sharded"][0], grads["whole"][0][lo:hi], atol=1e-7), "shard gradient != DDP average"
        assert abs(grads["sharded"][1] - grads["whole"][1]) < 1e-5 * grads["whole"][1], (grads["sharded"][1], grads["whole"][1])
        # row-sparse shards: clipping counts them in the global norm too (an fp32 table, so the same number)
        cfg = tiny_config(**{"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1009, "model.oe.shard": True,
                             "model.oe.sparse_update": True})
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        ddp = wrap_ddp(model, cfg, torch.device("cpu"), shard_state(model)[1])
        tok = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(rank))
        ddp(tok)[1]["total"].backward()
        norm, _ = clip_with_tables(model, model.sparse_tables(), float("inf"))
        assert abs(float(norm) - grads["whole"][1]) < 1e-5 * grads["whole"][1], (float(norm), grads["whole"][1])

        results = {}
        base = {"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1009, "train.max_steps": 12, "train.eval_every": 6,
                "train.log_every": 3, "train.checkpoint_every": 6, "train.gen_samples": 4}
        sparse = {"model.oe.shard": True, "model.oe.sparse_update": True, "model.oe.table_dtype": "bfloat16"}
        for name, extra in [("whole", {}), ("sharded", {"model.oe.shard": True}),
                            ("resumed", {"model.oe.shard": True, "runtime.fail_at_step": 8}),
                            ("sparse", sparse), ("sparse_resumed", {**sparse, "runtime.fail_at_step": 8})]:
            cfg = tiny_config(**base, **extra)
            cfg.train.checkpoint_dir = f"{out_dir}/{name}"
            sink = MemorySink()
            if name.endswith("resumed"):
                try:
                    train(cfg, sink)
                except RuntimeError as e:
                    assert "fail_at_step" in str(e)
                cfg.runtime.fail_at_step = -1
                sink = MemorySink()
            train(cfg, sink)
            results[name] = sink.points
        if rank == 0:
            with open(f"{out_dir}/points.json", "w") as f:
                json.dump(results, f)


def test_data_parallel_training_with_a_sharded_table_equals_the_whole_table(tmp_path):
    """2 gloo ranks, DDP: sharding the OE table (all-to-all lookups, per-shard AdamW, global clipping) gives the
    curves of the same run with the whole table on every rank; a sharded run resumes exactly from per-rank files,
    with dense shards and with row-sparse bf16 shards (whose loss falls)."""
    import json

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out_dir = _spawn(_train_worker, tmp_path)
    pts = json.loads((out_dir / "points.json").read_text())
    whole, sharded, resumed = pts["whole"], pts["sharded"], pts["resumed"]
    sparse, sparse_resumed = pts["sparse"], pts["sparse_resumed"]
    for key in ("train/loss", "val/loss"):  # row-sparse bf16 shards: lazy Adam, so not the dense curve; it trains
        assert sparse[key].keys() == whole[key].keys(), key
        assert sparse_resumed[key] == sparse[key], key  # bitwise: resumed from per-rank files with their moments
    curve = [v for _, v in sorted(sparse["train/loss"].items(), key=lambda kv: int(kv[0]))]
    assert curve[-1] < curve[0], curve
    for key in ("train/loss", "train/grad_norm", "val/loss"):
        assert whole[key].keys() == sharded[key].keys()
        for step, v in whole[key].items():
            assert abs(v - sharded[key][step]) < 1e-4 * max(1.0, abs(v)), (key, step, v, sharded[key][step])
        assert resumed[key] == sharded[key], key  # bitwise: resumed from the step-6 checkpoint
    assert "val/gen_acc" in sharded
    assert sorted(p.name for p in (out_dir / "resumed").glob("shard_*")) == ["shard_000000006_rank1.pt",
                                                                              "shard_000000012_rank1.pt"]


def _ddp_grad_worker(rank: int, world: int, run_dir: str, backend: str):
    with _group(rank, world, run_dir, backend) as dev:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from overtok.config import RunConfig, TrainConfig
        from overtok.engine import wrap_ddp
        from overtok.model import Transformer

        cfg = tiny_config()
        grads = {}
        for name, reduce_dtype in (("plain", None), ("float32", "float32"), ("bfloat16", "bfloat16")):
            torch.manual_seed(0)
            model = Transformer(cfg.model).to(dev)
            ids = [dev.index] if dev.type == "cuda" else None
            ddp = DDP(model, device_ids=ids) if reduce_dtype is None else wrap_ddp(
                model, RunConfig(train=TrainConfig(grad_reduce_dtype=reduce_dtype)), dev, [])
            g = torch.Generator().manual_seed(rank)
            grads[name], bounds = [], []
            for _ in range(2):  # the second backward lands in gradients that were set to None (bucket views)
                tok = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=g).to(dev)
                if name == "plain":  # this rank's own gradient, for the bound on bf16 rounding: 2^-7 mean_r |g_r|
                    model.zero_grad(set_to_none=True)
                    with ddp.no_sync():
                        ddp(tok)[1]["total"].backward()
                    bound = {n: p.grad.abs() * 2**-7 / world for n, p in model.named_parameters()}
                    for b in bound.values():
                        dist.all_reduce(b)
                    bounds.append(bound)
                model.zero_grad(set_to_none=True)
                ddp(tok)[1]["total"].backward()
                grads[name].append({n: p.grad.clone() for n, p in model.named_parameters()})
            if name == "plain":
                bf16_bounds = bounds
        for step in range(2):
            plain, f32, b16 = (grads[k][step] for k in ("plain", "float32", "bfloat16"))
            for n, ref in plain.items():
                rtol = 0 if backend == "gloo" else 1e-5  # GPU backward kernels may sum in another order run to run
                assert torch.allclose(f32[n], ref, rtol=rtol, atol=1e-7), f"step {step}: {n} differs from plain DDP"
                assert ((b16[n] - ref).abs() <= bf16_bounds[step][n] + 1e-9).all(), f"step {step}: {n} beyond bf16"
            assert any(not torch.equal(b16[n], ref) for n, ref in plain.items()), "bf16 reduction left no trace"


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=NCCL_MARKS)])
def test_trainer_ddp_averages_like_plain_ddp_and_reduces_in_bf16_on_request(tmp_path, backend):
    """train's DDP wrapper (gradients as bucket views) averages exactly as plain DDP, also after the gradients were
    set to None; with train.grad_reduce_dtype = bfloat16 the average differs from it by bf16 rounding only."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _spawn(_ddp_grad_worker, tmp_path, backend)


def _accumulate_worker(rank: int, world: int, run_dir: str):
    with _group(rank, world, run_dir):
        import contextlib

        from overtok.config import RunConfig
        from overtok.engine import accumulate, wrap_ddp
        from overtok.model import Transformer

        cfg = tiny_config()
        T = cfg.model.seq_len + 1

        class Stream:  # rank r's micro-batches: what a Batches of that rank would hand out
            def __init__(self, r):
                self.g = torch.Generator().manual_seed(100 + r)

            def next(self):
                return torch.randint(0, cfg.model.vocab_size, (2, T), generator=self.g)

        torch.manual_seed(0)
        model = Transformer(cfg.model)
        ddp = wrap_ddp(model, RunConfig(), torch.device("cpu"), [])
        calls = []

        def counting_all_reduce(group, bucket):
            calls.append(bucket.index())
            flat = bucket.buffer().div_(world)
            return dist.all_reduce(flat, group=group, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_all_reduce)
        accumulate(ddp, Stream(rank).next, 1, torch.device("cpu"), contextlib.nullcontext)
        per_sync = len(calls)
        assert per_sync > 0
        model.zero_grad(set_to_none=True)
        calls.clear()
        parts = accumulate(ddp, Stream(rank).next, 3, torch.device("cpu"), contextlib.nullcontext)
        assert len(calls) == per_sync, f"3 micro-steps all-reduced {len(calls)} buckets, one synced backward {per_sync}"

        # the gradient is the mean over every rank's three micro-batches, as one process on all six would get
        ref = Transformer(cfg.model)
        ref.load_state_dict(model.state_dict())
        streams = [Stream(r) for r in range(world)]
        losses = []
        for s in streams:
            for _ in range(3):
                loss = ref(s.next())[1]["total"]
                (loss / (3 * world)).backward()
                losses.append(loss.detach())
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), f"{n}: accumulated DDP gradient differs"
        mine = torch.stack(losses[3 * rank : 3 * rank + 3]).mean()
        assert torch.allclose(parts["total"], mine, atol=1e-6), "the step's loss is not its micro-batches' mean"


def test_gradient_accumulation_all_reduces_once_per_step(tmp_path):
    """With train.grad_accum micro-steps under DDP only the last backward all-reduces (the others in no_sync), and
    the gradient still averages every rank's micro-batches."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _spawn(_accumulate_worker, tmp_path)
