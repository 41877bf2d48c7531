"""The sweep driver's fixed costs (issue 6, target 4), through the real CLI, side by side on one machine:

1. a fresh 2-trial tiny CFG sweep with its own local Ray (the default), then rerunning the finished sweep (nothing
   to do), for this tree and for any other checkouts given with --tree (alternating within each repeat);
2. the same sweep while a Ray instance started by `ray start --head` runs on the machine (the sweep attaches).

Every variant runs in its own fresh directory (own MLflow store); each is repeated --repeats times.
With --ray-init, first the bare `ray.init` of a local instance is timed in fresh processes (import, init, a first
trivial task, shutdown), for Ray's defaults and for the variants in RAY_INIT (--ray-init-rows: some of them).
With --checks, first the CLI's checks before anything starts (CHECKS: nvidia-smi, importing Ray, ...), each in a
fresh process.

    python benchmarks/bench_driver.py --out benchmarks/results/cpu_driver.json [--tree OTHER_CHECKOUT ...] [--ray-init]
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
             "train": {"max_steps": 20, "eval_every": 20, "log_every": 5, "gen_samples": 0}, "runtime": {"compile": False}},
    "seeds": [0, 1],
    "resources": {"cpu": 1},
}


def sweep(work: Path, tree: Path) -> float:
    """`overtok sweep driver.yaml` of source tree ``tree`` in ``work``; wall seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
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
    # through the interpreter: where Ray is unpacked onto PYTHONPATH (the GPU machine) there is no `ray` script
    main = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
    subprocess.run([sys.executable, "-c", main, *args], check=True, capture_output=True)


# (label, ray.init keywords as Python source) for the bare-start timing; the first row runs first, on whatever
# caches the machine has (a fresh machine: the first start of the day)
RAY_INIT = [
    ("as overtok sweep (first start)", "include_dashboard=False"),
    ("as overtok sweep", "include_dashboard=False"),
    ("as overtok sweep, stopped as overtok sweep stops it", "include_dashboard=False"),
    ("no worker prestart", "include_dashboard=False, _system_config={'enable_worker_prestart': False}"),
    ("num_cpus=1 (one prestarted worker)", "include_dashboard=False, num_cpus=1"),
    ("GPUs given (num_gpus=1)", "include_dashboard=False, num_gpus=1"),
    ("object store 2 GiB", "include_dashboard=False, object_store_memory=2 * 1024**3"),
    ("usage stats off (RAY_USAGE_STATS_ENABLED=0)", "include_dashboard=False"),
]
RAY_INIT_ENV = {"usage stats off (RAY_USAGE_STATS_ENABLED=0)": {"RAY_USAGE_STATS_ENABLED": "0"}}
# how each start is stopped: ray.shutdown(), except where named here (the driver's stop, its monitor killed first)
RAY_STOP = {"as overtok sweep, stopped as overtok sweep stops it": "from overtok.tune import _shutdown_ray; _shutdown_ray()"}

CHILD = """
import json, time
t0 = time.time()
import ray
t1 = time.time()
ray.init(logging_level="WARNING", {kwargs})
t2 = time.time()
ray.get(ray.remote(lambda: 1).options(num_cpus=0).remote())
t3 = time.time()
{stop}
t4 = time.time()
print("RESULT", json.dumps({{"import_s": t1 - t0, "init_s": t2 - t1, "first_task_s": t3 - t2, "shutdown_s": t4 - t3}}))
"""


def run_child(code: str, env: dict) -> tuple[object | None, subprocess.CompletedProcess]:
    """Run ``code`` in a fresh Python process in the project root: the JSON on its ``RESULT `` line (None where it
    printed none, i.e. it failed) and the finished process (its output)."""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return (json.loads(line[7:]) if line else None), res


def ray_init_times(rows, repeats: int, only: list[int] | None = None) -> None:
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    for i in range(repeats):
        for j, (label, kwargs) in enumerate(RAY_INIT):
            if (j == 0 and i > 0) or (only is not None and j not in only):
                continue
            code = CHILD.format(kwargs=kwargs, stop=RAY_STOP.get(label, "ray.shutdown()"))
            result, res = run_child(code, {**env, **RAY_INIT_ENV.get(label, {})})
            if result is None:
                row = {"ray_init": label, "kwargs": kwargs, "error": (res.stdout + res.stderr)[-1500:]}
                print(f"ray.init {label}: failed\n{row['error']}", flush=True)
            else:
                row = {"ray_init": label, "kwargs": kwargs, "repeat": i, **result}
                print(f"ray.init {label:>36}: import {row['import_s']:.1f} s, init {row['init_s']:.1f} s, first task "
                      f"{row['first_task_s']:.2f} s, shutdown {row['shutdown_s']:.1f} s", flush=True)
            rows.append(row)


