"""Sweep-level GPU benchmarks for issue 6, each through the real CLI (`overtok sweep` / `overtok train`), side by side:

- packed: 8 tiny trials (d 256, 4 layers, seq 512, 8 seeds) run one after another (pack: 1, max_concurrent: 1;
  in one reused process, and with --packed-no-reuse also with a new process each), all at once as 8 processes
  sharing the GPU (pack: 1, max_concurrent: 8, gpu 0.125 each), and as one packed process (pack: 8). Aggregate
  tokens/s: steady state from the runs' logged throughput (compilation excluded), and end to end (all tokens /
  wall time of the `overtok sweep` command).
- overhead: one tiny trial of a few minutes run by `overtok train` and by `overtok sweep` (one trial, whole GPU);
  ratio of wall times, and each run's steady tokens/s; with --attach also by `overtok sweep` attached to a Ray
  instance that is already running (`ray start --head`, as on a cluster). Each command compiles cold (its own empty inductor cache), so neither gains from the other.
- ddp (only with --only ddp; 2 GPUs): one 124M-class trial on 1 GPU vs data-parallel on 2 (Ray Train, DDP), and
  Over-Encoding with the table whole on 1 GPU vs row-sharded over 2; steady global tokens/s.

    python benchmarks/bench_sweep.py --corpus data_cache/text --tokenizer data_cache/gpt-neox-olmo.json \
        --out benchmarks/results/gpu_sweep.json [--only packed|overhead|ddp] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Rows  # noqa: E402
from overtok.config import runtime_fields  # noqa: E402


def base_config(args, d, layers, heads, seq, batch, steps, data: str = "text") -> dict:
    """data 'text': the corpus tokenized with --tokenizer; 'cfg': the cfg3f grammar, sampled as the trial runs."""
    if data == "cfg":
        data_sets = {"kind": "cfg", "grammar": "cfg3f", "batch_size": batch}
    else:
        data_sets = {"kind": "text", "corpus": str(Path(args.corpus).resolve()), "tokenizer": str(Path(args.tokenizer).resolve()),
                     "max_docs": args.max_docs, "val_fraction": 0.05, "batch_size": batch}
    return {
        "model": {"d_model": d, "n_layers": layers, "n_heads": heads, "seq_len": seq},
        "data": data_sets,
        "train": {"lr": 1e-3, "max_steps": steps, "warmup_steps": 20, "eval_every": steps, "eval_batches": 2,
                  "log_every": max(steps // 15, 1), "checkpoint_every": 10**9, "checkpoint_final": False,
                  "gen_samples": 0},
        "runtime": {"compile": not args.smoke},
    }


def run_cli(work: Path, *cmd: str, tag: str, tree: Path = ROOT, extra_env: dict | None = None) -> float:
    """Run `python -m overtok ...` (of the source tree ``tree``) in work with a cold, private inductor cache and
    its own fresh MLflow store (results/<tag>.db: every command pays for creating one), plus ``extra_env`` (the
    local Ray's workers inherit it); return wall seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
               TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{tag}"), TRITON_CACHE_DIR=str(work / f"triton-{tag}"),
               **(extra_env or {}))
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "overtok", *cmd, "--tracking-uri", store(work, tag)], cwd=work, env=env,
                         capture_output=True, text=True)
    wall = time.time() - t0
    (work / f"{tag}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return wall


def store(work: Path, tag: str) -> str:
    return f"sqlite:///{work}/results/{tag}.db"


def runs(work: Path, tag: str, experiment: str) -> list[dict]:
    from overtok.tracking import client

    c = client(store(work, tag))
    exp = c.get_experiment_by_name(experiment)
    out = []
    for r in c.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get("overtok.role") == "parent":
            continue
        tps = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "perf/tokens_per_s"), key=lambda m: m.step)]
        out.append({"status": r.info.status, "tokens_per_s": tps, "pid": r.data.tags.get("overtok.pid"),
                    "setup_s": r.data.metrics.get("perf/setup_s"), "first_step_s": r.data.metrics.get("perf/first_step_s"),
                    "eval_s": r.data.metrics.get("perf/eval_s"),
                    "run_s": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None,
                    "tokens": int(r.data.metrics.get("tokens_seen", 0)) or None,
                    "cuda_graphs": r.data.metrics.get("perf/cuda_graphs"),
                    "kernels": {k: r.data.metrics.get(f"perf/{k}") for k in ("fused_loss", "mlp_kernel", "rope_kernel")},
                    "params": {k: r.data.params.get(k) for k in ("seed", "tokens_per_step", "train.max_steps",
                                                                 "train.grad_reduce_dtype", "runtime.ddp_bucket_mb",
                                                                 "runtime.cuda_graphs")}})
    return out


