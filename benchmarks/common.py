"""Shared helpers for the GPU benchmarks: build a model from overtok's config, time training steps side by side."""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import statistics
import time

import torch

from overtok import accounting
from overtok.config import load_config
from overtok.engine import StepGraph, build_engine
from overtok.model import Transformer


def config(sets: dict):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def fresh_device() -> torch.device:
    """The GPU (else the CPU) with cached blocks freed and the peak-memory counter reset, before a variant."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dev


def release(dev: torch.device) -> None:
    """After a variant (its references dropped by the caller): compiled code keeps the module (and so its OE tables)
    alive, so reset it before the next variant's peak is measured."""
    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def profile_steps(step, sync, dev: torch.device, n: int = 3) -> dict:
    """Profile n steps: the top kernels as torch.profiler's table, and every kernel's time per step summed into
    categories (``kernel_categories``), so the whole step is accounted for, not just its largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as pr:
        for i in range(n):
            step(i)
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    out = {"profile_top_kernels": pr.key_averages().table(sort_by=key, row_limit=24, max_name_column_width=60)}
    if dev.type == "cuda":
        out["profile_categories_ms"] = kernel_categories(pr.key_averages(), n)
        out["profile_timeline_ms"] = kernel_timeline(pr.events(), n)
    return out


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Total length where two sorted, disjoint interval lists overlap."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_ms(comm: list[tuple[float, float]], compute: list[tuple[float, float]], n_steps: int) -> dict:
    """When the GPU communicated and when it computed, from kernel intervals (microseconds): per step, the time some
    NCCL kernel ran, how much of it some other kernel ran beside (hidden) and how much not (exposed), and the time
    no kernel ran at all within the profiled span."""
    comm, compute = _union(comm), _union(compute)
    both = _union(comm + compute)
    span = (both[-1][1] - both[0][0]) if both else 0.0
    hidden = _intersection(comm, compute)
    per = 1000.0 * n_steps
    return {"span": span / per, "compute_busy": _length(compute) / per, "comm_busy": _length(comm) / per,
            "comm_hidden": hidden / per, "comm_exposed": (_length(comm) - hidden) / per,
            "idle": (span - _length(both)) / per}


def _is_gpu_kernel(e, name: str) -> bool:
    """A profiler event (or average) that is a GPU kernel: not a CPU op (those also report the device time of the
    kernels they launched) and not a range annotated on the GPU (DistributedDataParallel.forward, nccl:all_reduce)."""
    from torch.autograd import DeviceType

    return (getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not name.startswith("nccl:"))


def kernel_timeline(events, n_steps: int) -> dict:
    """overlap_ms of the profiled CUDA kernels (NCCL's against every other kernel), per step."""
    comm, compute = [], []
    for e in events:
        if not _is_gpu_kernel(e, e.name) or e.time_range.end <= e.time_range.start:
            continue
        (comm if "nccl" in e.name.lower() else compute).append((e.time_range.start, e.time_range.end))
    return overlap_ms(comm, compute, n_steps)


CATEGORIES = [  # (category, substrings of a lower-cased kernel name), first match wins
    ("nccl (communication)", ("nccl",)),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "bmm")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("fused loss", ("_ce_rows",)),
    ("optimizer (fused/foreach)", ("adam", "multi_tensor", "foreach")),
    ("inductor reductions", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi", "triton_")),
    ("sort/index/scatter", ("sort", "radix", "scan", "index", "scatter", "gather", "embedding", "unique", "cumsum")),
    ("aten elementwise/copy/fill", ("elementwise", "vectorized", "reduce", "fill", "copy", "cat")),
    ("memcpy/memset", ("memcpy", "memset")),
]


def kernel_categories(averages, n_steps: int) -> dict:
    """Milliseconds per step of every CUDA kernel, by category, with each category's five largest kernels."""
    cats: dict[str, dict] = {}
    for e in averages:
        if not _is_gpu_kernel(e, e.key):
            continue
        ms = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) / 1000 / n_steps
        if ms <= 0:
            continue
        name = e.key.lower()
        cat = next((c for c, subs in CATEGORIES if any(s in name for s in subs)), "other")
        c = cats.setdefault(cat, {"ms": 0.0, "kernels": {}})
        c["ms"] += ms
        c["kernels"][e.key[:80]] = c["kernels"].get(e.key[:80], 0.0) + ms
    for c in cats.values():
        c["kernels"] = dict(sorted(c["kernels"].items(), key=lambda kv: -kv[1])[:5])
    cats = dict(sorted(cats.items(), key=lambda kv: -kv[1]["ms"]))
    cats["all kernels"] = {"ms": sum(c["ms"] for c in cats.values())}
    return cats


def format_categories(cats: dict) -> str:
    return "\n".join(f"    {name:>28} {c['ms']:7.2f} ms/step" + ("" if "kernels" not in c else "   " + "; ".join(
        f"{k[:48]} {v:.2f}" for k, v in list(c["kernels"].items())[:3])) for name, c in cats.items())


def time_block(step, sync, steps: int) -> float:
    """Mean seconds per step over ``steps`` steps issued back to back, synchronised only at the ends, as the
    trainer runs them (the host issues the next step while the GPU works; per-step timing waits after each)."""
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    return (time.perf_counter() - t0) / steps


def seeded_models(cfg, P: int, dev: torch.device) -> list[Transformer]:
    """Models 0..P-1 of cfg on dev, model p initialised with seed p, as a sweep's trials with seeds 0..P-1 start."""
    models = []
    for seed in range(P):
        torch.manual_seed(seed)
        with torch.device(dev):
            models.append(Transformer(cfg.model))
    return models


