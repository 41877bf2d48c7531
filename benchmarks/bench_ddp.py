"""Where a data-parallel step loses time (issue 6, target 5), without Ray in the way: the trainer's model, optimizer,
compilation (`prepare_model`) and DDP wrapper (`wrap_ddp`) on random tokens, side by side in one call:

- "1 process": the model alone, as a 1-GPU trial runs it (CUDA graphs where the trainer uses them);
- "N processes, no sync": N ranks under DDP inside `no_sync()`: the split compiled graph and DDP's hooks, every
  rank busy at once, but no gradient leaves a GPU;
- "N processes": the real thing, gradients all-reduced while the backward runs;
- with --grad-dtypes/--bucket-mb, more synced rows with those train settings;
- with --oe-m, Over-Encoding (n 3, k 4): its table whole in 1 process vs row-sharded over N (--oe-sparse: row-sparse
  bf16 tables with lazy Adam, as paper-scale tables run on one GPU).

So 1 process -> no sync is what DDP's wrapper and N busy GPUs cost, no sync -> synced what the communication costs
(exposed all-reduce and its kernels beside the backward's). Every variant is built side by side in
the same processes and timed in rounds (one block of steps issued back to back per variant and round, all ranks),
so the machine's slow phases fall on every variant alike; rows give the median block and the best round. All
variants stay in memory at once (on rank 0 an OE run holds the whole table and a shard). --profile adds rank 0's
kernels by category, with NCCL's on their own.

    python benchmarks/bench_ddp.py --out benchmarks/results/gpu_ddp_rounds.json [--world 2] [--blocks 10] [--profile]
        [--oe-m 8e6 --oe-sparse [--oe-only]] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import Rows, config, profile_steps, time_block  # noqa: E402
from overtok.sharded import leave_group_together  # noqa: E402


def model_sets(args, oe: bool = False) -> dict:
    d, layers, heads, seq, v = (32, 2, 2, 32, 97) if args.smoke else (768, 12, 12, 1024, 50304)
    sets = {"model.vocab_size": v, "model.d_model": d, "model.n_layers": layers, "model.n_heads": heads,
            "model.seq_len": seq, "model.tie_embeddings": False, "data.batch_size": args.batch,
            "runtime.compile": not args.smoke}
    if oe:  # n = 3, k = 4; whole in one process, row-sharded over the ranks (model.oe.shard)
        sets.update({"model.oe.n": 3, "model.oe.k": 4, "model.oe.m": int(args.oe_m), "model.oe.shard": True})
        if args.oe_sparse:
            sets.update({"model.oe.sparse_update": True, "model.oe.table_dtype": "bfloat16"})
    return sets


def build(sets: dict, train_sets: dict, dev: torch.device, distributed: bool):
    """Model, optimizer, autocast and the module a step calls, as overtok.train.train sets them up."""
    from overtok.config import runtime_fields
    from overtok.engine import prepare_model, shard_state, wrap_ddp
    from overtok.model import Transformer
    from overtok.optim import make_optimizer

    runtime = runtime_fields()  # train_sets may name runtime fields too (ddp_bucket_mb)
    cfg = config({**sets, **{f"{'runtime' if k in runtime else 'train'}.{k}": v for k, v in train_sets.items()}})
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg.train, dev)
    autocast, flags = prepare_model(model, cfg, dev, distributed)
    sharded, ignore = shard_state(model)
    step_model = wrap_ddp(model, cfg, dev, ignore) if distributed else model
    return cfg, model, opt, autocast, step_model, flags, [p for _, p in sharded]


def make_variant(rank: int, world: int, sets: dict, train_sets: dict, sync_grads: bool, args):
    """Build one variant on this rank (``world`` 1: the model alone, no DDP) and warm it up; returns (step, sync,
    its flags and warm-up seconds)."""
    import contextlib

    dev = torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    distributed = world > 1
    from overtok.engine import accumulate
    from overtok.optim import clip_sharded

    cfg, model, opt, autocast, step_model, flags, shards = build(sets, train_sets, dev, distributed)
    sparse_tables = model.sparse_tables()
    g = torch.Generator(device=dev).manual_seed(rank)
    T = cfg.model.seq_len + cfg.model.lookahead
    batches = [torch.randint(0, cfg.model.vocab_size, (args.batch, T), device=dev, generator=g) for _ in range(4)]
    graphs = bool(flags["perf/cuda_graphs"])

    drawn = iter(range(10**9))

    def step(i: int) -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        quiet = step_model.no_sync() if distributed and not sync_grads else contextlib.nullcontext()
        with quiet:  # the trainer's micro-steps: with train.grad_accum, only the last one all-reduces
            accumulate(step_model, lambda: batches[next(drawn) % 4], cfg.train.grad_accum, dev, autocast)
        if shards:  # as the trainer: shard gradients averaged, the norm global
            clip_sharded(model, shards, world, cfg.train.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for table in sparse_tables:
            table.apply_update(1e-3, 0.9, 0.95)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.time()
    for i in range(args.warmup):
        step(i)
    sync()
    return step, sync, flags, time.time() - t0


def _worker(rank: int, world: int, init_file: str, jobs: list, args, results) -> None:
    """Every variant built side by side in each rank's process, then timed in rounds (one block of each variant per
    round), so a slow phase of the machine falls on every variant alike. A 1-process variant runs on rank 0 while
    the others wait."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    built = []
    for name, n_proc, sets, train_sets, sync_grads in jobs:
        mine = rank < n_proc
        built.append(make_variant(rank, n_proc, sets, train_sets, sync_grads, args) if mine else None)
        if mine:
            results[(name, rank)] = {"rank": rank, "step_ms_blocks": [], "warmup_s": built[-1][3], **built[-1][2]}
        dist.barrier()
    for _ in range(args.blocks):
        for (name, *_), b in zip(jobs, built):
            if b is not None:
                row = results[(name, rank)]  # (a manager's dict hands out copies: write the row back)
                row["step_ms_blocks"] = row["step_ms_blocks"] + [time_block(b[0], b[1], args.steps) * 1000]
                results[(name, rank)] = row
            dist.barrier()
    if args.profile and backend == "nccl":  # every rank steps (collectives), rank 0's kernels are kept
        for (name, *_), b in zip(jobs, built):
            prof = profile_steps(b[0], b[1], torch.device(f"cuda:{rank}")) if b is not None else None
            if rank == 0:
                results[(name, rank)] = {**results[(name, rank)], **prof}
            dist.barrier()
    # a rank that raised leaves the group as it is (mp.spawn ends the rest)
    leave_group_together(f"{init_file}.done", rank, world)