def prepare(work: Path, cfg: dict) -> None:
    if cfg["data"]["kind"] != "text":
        return
    from overtok.config import build_config
    from overtok.data import ensure_prepared

    ensure_prepared(build_config(json.loads(json.dumps(cfg))), cache_root=str(work / "results" / "data"))


def steady(tps: list[float]) -> float:
    """Median logged throughput without the first interval (which holds compilation)."""
    return statistics.median(tps[1:] if len(tps) > 1 else tps)


def packed(args, rows):
    work = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    d, layers, heads, seq, batch = (32, 2, 2, 64, 4) if args.smoke else (256, 4, 4, 512, args.packed_batch)
    first, *more = args.packed_compile_eval
    sampler, *other_samplers = args.packed_cfg_samplers if args.packed_data == "cfg" else [None]
    # (name, pack, max_concurrent, gpu per trial, compile_eval, reuse_processes, CFG sampler); the first is the reference
    variants = [("one after another", 1, 1, 1.0, first, True, sampler), ("8 processes at once", 1, 8, 0.125, first, True, sampler),
                ("packed (pack: 8)", 8, 1, 1.0, first, True, sampler)]
    if args.skip_concurrent:
        variants.pop(1)
    if args.packed_no_reuse:
        variants.insert(1, ("one after another, a process each", 1, 1, 1.0, first, False, sampler))
    variants += [(f"packed (pack: 8), compile_eval {v}", 8, 1, 1.0, v, True, sampler) for v in more]
    for other in other_samplers:  # the same pair with another CFG sampler (e.g. 'sentence', the one before)
        variants += [(f"one after another, {other} sampler", 1, 1, 1.0, first, True, other),
                     (f"packed (pack: 8), {other} sampler", 8, 1, 1.0, first, True, other)]
    prepare(work, base_config(args, d, layers, heads, seq, batch, args.packed_steps, args.packed_data))
    seq_tokens, refs = None, {}
    for i, (name, pack, conc, gpu, compile_eval, reuse, cfg_sampler) in enumerate(variants):
        base = base_config(args, d, layers, heads, seq, batch, args.packed_steps, args.packed_data)
        base["runtime"]["compile_eval"] = compile_eval
        if cfg_sampler:
            base["data"]["cfg_sampler"] = cfg_sampler
        sweep = {"name": f"packed{i}", "base": base, "seeds": list(range(8)), "pack": pack, "max_concurrent": conc,
                 "resources": {"cpu": 1, "gpu": gpu if not args.smoke else 0}, "reuse_processes": reuse}
        (work / f"packed{i}.yaml").write_text(json.dumps(sweep))
        wall = run_cli(work, "sweep", f"packed{i}.yaml", tag=f"packed{i}")
        rs = runs(work, f"packed{i}", f"packed{i}")
        assert len(rs) == 8 and all(r["status"] == "FINISHED" for r in rs), rs
        tokens = sum(int(r["params"]["tokens_per_step"]) * int(r["params"]["train.max_steps"]) for r in rs)
        per_trial = [steady(r["tokens_per_s"]) for r in rs]
        if pack > 1 or conc > 1:  # all 8 train at once: throughputs add up
            agg = sum(per_trial)
        else:  # one at a time: the aggregate is one trial's rate
            agg = statistics.median(per_trial)
        row = {"name": name, "pack": pack, "max_concurrent": conc, "gpu_per_trial": gpu, "compile_eval": compile_eval,
               "reuse_processes": reuse, "data": args.packed_data, "cfg_sampler": cfg_sampler,
               "wall_s": wall, "tokens": tokens, "end_to_end_tokens_per_s": tokens / wall, "steady_tokens_per_s": agg,
               "per_trial_steady_tokens_per_s": per_trial, "processes": len({r["pid"] for r in rs}),
               "per_trial_phases_s": [{k: r[k] for k in ("setup_s", "first_step_s", "eval_s")} for r in rs]}
        if i == 0:
            seq_tokens = row
        if pack == 1 and conc == 1:  # each sampler's rows are also compared with its first one-after-another row
            refs.setdefault(cfg_sampler, row)
        ref = refs[cfg_sampler]
        row["steady_vs_its_one_after_another"] = agg / ref["steady_tokens_per_s"]
        row["end_to_end_vs_its_one_after_another"] = row["end_to_end_tokens_per_s"] / ref["end_to_end_tokens_per_s"]
        row["steady_vs_one_after_another"] = agg / seq_tokens["steady_tokens_per_s"]
        row["end_to_end_vs_one_after_another"] = row["end_to_end_tokens_per_s"] / seq_tokens["end_to_end_tokens_per_s"]
        rows.append(row)
        print(f"{name:>22}  wall {wall:7.1f} s  steady {agg:>12,.0f} tok/s (x{row['steady_vs_one_after_another']:.2f})  "
              f"end-to-end {row['end_to_end_tokens_per_s']:>12,.0f} tok/s (x{row['end_to_end_vs_one_after_another']:.2f})  "
              f"processes {row['processes']}", flush=True)