# the CLI's checks before anything starts (overtok.sweep), each in a fresh process: what a sweep asking for a GPU
# and 4 CPUs pays before its clock's first phase ends
CHECKS = {
    "nvidia-smi -L (subprocess)": "import subprocess; subprocess.run(['nvidia-smi', '-L'], capture_output=True)",
    "local_gpus()": "from overtok.sweep import local_gpus; print('COUNT', local_gpus())",
    "/dev/nvidia<N> nodes": "import re, os; print('COUNT', sum(bool(re.fullmatch(r'nvidia[0-9]+', f)) "
                            "for f in os.listdir('/dev')))",
    "/proc/driver/nvidia/gpus": "import os; p = '/proc/driver/nvidia/gpus'; "
                                "print('COUNT', len(os.listdir(p)) if os.path.isdir(p) else 0)",
    "import ray": "import ray",
    "local_cpus(4) (imports Ray)": "from overtok.sweep import local_cpus; local_cpus(4)",
    "Ray's own GPU count (NVML)": "from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as M; "
                                  "print('COUNT', M.get_current_node_num_accelerators())",
}


def check_times(rows, repeats: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # (local_gpus then asks nvidia-smi)
    for i in range(repeats):
        for label, code in CHECKS.items():
            timed = f"import time, json; t0 = time.time(); {code}; print('RESULT', json.dumps(time.time() - t0))"
            seconds, res = run_child(timed, env)
            row = {"check": label, "repeat": i, **({"s": seconds} if seconds is not None else
                                                    {"error": (res.stdout + res.stderr)[-1500:]})}
            counts = [int(ln[6:]) for ln in res.stdout.splitlines() if ln.startswith("COUNT ")]
            if counts:
                row["count"] = counts[-1]
            rows.append(row)
            print(f"check {label:>30}: " + (f"{row['s']:.2f} s" if "s" in row else f"failed\n{row['error']}")
                  + (f" ({row['count']} GPUs)" if "count" in row else ""), flush=True)


def ray_init_profile(rows) -> None:
    """Where a bare ray.init spends its time: the driver under cProfile, the 30 entries of largest cumulative time
    (waits on the processes it starts show up as the functions that wait)."""
    code = ("import cProfile, pstats, io, ray\n"
            "p = cProfile.Profile(); p.enable(); ray.init(logging_level='WARNING', include_dashboard=False); p.disable()\n"
            "ray.shutdown(); s = io.StringIO(); pstats.Stats(p, stream=s).sort_stats('cumulative').print_stats(30)\n"
            "print(s.getvalue())")
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    print(res.stdout[-6000:], res.stderr[-2000:], flush=True)
    rows.append({"ray_init_profile": res.stdout[-12000:]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu_driver.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tree", nargs="*", default=[], help="other checkouts of overtok whose no-op rerun is timed too")
    ap.add_argument("--ray-init", action="store_true", help="first time a bare ray.init in fresh processes")
    ap.add_argument("--ray-init-only", action="store_true", help="only the ray.init timings (and profile)")
    ap.add_argument("--ray-init-profile", action="store_true", help="also profile one bare ray.init")
    ap.add_argument("--ray-init-rows", type=int, nargs="+", help="only these rows of RAY_INIT (0-based)")
    ap.add_argument("--checks", action="store_true", help="first time the CLI's checks, each in a fresh process")
    args = ap.parse_args()
    rows = Rows(args.out, " ".join(sys.argv))
    if args.checks:
        check_times(rows, args.repeats)
    if args.ray_init or args.ray_init_only:
        ray_init_times(rows, args.repeats, args.ray_init_rows)
    if args.ray_init_profile:
        ray_init_profile(rows)
    if args.ray_init_only:
        return
    trees = [ROOT] + [Path(t).resolve() for t in args.tree]
    for i in range(args.repeats):
        fresh, reruns = {}, {}
        for t in trees:
            work = fresh_dir()
            fresh[str(t)] = sweep(work, t)
            reruns[str(t)] = sweep(work, t)  # the store now holds the finished sweep
        ray_cli("start", "--head", "--include-dashboard=false")
        try:
            attached = sweep(fresh_dir(), ROOT)
        finally:
            ray_cli("stop")
        row = {"repeat": i, "fresh_sweep_local_ray_s": fresh, "fresh_sweep_attached_to_running_ray_s": attached,
               "noop_rerun_s": reruns}
        rows.append(row)
        name = lambda t: Path(t).name or t  # noqa: E731
        print(f"repeat {i}: fresh sweep (own Ray) " + ", ".join(f"{name(t)}: {s:.1f} s" for t, s in fresh.items())
              + f" / {attached:.1f} s attached to a running Ray; no-op rerun "
              + ", ".join(f"{name(t)}: {s:.1f} s" for t, s in reruns.items()), flush=True)

if __name__ == "__main__":
    main()
