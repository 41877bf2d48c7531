"""The sweep driver's fixed costs (issue 6, target 4), through the real CLI, side by side on one machine:

1. a fresh 2-trial tiny CFG sweep with its own local Ray (the default);
2. the same sweep while a Ray instance started by `ray start --head` runs on the machine (the sweep attaches);
3. rerunning the finished sweep (nothing to do), for this tree and for any other checkouts given with --tree.

Every variant runs in its own fresh directory (own MLflow store); each is repeated --repeats times.

    python benchmarks/bench_driver.py --out benchmarks/results/cpu_driver.json [--tree OTHER_CHECKOUT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Rows  # noqa: E402

SWEEP = {
    "name": "driver",
    "base": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32}, "data": {"kind": "cfg", "batch_size": 4},
             "train": {"max_steps": 20, "eval_every": 20, "log_every": 5, "gen_samples": 0, "compile": False}},
    "seeds": [0, 1],
    "resources": {"cpu": 1},
}


def sweep(work: Path, tree: Path) -> float:
    """`overtok sweep driver.yaml` of source tree ``tree`` in ``work``; wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "overtok", "sweep", "driver.yaml"], cwd=work, env=env,
                         capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"sweep in {work} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return wall


def fresh_dir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="bench-driver-"))
    (work / "driver.yaml").write_text(json.dumps(SWEEP))
    return work


def ray_cli(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu_driver.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tree", nargs="*", default=[], help="other checkouts of overtok whose no-op rerun is timed too")
    args = ap.parse_args()
    rows = Rows(args.out, " ".join(sys.argv))
    trees = [ROOT] + [Path(t).resolve() for t in args.tree]
    for i in range(args.repeats):
        work = fresh_dir()
        fresh = sweep(work, ROOT)
        reruns = {str(t): sweep(work, t) for t in trees}  # the store now holds the finished sweep
        ray_cli("start", "--head", "--include-dashboard=false")
        try:
            attached = sweep(fresh_dir(), ROOT)
        finally:
            ray_cli("stop")
        row = {"repeat": i, "fresh_sweep_local_ray_s": fresh, "fresh_sweep_attached_to_running_ray_s": attached,
               "noop_rerun_s": reruns}
        rows.append(row)
        print(f"repeat {i}: fresh sweep {fresh:.1f} s (own Ray) / {attached:.1f} s (attached to a running Ray); "
              + "no-op rerun " + ", ".join(f"{Path(t).name or t}: {s:.1f} s" for t, s in reruns.items()), flush=True)


if __name__ == "__main__":
    main()