def overhead(args, rows):
    """The tiny trial of the packed benchmark (d 256, 4 layers, seq 512), run alone for a few minutes: its logged
    throughput is also the one-trial baseline that packing is measured against."""
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    d, layers, heads, seq, batch = (32, 2, 2, 64, 4) if args.smoke else (256, 4, 4, 512, args.packed_batch)
    cfg = base_config(args, d, layers, heads, seq, batch, args.overhead_steps)
    prepare(work, cfg)  # both commands find the corpus tokenized; neither pays for it
    for i in range(args.repeats):  # alternating, so a drift of the machine's speed hits both commands alike
        train_exp, sweep_name = f"overhead_train_{i}", f"overhead_sweep_{i}"
        trial_cpu = args.trial_cpu[i % len(args.trial_cpu)] if args.trial_cpu else (1 if args.smoke else 4)
        (work / f"train{i}.yaml").write_text(json.dumps({"name": "overhead", **cfg, "tracking": {"experiment": train_exp}}))
        sweep = {"name": sweep_name, "base": cfg, "seeds": [0],
                 "resources": {"cpu": trial_cpu, "gpu": 0 if args.smoke else 1}}
        (work / f"sweep{i}.yaml").write_text(json.dumps(sweep))
        walls = {"train": run_cli(work, "train", f"train{i}.yaml", tag=f"train{i}"),
                 "sweep": run_cli(work, "sweep", f"sweep{i}.yaml", tag=f"sweep{i}")}
        if args.attach:  # the same sweep attached to a Ray instance that already runs (as on a cluster)
            from benchmarks.bench_driver import ray_cli

            (work / f"sweepatt{i}.yaml").write_text(json.dumps({**sweep, "name": f"{sweep_name}_attached"}))
            ray_cli("start", "--head", "--include-dashboard=false")
            try:
                walls["sweep_attached"] = run_cli(work, "sweep", f"sweepatt{i}.yaml", tag=f"sweepatt{i}")
            finally:
                ray_cli("stop")
        if args.compare_tree:  # the same sweep by another checkout of overtok (e.g. the previous commit)
            (work / f"sweepold{i}.yaml").write_text(json.dumps({**sweep, "name": f"{sweep_name}_old"}))
            walls["sweep_old"] = run_cli(work, "sweep", f"sweepold{i}.yaml", tag=f"sweepold{i}", tree=Path(args.compare_tree).resolve())
        got = {tag: runs(work, f"{tag}{i}", exp)[0] for tag, exp in (("train", train_exp), ("sweep", sweep_name))}
        tps = {tag: steady(r["tokens_per_s"]) for tag, r in got.items()}
        row = {"name": f"overtok sweep vs overtok train (pair {i})", "config": cfg, "train_wall_s": walls["train"],
               "sweep_wall_s": walls["sweep"], "ratio": walls["sweep"] / walls["train"],
               "train_steady_tokens_per_s": tps["train"], "sweep_steady_tokens_per_s": tps["sweep"],
               "sweep_trial_cpu": trial_cpu, "sweep_driver": driver_phases(work / f"sweep{i}.log")}
        for tag, r in got.items():  # the trainer's own clock: setup (data, model) and first step (compilation)
            row[f"{tag}_setup_s"], row[f"{tag}_first_step_s"] = r["setup_s"], r["first_step_s"]
            # the command's time outside the trial's MLflow run (from its start to its end): process starts,
            # imports, the driver, Ray
            row[f"{tag}_run_s"], row[f"{tag}_outside_run_s"] = r["run_s"], walls[tag] - r["run_s"]
        if "sweep_attached" in walls:
            att = runs(work, f"sweepatt{i}", f"{sweep_name}_attached")[0]
            row.update(sweep_attached_wall_s=walls["sweep_attached"], ratio_attached=walls["sweep_attached"] / walls["train"],
                       sweep_attached_steady_tokens_per_s=steady(att["tokens_per_s"]),
                       sweep_attached_setup_s=att["setup_s"], sweep_attached_first_step_s=att["first_step_s"],
                       sweep_attached_driver=driver_phases(work / f"sweepatt{i}.log"))
            print(f"    attached to a running Ray: overtok sweep {walls['sweep_attached']:.1f} s "
                  f"({row['sweep_attached_steady_tokens_per_s']:,.0f} tok/s) | ratio {row['ratio_attached']:.3f} | "
                  f"driver {row['sweep_attached_driver']}", flush=True)
        if "sweep_old" in walls:
            row.update(compare_tree=args.compare_tree, sweep_old_wall_s=walls["sweep_old"],
                       ratio_old=walls["sweep_old"] / walls["train"],
                       sweep_old_steady_tokens_per_s=steady(runs(work, f"sweepold{i}", f"{sweep_name}_old")[0]["tokens_per_s"]))
            print(f"    {args.compare_tree}: overtok sweep {walls['sweep_old']:.1f} s "
                  f"({row['sweep_old_steady_tokens_per_s']:,.0f} tok/s) | ratio {row['ratio_old']:.3f}", flush=True)
        rows.append(row)
        print(f"pair {i} (trial cpu {trial_cpu:g}): overtok train {walls['train']:.1f} s ({tps['train']:,.0f} tok/s) | overtok sweep "
              f"{walls['sweep']:.1f} s ({tps['sweep']:,.0f} tok/s) | ratio {row['ratio']:.3f}", flush=True)
        print(f"    setup / first step: train {row['train_setup_s']:.1f} / {row['train_first_step_s']:.1f} s, "
              f"sweep's trial {row['sweep_setup_s']:.1f} / {row['sweep_first_step_s']:.1f} s; sweep driver {row['sweep_driver']}", flush=True)
        print(f"    the trial's MLflow run: train {row['train_run_s']:.1f} s (outside it {row['train_outside_run_s']:.1f} s), "
              f"sweep {row['sweep_run_s']:.1f} s (outside it {row['sweep_outside_run_s']:.1f} s)", flush=True)


