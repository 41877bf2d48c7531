"""How fast the CFG data path hands out training batches, per sampler (`data.cfg_sampler`), on this host's CPU.

A trainer draws its batches on the host between steps: a tiny model on a GPU needs millions of tokens per second
(the packed benchmark's trial: 16 x 513 tokens every 3-5 ms; a pack of 8 trials eight such batches per step).
Each row times `Batches.next` (sampling, cutting into rows, the tensor) for one stream, and for 8 streams drawn
one after another as a pack of 8 does, for a fixed number of seconds.

    python benchmarks/bench_data.py --out benchmarks/results/cpu_data.json [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Rows  # noqa: E402


def batches(sampler: str, seed: int, batch: int, seq: int):
    from overtok.config import build_config
    from overtok.data import resolve_vocab
    from overtok.data.batches import Batches

    cfg = resolve_vocab(build_config({"seed": seed, "model": {"d_model": 64, "n_heads": 2, "seq_len": seq},
                                      "data": {"kind": "cfg", "grammar": "cfg3f", "batch_size": batch,
                                               "cfg_sampler": sampler}}))
    return Batches(cfg, "train")


def time_streams(sampler: str, streams: int, batch: int, seq: int, seconds: float) -> dict:
    data = [batches(sampler, seed, batch, seq) for seed in range(streams)]
    for d in data:  # the first block of each stream
        d.next()
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for d in data:
            d.next()
        steps += 1
    dt = (time.perf_counter() - t0) / steps
    tokens = streams * batch * data[0].row_len
    return {"sampler": sampler, "streams": streams, "batch": batch, "row_len": data[0].row_len, "steps": steps,
            "ms_per_step": dt * 1e3, "tokens_per_s": tokens / dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu_data.json")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    rows = Rows(args.out, " ".join(["benchmarks/bench_data.py", *sys.argv[1:]]))
    print(f"{'sampler':>9} {'streams':>8} {'ms per step':>12} {'tokens/s':>14}", flush=True)
    for streams in (1, 8):
        for sampler in ("block", "sentence"):
            r = time_streams(sampler, streams, args.batch, args.seq, args.seconds)
            rows.append(r)
            print(f"{sampler:>9} {streams:>8} {r['ms_per_step']:>12.3f} {r['tokens_per_s']:>14,.0f}", flush=True)
        block, sentence = rows[-2], rows[-1]
        print(f"{'':>9} {streams:>8} block {sentence['ms_per_step'] / block['ms_per_step']:.1f}x faster", flush=True)


if __name__ == "__main__":
    main()
