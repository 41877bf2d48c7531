"""The whole training step as one CUDA graph (`runtime.cuda_graph_scope: step`) against torch.compile's graphs of the
compiled body (`compiled`, the default), through the trainers, side by side in one process: one tiny trial
(`overtok.train.train`) and a pack of 8 (`overtok.packed.train_pack`) on a config (default
`benchmarks/configs/cfg_tiny.json`: d 256, 4 layers, seq 512, batch 16, cfg3f; with --corpus and --tokenizer the
same model on text, tokenized once per call into its temporary folder), the two scopes' runs alternating for
`--rounds` rounds. Per run: steady tokens/s (the median of the logged intervals after the first, which holds the
compilation), setup and first-step seconds, the last logged train loss, and perf/step_graph (whether the step graph
ran). Between runs the process is released as a reused trial process is (`overtok.trial.release`).

    python benchmarks/bench_step_graph.py --out benchmarks/results/gpu_step_graph.json [--steps 1000] [--rounds 2] \
        [--corpus ../shared/data/text --tokenizer ../shared/data/tokenizers/gpt-neox-olmo.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Rows  # noqa: E402
from overtok.tracking import MemorySink  # noqa: E402

SCOPES = ("compiled", "step")


def configs(base: dict, scope: str, pack: int, steps: int, log_every: int, smoke: bool, work: Path):
    from overtok.config import build_config
    from overtok.data import ensure_prepared, resolve_vocab

    out = []
    for seed in range(pack):
        cfg = ensure_prepared(resolve_vocab(build_config({**base, "seed": seed})), str(work / "data"))
        t = cfg.train
        t.max_steps, t.log_every, cfg.runtime.cuda_graph_scope = steps, log_every, scope
        t.eval_every, t.checkpoint_every, t.checkpoint_final = steps, 10**9, False
        if smoke:
            cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = 32, 2, 2, 32
            cfg.data.batch_size, cfg.runtime.compile = 4, False
        out.append(cfg)
    return out


def run(base: dict, scope: str, pack: int, args, work: Path) -> dict:
    import torch

    from overtok.train import pick_device, train, train_pack
    from overtok.trial import release

    dev = pick_device("cpu" if args.smoke else "auto")
    cfgs = configs(base, scope, pack, args.steps, args.log_every, args.smoke, work)
    sinks = [MemorySink() for _ in cfgs]
    t0 = time.time()
    if pack == 1:
        cfgs[0].train.checkpoint_dir = str(work / f"{scope}-{time.time_ns()}")
        train(cfgs[0], sinks[0], device=dev)
        rate_key = "perf/tokens_per_s"
    else:
        train_pack(cfgs, sinks, work / f"pack-{scope}-{time.time_ns()}", device=dev)
        rate_key = "perf/pack_tokens_per_s"
    wall = time.time() - t0
    pts = {k: list(by_step.values()) for k, by_step in sinks[0].points.items()}  # each key's values in log order
    rates = pts[rate_key][1:]
    row = {"scope": scope, "pack": pack, "steps": args.steps, "wall_s": wall,
           "steady_tokens_per_s": statistics.median(rates) if rates else float("nan"), "intervals_tokens_per_s": rates,
           "setup_s": pts["perf/setup_s"][0], "first_step_s": pts["perf/first_step_s"][0],
           "last_train_loss": pts["train/loss"][-1], "step_graph": pts["perf/step_graph"][-1],
           "cuda_graphs": pts["perf/cuda_graphs"][-1], "config": base, "device": str(dev),
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None}
    del sinks
    release()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_step_graph.json")
    ap.add_argument("--config", default="benchmarks/configs/cfg_tiny.json")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--packs", type=int, nargs="+", default=None,
                    help="trials per run: 1 = overtok.train.train (default 1 and 8; --smoke: 1 and 2)")
    ap.add_argument("--corpus", default="", help="text data instead of the config's: a corpus folder or file")
    ap.add_argument("--tokenizer", default="", help="with --corpus: a tokenizer file")
    ap.add_argument("--max-docs", type=int, default=400, help="with --corpus: documents to tokenize")
    ap.add_argument("--smoke", action="store_true", help="CPU, a 32-wide model, not compiled: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.log_every, args.rounds = 6, 2, 1
    args.packs = args.packs or ([1, 2] if args.smoke else [1, 8])
    base = json.loads(Path(args.config).read_text())
    if args.corpus:
        base["data"] = {"kind": "text", "corpus": str(Path(args.corpus).resolve()), "batch_size": base["data"]["batch_size"],
                        "tokenizer": str(Path(args.tokenizer).resolve()), "max_docs": args.max_docs, "val_fraction": 0.05}
    rows = Rows(args.out, " ".join(["benchmarks/bench_step_graph.py", *sys.argv[1:]]))
    work = Path(tempfile.mkdtemp(prefix="bench-step-graph-"))
    for pack in args.packs:
        for rnd in range(args.rounds):
            for scope in SCOPES:
                r = run(base, scope, pack, args, work)
                r["round"] = rnd
                rows.append(r)
                print(f"pack {pack}  round {rnd}  {scope:>8}: {r['steady_tokens_per_s']:>12,.0f} tokens/s steady  "
                      f"wall {r['wall_s']:6.1f} s  setup {r['setup_s']:5.1f} s  first step {r['first_step_s']:5.1f} s  "
                      f"loss {r['last_train_loss']:.4f}  step graph {r['step_graph']:.0f}", flush=True)
        by = {s: [r["steady_tokens_per_s"] for r in rows if r["pack"] == pack and r["scope"] == s] for s in SCOPES}
        print(f"pack {pack}: step / compiled, steady tokens/s, per round: "
              + ", ".join(f"{a / b:.2f}" for a, b in zip(by["step"], by["compiled"])), flush=True)


if __name__ == "__main__":
    main()