def ddp(args, rows):
    """Target 5: one trial of the 124M-class model on 1 GPU vs the same trial data-parallel on 2 GPUs (Ray Train,
    DDP over NCCL; the batch is per rank, so a 2-GPU step holds twice the tokens), and Over-Encoding with its table
    whole on 1 GPU vs row-sharded over the 2 (model.oe.shard: all-to-all exchange of ids and rows). Throughput is
    the trial's logged global tokens/s in steady state."""
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    d, layers, heads, seq, batch = (32, 2, 2, 64, 4) if args.smoke else (768, 12, 12, 1024, args.ddp_batch)
    base = base_config(args, d, layers, heads, seq, batch, args.ddp_steps)
    base["train"]["grad_accum"] = args.ddp_grad_accum  # every trial, 1 GPU and 2: the same micro-steps per step
    prepare(work, base)
    one = {"cpu": 0.9, "gpu": 0} if args.smoke else {"cpu": 4, "gpu": 1}  # the smoke run: 2 gloo workers on 2 CPUs
    two = {"cpu": 0.9, "workers": 2} if args.smoke else {"cpu": 8, "gpu": 2, "workers": 2}
    oe = {"n": 3, "k": 4, "m": args.ddp_oe_m}
    if args.ddp_oe_sparse:  # row-sparse bf16 tables with lazy Adam, whole on 1 GPU / row-sparse shards on 2
        oe.update(sparse_update=True, table_dtype="bfloat16")
    # (name, resources, model.oe, train settings, the 1-GPU row it is compared with)
    ddp_sets = [(f"{dt} gradients, {mb:g} MiB buckets", {"grad_reduce_dtype": dt, "ddp_bucket_mb": mb})
                for dt in args.ddp_grad_dtypes for mb in args.ddp_bucket_mb]
    variants = [("1 GPU", one, {}, {}, None)]
    if args.ddp_no_graphs_ref:  # the 1-GPU trial replays CUDA graphs, data-parallel ones cannot: how much that is
        variants.append(("1 GPU, no CUDA graphs", one, {}, {"cuda_graphs": False}, None))
    variants += [(f"2 GPUs, DDP, {label}", two, {}, sets, "1 GPU") for label, sets in ddp_sets]
    # the default 2-GPU trial with environment variables for its processes (e.g. NCCL_MAX_NCHANNELS: fewer SMs for
    # NCCL's kernels, which run alongside the backward's)
    envs = {f"2 GPUs, DDP, {e}": dict(kv.split("=", 1) for kv in e.split(",")) for e in args.ddp_env}
    if args.ddp_kernels_off:  # the same pair with the SwiGLU and RoPE kernels off (train.*_kernel: torch)
        off, label = {"mlp_kernel": "torch", "rope_kernel": "torch"}, ", SwiGLU and RoPE kernels off"
        variants += [("1 GPU" + label, one, {}, off, None)]
        variants += [(f"2 GPUs, DDP, {lab}{label}", two, {}, {**sets, **off}, "1 GPU" + label) for lab, sets in ddp_sets]
    variants += [(name, two, {}, {}, "1 GPU") for name in envs]
    if not args.ddp_skip_oe:
        variants.append(("1 GPU, OE table whole", one, oe, {}, None))
        variants += [(f"2 GPUs, DDP, {label}, OE table row-sharded", two, {**oe, "shard": True}, sets,
                      "1 GPU, OE table whole") for label, sets in ddp_sets]
    got = {}
    for i, (name, resources, oe_sets, train_sets, ref) in enumerate(variants):
        cfg = json.loads(json.dumps(base))
        runtime = runtime_fields()  # the settings may be of either section
        cfg["train"].update({k: v for k, v in train_sets.items() if k not in runtime})
        cfg["runtime"].update({k: v for k, v in train_sets.items() if k in runtime})
        if oe_sets:
            cfg["model"]["oe"] = oe_sets
        (work / f"ddp{i}.yaml").write_text(json.dumps({"name": f"ddp{i}", "base": cfg, "seeds": [0], "resources": resources}))
        wall = run_cli(work, "sweep", f"ddp{i}.yaml", tag=f"ddp{i}", extra_env=envs.get(name))
        r = runs(work, f"ddp{i}", f"ddp{i}")[0]
        assert r["status"] == "FINISHED", r
        got[name] = row = {"name": name, "resources": resources, "oe": oe_sets or None, "train": train_sets, "env": envs.get(name),
                           "params": r["params"], "cuda_graphs": r["cuda_graphs"], "kernels": r["kernels"], "wall_s": wall,
                           "steady_tokens_per_s": steady(r["tokens_per_s"]), "tokens_per_s_intervals": r["tokens_per_s"],
                           "setup_s": r["setup_s"], "first_step_s": r["first_step_s"]}
        if ref:
            row["vs_1_gpu"] = row["steady_tokens_per_s"] / got[ref]["steady_tokens_per_s"]
        rows.append(row)
        print(f"{name:>36}  wall {wall:6.1f} s  steady {row['steady_tokens_per_s']:>12,.0f} tok/s"
              + (f"  x{row['vs_1_gpu']:.2f} vs {ref}" if ref else "") + f"  kernels {row['kernels']}", flush=True)


