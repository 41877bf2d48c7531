"""What a reused trial process holds between trials (`reuse_processes`): trains several trials one after another in
this process on one thread, as a reused Ray worker does (`overtok.train.train`, compiled, CUDA graphs where they
apply), runs the release a reused process runs after each trial (`overtok.trial.release`) and records after every
trial the device memory still allocated and reserved, then again after clearing cuBLAS's per-stream workspaces
(which the release itself also does), and
the largest tensors still alive on the device (real ones, not the compiler's fake tensors) with
the types of what refers to them. A trial logs its peak as `perf/mem_gb`, which includes whatever the trials
before it left allocated.

    python benchmarks/bench_reuse.py --out benchmarks/results/gpu_reuse_memory.json [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Rows, config  # noqa: E402


def trial_config(d_model: int, compiled: bool, steps: int):
    """A tiny cfg3f trial (2 layers, 2 heads, seq 32, batch 4: the tests' tiny config) of width ``d_model``."""
    from overtok.data import resolve_vocab

    return resolve_vocab(config({"model.d_model": d_model, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 32,
                                 "data.batch_size": 4, "train.max_steps": steps, "train.eval_every": 20,
                                 "train.log_every": 5, "train.gen_samples": 16, "train.warmup_steps": 2,
                                 "runtime.compile": compiled}))


def live_tensors(dev: torch.device) -> list[torch.Tensor]:
    """Tensors alive on ``dev`` that own memory (the compiler's fake tensors do not)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    out = []
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.device.type == dev.type:
                out.append(o)
        except Exception:  # noqa: BLE001 - objects that fail isinstance or .device are not ours to list
            continue
    return out


def holders(t: torch.Tensor, skip: list) -> list[str]:
    return sorted({type(r).__module__ + "." + type(r).__qualname__ for r in gc.get_referrers(t) if r is not skip})


def snapshot(dev: torch.device, top: int) -> dict:
    ts = live_tensors(dev)
    ts.sort(key=lambda t: -t.untyped_storage().nbytes())
    out = {"live_tensors": len(ts),
           "live_mib": sum(t.untyped_storage().nbytes() for t in ts) / 2**20,
           "largest": [{"shape": list(t.shape), "dtype": str(t.dtype), "mib": t.untyped_storage().nbytes() / 2**20,
                        "referrers": holders(t, ts)} for t in ts[:top]]}
    if dev.type == "cuda":
        out["allocated_mib"] = torch.cuda.memory_allocated(dev) / 2**20
        out["reserved_mib"] = torch.cuda.memory_reserved(dev) / 2**20
    return out


def main():
    from overtok.train import pick_device, train
    from overtok.trial import release

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_reuse_memory.json")
    ap.add_argument("--d-models", type=int, nargs="+", default=[64, 48, 32, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="CPU, not compiled, 5 steps: checks the script")
    args = ap.parse_args()
    dev = pick_device("cpu" if args.smoke else "auto")
    rows = Rows(args.out, " ".join(["benchmarks/bench_reuse.py", *sys.argv[1:]]))
    work = Path(tempfile.mkdtemp(prefix="bench-reuse-"))
    for i, d in enumerate(args.d_models):
        cfg = trial_config(d, not args.smoke, 5 if args.smoke else args.steps)
        cfg.train.checkpoint_dir = str(work / f"trial{i}")
        t0 = time.time()
        summary = train(cfg, None, device=dev)
        row = {"trial": i + 1, "d_model": d, "train_s": time.time() - t0, "final_loss": summary.get("train/loss"),
               "cuda_graphs": summary.get("perf/cuda_graphs"), "step_graph": summary.get("perf/step_graph"),
               "before_release": snapshot(dev, 0)}
        release()
        row["after_release"] = snapshot(dev, args.top)
        if dev.type == "cuda":
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()
            row["after_clearing_cublas_workspaces"] = snapshot(dev, 0)
        rows.append(row)
        held = row["after_release"]
        print(f"trial {i + 1} (d {d}): after release {held['live_tensors']} live tensors, {held['live_mib']:.1f} MiB"
              + (f"; allocated {held['allocated_mib']:.1f} MiB, reserved {held['reserved_mib']:.1f} MiB; after "
                 f"clearing cuBLAS workspaces {row['after_clearing_cublas_workspaces']['allocated_mib']:.1f} MiB"
                 if dev.type == "cuda" else ""), flush=True)
        for t in held["largest"]:
            print(f"    {t['shape']} {t['dtype']} {t['mib']:.2f} MiB  held by {', '.join(t['referrers'])}", flush=True)


if __name__ == "__main__":
    main()