def summarise(name: str, ranks: list[dict], world: int, sets: dict, train_sets: dict, args) -> dict:
    from overtok import accounting

    cfg = config(sets)
    # a block ends when the slowest rank's does: the global rate follows the slowest rank's mean step
    step_ms = max(statistics.median(r["step_ms_blocks"]) for r in ranks)
    # rounds end at a barrier, so block i of every rank covers the same time: the fastest round, by its slowest rank
    best = min(max(blocks) for blocks in zip(*(r["step_ms_blocks"] for r in ranks)))
    tokens = world * args.batch * cfg.model.seq_len * train_sets.get("grad_accum", 1)
    tps = tokens / (step_ms / 1000)
    return {"name": name, "world": world, "train": train_sets, "batch_per_rank": args.batch, "step_ms": step_ms,
            "step_ms_best": best, "tokens_per_s": tps,
            "mfu_per_gpu": accounting.mfu(tps, accounting.flops_per_token(cfg.model), world), "ranks": ranks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_ddp_direct.json")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=3, help="rounds: timed blocks per variant")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--grad-dtypes", nargs="+", default=[], choices=["bfloat16"], help="extra synced rows")
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[], help="extra synced rows")
    ap.add_argument("--grad-accum", type=int, nargs="+", default=[],
                    help="extra pairs (1 process, N synced) with this many micro-steps per step")
    ap.add_argument("--oe-m", type=float, default=0, help="also OE (n 3, k 4, this m): whole vs row-sharded")
    ap.add_argument("--oe-sparse", action="store_true", help="the OE rows with row-sparse bf16 tables (lazy Adam)")
    ap.add_argument("--oe-only", action="store_true", help="with --oe-m: only the OE rows (no dense model rows)")
    ap.add_argument("--profile", action="store_true", help="rank 0's kernels by category (CUDA only)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, gloo, to check the script")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps, args.blocks, args.warmup = 2, 2, 2, 1
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rows = Rows(args.out, " ".join(sys.argv))
    if args.oe_only and not args.oe_m:
        ap.error("--oe-only needs --oe-m")
    sets = None if args.oe_only else model_sets(args)
    oe_sets = model_sets(args, oe=True) if args.oe_m else None
    table = "sparse bf16" if args.oe_sparse else "dense"

    jobs = []  # (name, processes, model settings, train settings, gradients synced)
    if sets is not None:
        jobs += [("1 process", 1, sets, {}, True), (f"{args.world} processes, no sync", args.world, sets, {}, False),
                 (f"{args.world} processes", args.world, sets, {}, True)]
        jobs += [(f"{args.world} processes, {dt} gradients", args.world, sets, {"grad_reduce_dtype": dt}, True)
                 for dt in args.grad_dtypes]
        jobs += [(f"{args.world} processes, {mb:g} MiB buckets", args.world, sets, {"ddp_bucket_mb": mb}, True)
                 for mb in args.bucket_mb]
        for n in args.grad_accum:  # its own 1-process reference: the rows' ratio compares equal steps
            acc = {"grad_accum": n}
            jobs += [(f"1 process, grad_accum {n}", 1, sets, acc, True),
                     (f"{args.world} processes, grad_accum {n}", args.world, sets, acc, True)]
    if oe_sets:  # the whole table in one process (as a 1-GPU trial holds it), then row-sharded over the ranks
        jobs += [(f"1 process, OE table whole ({table})", 1, {**oe_sets, "model.oe.shard": False}, {}, True),
                 (f"{args.world} processes, OE table row-sharded ({table})", args.world, oe_sets, {}, True)]
    with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        results = manager.dict()
        mp.spawn(_worker, args=(args.world, f"{tmp}/store", jobs, args, results), nprocs=args.world, join=True)
        got = dict(results)
    refs = {}
    for name, n_proc, s, train_sets, _ in jobs:
        if n_proc == 1:
            refs["model.oe.n" in s, train_sets.get("grad_accum", 1)] = summarise(name, [got[(name, 0)]], 1, s, train_sets, args)
    print(f"{'variant':>64} {'step ms':>9} {'best ms':>9} {'tokens/s':>12} {'vs 1 process':>13} {'MFU/GPU':>8}",
          flush=True)
    for name, n_proc, s, train_sets, _ in jobs:
        ref = refs["model.oe.n" in s, train_sets.get("grad_accum", 1)]
        row = summarise(name, [got[(name, r)] for r in range(n_proc)], n_proc, s, train_sets, args)
        if n_proc > 1:
            row["vs_1_process"] = row["tokens_per_s"] / ref["tokens_per_s"]
            row["vs_1_process_best_blocks"] = ref["step_ms_best"] * n_proc / row["step_ms_best"]
        rows.append(row)
        vs = f"{row['vs_1_process']:13.2f}" if n_proc > 1 else " " * 13
        print(f"{name:>64} {row['step_ms']:9.2f} {row['step_ms_best']:9.2f} {row['tokens_per_s']:12,.0f} {vs} "
              f"{row['mfu_per_gpu']:8.3f}", flush=True)
        cats = row["ranks"][0].get("profile_categories_ms")
        if cats:
            from benchmarks.common import format_categories

            print(format_categories(cats), flush=True)
        tl = row["ranks"][0].get("profile_timeline_ms")
        if tl:
            print("    rank 0 per step, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in tl.items()), flush=True)


if __name__ == "__main__":
    main()