def driver_phases(log: Path) -> dict[str, float]:
    """The phases `overtok sweep` prints at its end ('... s in all: setup 8.0 s, trials 85.3 s, Ray stop 1.4 s')."""
    import re

    for line in log.read_text().splitlines():
        if " s in all: " in line:
            total, rest = line.split(" s in all: ")
            out = {"in all": float(total.rsplit(" ", 1)[1])}
            out.update({k.strip(): float(v) for k, v in re.findall(r"([A-Za-z ]+?) ([0-9.]+) s", rest)})
            return out
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_sweep.json")
    ap.add_argument("--only", choices=["packed", "overhead", "ddp"], default=None)
    ap.add_argument("--corpus", default="../shared/data/text")
    ap.add_argument("--tokenizer", default="../shared/data/tokenizers/gpt-neox-olmo.json")
    ap.add_argument("--max-docs", type=int, default=400)
    ap.add_argument("--packed-steps", type=int, default=1500)
    ap.add_argument("--packed-data", choices=["text", "cfg"], default="text",
                    help="packed: the text corpus (V = 50,280) or the cfg3f grammar (V = 7)")
    ap.add_argument("--packed-cfg-samplers", nargs="+", choices=["block", "sentence"], default=["block"],
                    help="packed, cfg data: the first sampler for all variants, each other one for one more pair")
    ap.add_argument("--packed-batch", type=int, default=16)
    ap.add_argument("--overhead-steps", type=int, default=6000)
    ap.add_argument("--skip-concurrent", action="store_true")
    ap.add_argument("--packed-no-reuse", action="store_true",
                    help="packed: also run the trials one after another with a new process each (reuse_processes: false)")
    ap.add_argument("--packed-compile-eval", nargs="+", default=["auto"], choices=["auto", "always", "never"],
                    help="packed: runtime.compile_eval of every variant (the first value); each further value adds a "
                         "packed sweep with it")
    ap.add_argument("--ddp-steps", type=int, default=400)
    ap.add_argument("--ddp-batch", type=int, default=16, help="ddp: sequences of 1,024 tokens per GPU and step")
    ap.add_argument("--ddp-grad-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="ddp: one 2-GPU run per train.grad_reduce_dtype")
    ap.add_argument("--ddp-bucket-mb", type=float, nargs="+", default=[25.0],
                    help="ddp: one 2-GPU run per runtime.ddp_bucket_mb (and per reduce dtype)")
    ap.add_argument("--ddp-grad-accum", type=int, default=1,
                    help="ddp: train.grad_accum of every trial (micro-steps per optimizer step; DDP syncs the last)")
    ap.add_argument("--ddp-no-graphs-ref", action="store_true", help="ddp: also 1 GPU without CUDA graphs")
    ap.add_argument("--ddp-env", nargs="+", default=[], metavar="K=V[,K=V]",
                    help="ddp: one more 2-GPU run (float32, 25 MiB) per entry, with these environment variables")
    ap.add_argument("--ddp-oe-sparse", action="store_true",
                    help="ddp: the OE pair with row-sparse bf16 tables (sharded ones on 2 GPUs)")
    ap.add_argument("--ddp-skip-oe", action="store_true", help="ddp: leave out the OE pair")
    ap.add_argument("--ddp-kernels-off", action="store_true",
                    help="ddp: also the 1-GPU and 2-GPU trials with the SwiGLU and RoPE kernels off")
    ap.add_argument("--ddp-oe-m", type=int, default=1_000_001, help="ddp: OE table rows per slice (n = 3, k = 4)")
    ap.add_argument("--repeats", type=int, default=2, help="train/sweep pairs of the overhead benchmark")
    ap.add_argument("--trial-cpu", type=float, nargs="+", default=None,
                    help="CPUs of the overhead sweep's trial, one per pair, cycled (default 4; 1 with --smoke)")
    ap.add_argument("--attach", action="store_true",
                    help="overhead: also time the sweep attached to a Ray instance started by `ray start --head`")
    ap.add_argument("--compare-tree", default="", help="overhead: also time the sweep with this checkout of overtok")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script")
    args = ap.parse_args()
    if args.smoke:
        args.packed_steps, args.overhead_steps, args.ddp_steps, args.max_docs, args.ddp_oe_m = 30, 30, 30, 50, 1001
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    rows = Rows(args.out, " ".join(sys.argv))
    if args.only in (None, "packed"):
        packed(args, rows)
    if args.only in (None, "overhead"):
        overhead(args, rows)
    if args.only == "ddp":  # needs 2 GPUs (gloo on the CPU with --smoke)
        ddp(args, rows)


if __name__ == "__main__":
    main()
