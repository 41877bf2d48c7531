"""Where a tiny trial's steady training step goes, host against GPU: runs `overtok.train.train` on a config (600
steps) with `overtok.engine.accumulate` wrapped, so that at its 300th call a torch profiler records 20 steps
(printed: kernels by GPU time, operators by host time, wall time per step), steps 400-500 are timed without the
profiler (the GPU drained at both ends), and the host time of every accumulate call (issuing forward and backward)
is kept; its median over calls 350-600 is printed. Run in the root of the overtok checkout to probe (the current
directory comes first on the path, so an older checkout can be probed the same way).

    python benchmarks/probe_trainer_host.py benchmarks/configs/cfg_tiny.json > probe.log
"""

import json
import sys
import time

sys.path.insert(0, ".")

import torch  # noqa: E402

import overtok.engine as E  # noqa: E402
import overtok.train as T  # noqa: E402
from overtok.config import build_config  # noqa: E402
from overtok.data import resolve_vocab  # noqa: E402

CUDA = torch.cuda.is_available()
ACTIVITIES = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
calls = {"n": 0}
state: dict = {}
plain_accumulate = E.accumulate


def sync():
    if CUDA:
        torch.cuda.synchronize()


def probed_accumulate(*a, **k):
    calls["n"] += 1
    n = calls["n"]
    if n == 300:
        sync()
        state["t0"] = time.perf_counter()
        state["prof"] = torch.profiler.profile(activities=ACTIVITIES)
        state["prof"].__enter__()
    if n == 320:
        sync()
        dt = (time.perf_counter() - state["t0"]) / 20
        state["prof"].__exit__(None, None, None)
        print(f"PROBE wall per step under the profiler: {dt * 1e3:.2f} ms", flush=True)
        ka = state["prof"].key_averages()
        print(ka.table(sort_by=("self_cuda_time_total" if CUDA else "self_cpu_time_total"), row_limit=25), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    if n == 400:
        sync()
        state["t1"] = time.perf_counter()
    if n == 500:
        sync()
        print(f"PROBE wall per step, no profiler: {(time.perf_counter() - state['t1']) / 100 * 1e3:.2f} ms", flush=True)
    t = time.perf_counter()
    out = plain_accumulate(*a, **k)
    state.setdefault("issue", []).append(time.perf_counter() - t)
    return out


def main():
    E.accumulate = probed_accumulate
    cfg = json.load(open(sys.argv[1]))
    cfg["train"]["max_steps"] = 600
    T.train(resolve_vocab(build_config(cfg)))
    issue = sorted(state["issue"][350:])
    print(f"PROBE host time in accumulate (fwd+bwd issue), median {issue[len(issue) // 2] * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
