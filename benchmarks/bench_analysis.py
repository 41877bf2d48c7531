"""CPU benchmarks for the analysis side (issue 4), on this machine:

1. `overtok export`: 500 runs x 2,000 metric points in a SQLite MLflow store (target < 30 s);
   compared side by side with the per-(run, key) `get_metric_history` loop the MLflow docs suggest.
2. the Chinchilla multi-start fit on 250 points (target < 20 s), with and without 100 bootstrap resamples.

    python benchmarks/bench_analysis.py --out benchmarks/results/analysis.json
    python benchmarks/bench_analysis.py --only-fit --out benchmarks/results/analysis_fit.json   # part 2 alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from analysis import fits  # noqa: E402


def build_store(uri: str, runs: int, points: int) -> None:
    from mlflow.entities import Metric, Param

    from overtok.tracking import ROLE_TAG, SWEEP_TAG, TRIAL_ID_TAG, client

    c = client(uri)
    exp = c.create_experiment("bench")
    parent = c.create_run(exp, tags={SWEEP_TAG: "bench", ROLE_TAG: "parent"}).info.run_id
    params = {"model.vocab_size": 7, "model.d_model": 64, "model.n_layers": 2, "model.oe.n": 2, "model.oe.k": 1,
              "model.oe.m": 400, "model.od_depth": 1, "model.od_mode": "linear", "model.tokenizer_ngram": 1,
              "model.output_ngram": 1, "params.oe_tables": 400 * 64, "params.body": 100000, "params.head": 0,
              "params.embedding": 448, "params.oe_proj": 4096, "params.extra_heads": 0, "tokens_per_step": 1000}
    for i in range(runs):
        rid = c.create_run(exp, tags={SWEEP_TAG: "bench", ROLE_TAG: "trial", TRIAL_ID_TAG: f"t{i:05d}",
                                      "mlflow.parentRunId": parent}).info.run_id
        c.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
        for start in range(0, points, 1000):  # half train/loss, half perf/tokens_per_s
            ms = [Metric("train/loss" if j % 2 else "perf/tokens_per_s", 3.0 - j * 1e-4, 0, 1000 * (j // 2 + 1))
                  for j in range(start, min(start + 1000, points))]
            c.log_batch(rid, metrics=ms)
        c.set_terminated(rid, "FINISHED")


def per_key_loop(uri: str) -> int:
    from overtok.tracking import client

    c = client(uri)
    exp = c.get_experiment_by_name("bench")
    n = 0
    for r in c.search_runs([exp.experiment_id], max_results=50000):
        for key in r.data.metrics:
            n += len(c.get_metric_history(r.info.run_id, key))
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--only-fit", action="store_true", help="only the Chinchilla fits (no MLflow store)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_fit:
            export_rows(tmp, args, rows)
    fit_rows(rows)
    for r in rows:
        print(f"{r['task']:>55}  {r['seconds']:7.2f} s  {r.get('points', '')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                                          "command": " ".join(sys.argv), "results": rows}, indent=2))


def export_rows(tmp: str, args, rows: list) -> None:
    """Export of a store of args.runs x args.points against the per-(run, key) loop."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    t0 = time.time()
    build_store(uri, args.runs, args.points)
    print(f"store built: {args.runs} runs x {args.points} points in {time.time() - t0:.0f}s", flush=True)
    from overtok.export import export_sweep

    t0 = time.time()
    export_sweep("bench", uri, Path(tmp) / "out")
    t_export = time.time() - t0
    import pandas as pd

    n_points = len(pd.read_parquet(Path(tmp) / "out" / "curves.parquet"))
    rows.append({"task": "overtok export (bulk SQL)", "runs": args.runs, "points": n_points, "seconds": t_export})
    t0 = time.time()
    n_loop = per_key_loop(uri)
    rows.append({"task": "get_metric_history per (run, key)", "runs": args.runs, "points": n_loop,
                 "seconds": time.time() - t0})


def fit_rows(rows: list) -> None:
    rng = np.random.default_rng(0)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 250))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 250))
    L = fits.chinchilla_predict({"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}, N, D)
    L = L * np.exp(rng.normal(0, 0.005, 250))
    for boot in (0, 100):
        t0 = time.time()
        fits.fit_chinchilla(N, D, L, bootstrap=boot)
        rows.append({"task": f"Chinchilla fit, 250 points, 4500 starts, {boot} bootstrap", "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
