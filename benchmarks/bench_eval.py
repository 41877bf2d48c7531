"""What a validation pass costs a compiled trial (runtime.compile_eval), side by side in one process: the model is built
and compiled as the trainer does it (`prepare_model`, CUDA graphs where they apply), trained a few steps, then
evaluated eagerly (`torch.compiler.set_stance("force_eager")`) and compiled (a second compilation: the forward
without gradients is another graph). Per case: eager and compiled milliseconds per validation batch, seconds of the
first compiled evaluation with a cold compile cache (this process's own) and again after `torch._dynamo.reset()`
(the on-disk caches warm, as for the second and later trials of a sweep on one machine), and the number of batches
after which compiling pays: (first compiled evaluation - one compiled batch) / (eager - compiled per batch).

Cases: one tiny model and 8 of them packed (d 256, 4 layers, seq 512, 16 sequences per model, V = 50,280: the
packed-sweep benchmark's trial) and the 124M-class model (d 768, 12 layers, seq 1024, 16 sequences, V = 50,304).

    python benchmarks/bench_eval.py --out benchmarks/results/gpu_eval.json [--cases tiny packed 124M] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-eval-"))  # cold for this process
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-eval-"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Rows, config, fresh_device, release, seeded_models  # noqa: E402

CASES = {  # d, layers, heads, seq, sequences per model, vocabulary, models packed
    "tiny": (256, 4, 4, 512, 16, 50280, 1),
    "packed": (256, 4, 4, 512, 16, 50280, 8),
    "124M": (768, 12, 12, 1024, 16, 50304, 1),
}


class Stream:
    """Fixed random batches with the Batches interface evaluation uses (rewind, next)."""

    def __init__(self, cfg, batch: int, seed: int, n: int = 4):
        g = torch.Generator().manual_seed(seed)
        T = cfg.model.seq_len + cfg.model.lookahead
        self.batches = [torch.randint(0, cfg.model.vocab_size, (batch, T), generator=g) for _ in range(n)]
        self.i = 0

    def rewind(self) -> None:
        self.i = 0

    def next(self) -> torch.Tensor:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def run_case(name: str, args) -> dict:
    from overtok.engine import prepare_model
    from overtok.optim import PackedAdamW, make_optimizer
    from overtok.packed import pack_models
    from overtok.train import evaluate

    d, L, H, T, B, V, P = (64, 2, 2, 64, 2, 512, CASES[name][-1]) if args.smoke else CASES[name]
    cfg = config({"model.vocab_size": V, "model.d_model": d, "model.n_layers": L, "model.n_heads": H,
                  "model.seq_len": T, "data.batch_size": B, "runtime.compile": True})
    dev = fresh_device()
    models = seeded_models(cfg, P, dev)
    model = models[0] if P == 1 else pack_models(models)
    opt = make_optimizer(model, cfg.train, dev) if P == 1 else PackedAdamW(model, cfg.train)
    autocast, flags = prepare_model(model, cfg, dev)
    train = [Stream(cfg, B, 1000 + p) for p in range(P)]
    val = [Stream(cfg, B, p) for p in range(P)]
    lrs = torch.full((P,), 1e-3, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.time()
    for _ in range(3):  # compiles the training graph
        if flags["perf/cuda_graphs"]:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            _, losses = model(torch.cat([s.next() for s in train]).to(dev))
        losses["total"].sum().backward()
        opt.step() if P == 1 else opt.step(lrs, 1.0)
        opt.zero_grad()
    sync()
    train_compile_s = time.time() - t0

    def timed(compiled: bool, n: int) -> tuple[float, list[float]]:
        sync()
        t = time.perf_counter()
        loss = evaluate(model, val, n, dev, autocast, compiled).reshape(-1).tolist()  # .tolist() waits for the GPU
        return time.perf_counter() - t, loss

    timed(False, 1)  # eager warm-up (kernels loaded, autotuned matmuls)
    eager_ms = statistics.median(timed(False, args.batches)[0] / args.batches * 1000 for _ in range(3))
    first_s, first_loss = timed(True, 1)  # compiles the forward without gradients, cold cache
    compiled_ms = statistics.median(timed(True, args.batches)[0] / args.batches * 1000 for _ in range(3))
    _, eager_loss = timed(False, 1)
    torch._dynamo.reset()  # compiled code dropped; inductor's on-disk caches stay: a later trial's compilation
    warm_s, _ = timed(True, 1)
    gain = eager_ms - compiled_ms
    row = {"name": name, "models": P, "d_model": d, "layers": L, "seq": T, "sequences_per_model": B, "vocab": V,
           "cuda_graphs": bool(flags["perf/cuda_graphs"]), "train_compile_s": train_compile_s,
           "eager_ms_per_batch": eager_ms, "compiled_ms_per_batch": compiled_ms,
           "first_compiled_eval_s": first_s, "first_compiled_eval_warm_cache_s": warm_s,
           "break_even_batches": (first_s - compiled_ms / 1000) / (gain / 1000) if gain > 0 else None,
           "break_even_batches_warm_cache": (warm_s - compiled_ms / 1000) / (gain / 1000) if gain > 0 else None,
           "loss_eager": eager_loss, "loss_compiled": first_loss}
    return row


def format_row(r: dict) -> str:
    be, bw = ("never" if x is None else f"{x:,.0f}"  # never: eager was not slower than compiled
              for x in (r["break_even_batches"], r["break_even_batches_warm_cache"]))
    return (f"{r['name']:>8} {r['eager_ms_per_batch']:9.2f} {r['compiled_ms_per_batch']:12.2f} "
            f"{r['first_compiled_eval_s']:20.2f} {r['first_compiled_eval_warm_cache_s']:13.2f} {be:>19} {bw:>7} "
            f"{r['loss_eager'][0]:15.4f} / {r['loss_compiled'][0]:.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_eval.json")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--batches", type=int, default=10, help="validation batches per timed evaluation")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    args = ap.parse_args()
    if args.smoke:
        args.batches = 2
    rows = Rows(args.out, " ".join(sys.argv))
    print(f"{'case':>8} {'eager ms':>9} {'compiled ms':>12} {'1st compiled eval s':>20} {'warm cache s':>13} "
          f"{'break-even batches':>19} {'warm':>7} {'loss eager / compiled (slice 0)':>32}", flush=True)
    for name in args.cases:
        r = run_case(name, args)
        release(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # the case's model is gone: free it
        rows.append(r)
        print(format_row(r), flush=True)


if __name__ == "__main__":
    main()