class Bench:
    """P >= 1 models of one config (``sets``: dotted keys, the ``runtime`` section included) made into what the
    trainer steps (``overtok.engine.build_engine``: the same kernels, compilation, CUDA graphs, optimizers and
    table updates as `overtok train` under that config), stepped on 4 fixed batches of random tokens. ``time``
    measures steps one at a time, ``time_block`` back to back; several benches can be alive at once so that their
    blocks interleave (``interleaved``)."""

    def __init__(self, sets: dict, batch_size: int, P: int = 1):
        cfg = self.cfg = config(sets)
        self.sets, self.batch_size, self.P = sets, batch_size, P
        dev = self.dev = fresh_device()
        t0 = time.time()
        models = seeded_models(cfg, P, dev)
        self.build_s = time.time() - t0
        T = cfg.model.seq_len + cfg.model.lookahead
        self.batches = [torch.randint(0, cfg.model.input_vocab_size, (P * batch_size, T)) for _ in range(4)]
        self.calls = 0

        def draw() -> torch.Tensor:  # on the host, as the trainer's data
            self.calls += 1
            return self.batches[(self.calls - 1) % 4]

        self.engine = build_engine(models, [dataclasses.replace(cfg, seed=p) for p in range(P)], dev, draw)
        del models
        self.lrs = [cfg.train.lr] * P
        with torch.no_grad(), self.engine.autocast():  # the same models and batch in every variant
            self.first_losses = torch.atleast_1d(self.engine.model(self.batches[0].to(dev))[1]["total"]).tolist()
        self.host_issue: list[float] = []
        self.warmup_s = None

    def step(self, i: int) -> None:
        t = time.perf_counter()
        parts, _ = self.engine.step(self.lrs)
        self.host_issue.append(time.perf_counter() - t)  # issuing only: kernels run asynchronously
        self.last_loss = parts["total"]

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def warm(self, steps: int) -> None:
        """``steps`` steps (a recorded step: its eager warm-up steps, then it is recorded and replayed)."""
        if self.engine.flags["perf/step_graph"] and steps <= StepGraph.WARMUP:
            raise ValueError(f"the step is recorded as a CUDA graph: warm up more than its {StepGraph.WARMUP} eager "
                             "steps, so that it is recorded before the timed steps")
        t0 = time.time()
        for i in range(steps):
            self.step(i)
        self.sync()
        self.warmup_s = time.time() - t0
        self.host_issue = []

    def time(self, steps: int) -> list[float]:
        """Seconds of each step (CUDA events on a GPU)."""
        times = []
        for i in range(steps):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self.step(i)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                t = time.time()
                self.step(i)
                times.append(time.time() - t)
        return times

    def time_block(self, steps: int) -> float:
        return time_block(self.step, self.sync, steps)

    def result(self, times: list[float], profile: bool = False, block: float | None = None) -> dict:
        """Summary of per-step times (``time``); ``block``: seconds per step of a back-to-back block (``time_block``)."""
        med = statistics.median(times)
        cfg, flags = self.cfg, self.engine.flags
        tokens = self.P * self.batch_size * cfg.model.seq_len
        flops = accounting.flops_per_token(cfg.model)
        tables = getattr(self.engine, "tables", [])
        out = {"config": self.sets, "pack": self.P, "batch_size": self.batch_size,
               "first_loss": self.first_losses[0], "first_losses": self.first_losses,
               "last_step_loss": torch.atleast_1d(self.last_loss).tolist()[0], "step_ms": med * 1000,
               "host_issue_ms": statistics.median(self.host_issue) * 1000, "tokens_per_s": tokens / med,
               "mfu": accounting.mfu(tokens / med, flops),
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else float("nan"),
               "params": accounting.param_groups(cfg.model), "build_s": self.build_s, "warmup_s": self.warmup_s,
               "optimizer": ("packed_adamw" if self.P > 1 else "adamw") + ("+oe_row_adam" if tables else ""),
               "row_update": ("compiled" if tables[0].update_compiled else "eager") if tables else None,
               "runtime": dataclasses.asdict(cfg.runtime), **flags}
        if block is not None:
            out.update(step_ms_back_to_back=block * 1000, tokens_per_s_back_to_back=tokens / block,
                       mfu_back_to_back=accounting.mfu(tokens / block, flops))
        if profile:
            out.update(profile_steps(self.step, self.sync, self.dev))
        return out

    def close(self) -> None:
        dev = self.dev
        self.engine = self.batches = self.last_loss = None
        release(dev)


def time_training(sets: dict, batch_size: int, steps: int, warmup: int, profile: bool = False, P: int = 1) -> dict:
    """A ``Bench`` of P models warmed up, then timed step by step and back to back: its ``result``."""
    b = Bench(sets, batch_size, P)
    b.warm(warmup)
    times = b.time(steps)
    out = b.result(times, profile=profile, block=b.time_block(steps))
    b.close()
    return out


def interleaved(benches: dict[str, Bench], steps: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Step seconds of each bench in each of ``rounds`` rounds, {name: {"per_step": medians of ``time``,
    "back_to_back": ``time_block``}}; within a round the benches take turns, so a drift of the machine's speed
    hits them alike."""
    out = {name: {"per_step": [], "back_to_back": []} for name in benches}
    for _ in range(rounds):
        for name, b in benches.items():
            out[name]["per_step"].append(statistics.median(b.time(steps)))
            out[name]["back_to_back"].append(b.time_block(steps))
    return out


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def dump(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


class Rows(list):
    """Result rows, written to ``path`` after every append: a run stopped at its time limit keeps what it measured."""

    def __init__(self, path, command: str):
        super().__init__()
        self.path, self.command = path, command

    def append(self, row):
        super().append(row)
        dump(self.path, {"environment": environment(), "command": self.command, "results": list(self)})

