"""Where the sweep driver's last seconds go (issue 6, target 4), each part in fresh processes, --repeats times:

1. ``ray.shutdown`` of a bare local Ray, with the time of each process type's stop (Ray stops them one after
   another: SIGTERM, then up to 1 s of waiting, then SIGKILL);
2. a 1-trial tiny CFG sweep through the CLI, once with ``main()`` called from a wrapper (the interpreter's normal
   teardown after it returns) and once as ``python -m overtok`` (``overtok.cli._exit_now``): the process's wall
   time beyond the driver's printed "in all" (its start and imports before the clock, its exit after), and for the
   wrapped one the seconds from the end of ``main`` to the end of the process.

    python benchmarks/probe_driver_exit.py --out benchmarks/results/cpu_driver_exit.json
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

from benchmarks.bench_driver import SWEEP, run_child  # noqa: E402
from benchmarks.common import Rows  # noqa: E402

STOP = """
import json, time, ray
import ray._private.node as node
plain, kills = node.Node._kill_process_impl, {}
def timed(self, kind, *a, **k):
    t = time.time()
    out = plain(self, kind, *a, **k)
    kills[kind] = time.time() - t
    return out
node.Node._kill_process_impl = timed
ray.init(include_dashboard=False, logging_level="ERROR")
ray.get(ray.remote(lambda: 1).options(num_cpus=0).remote())
t = time.time()
ray.shutdown()
print("RESULT", json.dumps({"shutdown_s": time.time() - t, "per_process_type_s": kills}))
"""

# main() called with an argument list returns normally (no _exit_now): the interpreter's teardown follows
WRAPPED = """
import sys, time
from overtok.cli import main
rc = main(sys.argv[1:])
print(f"MAIN_END {time.time()}", flush=True)
sys.exit(rc)
"""


def env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def stop_times(rows, i: int) -> None:
    result, res = run_child(STOP, env())
    row = {"part": "ray.shutdown", "repeat": i, **(result if result is not None else {"error": res.stderr[-1500:]})}
    rows.append(row)
    print(f"ray.shutdown {row.get('shutdown_s', float('nan')):.2f} s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in row.get("per_process_type_s", {}).items()), flush=True)


def sweep_exit(rows, i: int, how: str) -> None:
    """The process's wall time beyond the driver's printed clock, and (wrapped) after main returned."""
    work = Path(tempfile.mkdtemp(prefix="probe-exit-"))
    d = dict(SWEEP, name="exit", seeds=[0])
    (work / "exit.yaml").write_text(json.dumps(d))
    cmd = ["-c", WRAPPED] if how == "main() returns, normal teardown" else ["-m", "overtok"]
    t0 = time.time()
    res = subprocess.run([sys.executable, *cmd, "sweep", "exit.yaml"], env=env(), capture_output=True, text=True,
                         cwd=work)
    end = time.time()
    if res.returncode != 0:
        raise RuntimeError(f"sweep failed:\n{(res.stdout + res.stderr)[-3000:]}")
    marks = [float(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("MAIN_END ")]
    clock = next(ln for ln in res.stdout.splitlines() if " s in all: " in ln)
    in_all = float(clock.split(" s in all: ")[0].rsplit(" ", 1)[1])
    row = {"part": "sweep exit", "how": how, "repeat": i, "clock": clock, "wall_s": end - t0,
           "beyond_clock_s": end - t0 - in_all}
    if marks:
        row["after_main_s"] = end - marks[0]
    rows.append(row)
    print(f"sweep, {how}: wall {row['wall_s']:.1f} s, {row['beyond_clock_s']:.2f} s beyond its clock"
          + (f", {row['after_main_s']:.2f} s after main returned" if marks else "")
          + f" | {clock.split('] ', 1)[-1]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu_driver_exit.json")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = Rows(args.out, " ".join(sys.argv))
    for i in range(args.repeats):
        stop_times(rows, i)
        sweep_exit(rows, i, "main() returns, normal teardown")
        sweep_exit(rows, i, "python -m overtok (_exit_now)")


if __name__ == "__main__":
    main()
