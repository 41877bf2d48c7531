"""Shared helpers for the GPU benchmarks: build a model from overtok's config, time training steps side by side."""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import statistics
import time

import torch

from overtok import accounting
from overtok.config import load_config
from overtok.engine import StepGraph, set_kernels
from overtok.model import Transformer
from overtok.optim import make_optimizer


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


def sdpa_context(backend: str | None):
    """Restrict scaled_dot_product_attention to one backend ('flash', 'cudnn', 'efficient'); None = torch's choice."""

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    return sdpa_kernel([getattr(SDPBackend, names[backend])])


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


def kernel_names(kernels: dict[str, bool]) -> dict[str, str]:
    """The MLP and RoPE kernels that ran (``set_kernels``), as results record them: 'triton' or 'torch'."""
    return {f"{kind}_kernel": "triton" if kernels[kind] else "torch" for kind in ("mlp", "rope")}


def time_block(step, sync, steps: int) -> float:
    """Mean seconds per step over ``steps`` steps issued back to back, synchronised only at the ends, as the
    trainer runs them (the host issues the next step while the GPU works; per-step timing waits after each)."""
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    return (time.perf_counter() - t0) / steps


class Bench:
    """One model built as the trainer builds it (optimizer, loss kernel, compiled body and row update), with a
    training step on random tokens, bf16 autocast. ``time`` measures blocks of steps; several benches can be alive
    at once so that their blocks interleave (``interleaved``). One difference: ``mlp_kernel`` and ``rope_kernel``
    default to 'torch' where runtime.mlp_kernel and runtime.rope_kernel default to 'auto', so that the variants and
    commands committed before those kernels existed still measure what they measured; variants that want them name
    them."""

    def __init__(self, sets: dict, batch_size: int, compile_body: bool = True, loss_kernel: str = "auto",
                 compile_mode: str | None = None, sdpa: str | None = None, compile_update: bool | None = None,
                 residual_dtype: torch.dtype | None = None, whole_graph: bool = False, mlp_kernel: str = "torch",
                 compile_options: dict | None = None, rope_kernel: str = "torch"):
        cfg = self.cfg = config(sets)
        self.sets, self.batch_size = sets, batch_size
        dev = self.dev = fresh_device()
        torch.manual_seed(0)
        t0 = time.time()
        with torch.device(dev):
            model = self.model = Transformer(cfg.model)
        self.build_s = time.time() - t0
        self.opt = make_optimizer(model, cfg.train, dev)
        self.step_graph = None
        if whole_graph:  # the step replayed as one CUDA graph, as the trainer's (runtime.cuda_graph_scope = step)
            if dev.type != "cuda" or compile_mode == "reduce-overhead" or model.sparse_tables():
                raise ValueError("whole_graph: a CUDA device, torch.compile without its own CUDA graphs, dense tables")
            for group in self.opt.param_groups:  # before its first step: it keeps its step counts on the device
                group["capturable"] = True
            self.lr = torch.tensor(cfg.train.lr, dtype=torch.float32)  # on the host: copied in at every step
            self.step_graph = StepGraph(self._update, lambda: self.opt.zero_grad(set_to_none=True), dev)
        kernels = set_kernels(model, dev, loss_kernel, mlp_kernel, rope_kernel, field="{}_kernel")
        model.residual_dtype = residual_dtype  # applies under autocast (here: on CUDA)
        if compile_body:  # (torch.compile takes a mode or inductor options, not both)
            model.body_and_loss = torch.compile(model.body_and_loss, mode=compile_mode, options=compile_options)
        self.tables = model.sparse_tables()
        if compile_update is None:  # as the trainer
            compile_update = compile_body and dev.type == "cuda"
        if compile_update:  # as the trainer on CUDA: the n-gram ids and the tables' row update
            if hasattr(model.embed, "compile_ids"):  # (older checkouts timed with --tree-style A/Bs lack it)
                model.embed.compile_ids()
            for t in self.tables:
                t.compile_update()
        T = cfg.model.seq_len + cfg.model.lookahead
        self.batches = [torch.randint(0, cfg.model.input_vocab_size, (batch_size, T), device=dev) for _ in range(4)]
        self.sdpa = sdpa
        self.meta = {"loss": "fused triton" if model.fused_loss else "torch", "compile_mode": compile_mode or "default",
                     **kernel_names(kernels),
                     "compile_options": compile_options or {},
                     "whole_step_graph": whole_graph,
                     "sdpa": sdpa or "auto", "residual_dtype": str(residual_dtype or "float32 (embedding's)").replace("torch.", "")}
        with torch.no_grad(), self.autocast():
            self.first_loss = model(self.batches[0])[1]["total"].item()  # the same model and batch for every variant
        self.warmup_s = None

    def autocast(self):
        # (autocast's cache of cast weights would be recorded into a whole-step graph: off there)
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda",
                              cache_enabled=not self.meta["whole_step_graph"])

    def step(self, i: int) -> None:
        if self.step_graph is not None:
            self.step_graph.step(self.batches[i % 4], self.lr)
            return
        self._step(self.batches[i % 4])

    def _step(self, batch: torch.Tensor) -> None:
        self._update(batch)
        self.opt.zero_grad(set_to_none=True)
        for t in self.tables:
            t.apply_update(1e-3, 0.9, 0.95)

    def _update(self, batch: torch.Tensor, lr: torch.Tensor | None = None) -> None:
        """Forward, backward and AdamW on ``batch`` (lr: a device tensor that AdamW reads, in a step graph); the
        loss is kept (a recorded graph's: each replay's)."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        if self.meta["compile_mode"] == "reduce-overhead":  # CUDA graphs: this step's outputs replace the last's
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast(), sdpa_context(self.sdpa):
            _, losses = self.model(batch)
        losses["total"].backward()
        self.opt.step()
        self.last_loss = losses["total"].detach()

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def warm(self, steps: int) -> None:
        """``steps`` steps (a step graph: its eager warm-up steps, then it is recorded and replayed)."""
        if self.step_graph is not None and steps <= StepGraph.WARMUP:
            raise ValueError(f"whole_graph: warm up more than the step graph's {StepGraph.WARMUP} eager steps, so that "
                             "it is recorded before the timed steps")
        t0 = time.time()
        for i in range(steps):
            self.step(i)
        self.sync()
        self.warmup_s = time.time() - t0

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
        cfg = self.cfg
        tokens = self.batch_size * cfg.model.seq_len
        flops = accounting.flops_per_token(cfg.model)
        out = {"config": self.sets, "batch_size": self.batch_size, "first_loss": self.first_loss,
               "last_step_loss": float(self.last_loss), "step_ms": med * 1000,
               "tokens_per_s": tokens / med, "mfu": accounting.mfu(tokens / med, flops),
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else float("nan"),
               "params": accounting.param_groups(cfg.model), "build_s": self.build_s, "warmup_s": self.warmup_s,
               "optimizer": "adamw+oe_lazy_row_adam" if self.tables else "adamw",
               "row_update": ("compiled" if self.tables[0].update_compiled else "eager") if self.tables else None,
               **self.meta}
        if block is not None:
            out.update(step_ms_back_to_back=block * 1000, tokens_per_s_back_to_back=tokens / block,
                       mfu_back_to_back=accounting.mfu(tokens / block, flops))
        if profile:
            out.update(profile_steps(self.step, self.sync, self.dev))
        return out

    def close(self) -> None:
        dev = self.dev
        self.model = self.opt = self.batches = self.tables = None
        release(dev)


def time_training(sets: dict, batch_size: int, steps: int, warmup: int, profile: bool = False,
                  **kw) -> dict:
    """Median step time (CUDA events) of forward+backward+AdamW(+row-sparse update) on random tokens, bf16 autocast.

    Keywords as ``Bench``: loss_kernel as runtime.loss_kernel; mlp_kernel and rope_kernel as runtime.mlp_kernel and
    runtime.rope_kernel (default 'torch'); compile_mode as torch.compile's mode; sdpa pins the attention backend;
    compile_update: compile the row-sparse tables' update (default: as the trainer, with the body on CUDA);
    residual_dtype: the residual stream's dtype (None: the embedding's, float32); whole_graph: the step as one CUDA
    graph, as the trainer records it."""
    b = Bench(sets, batch_size, **kw)
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


def seeded_models(cfg, P: int, dev: torch.device) -> Transformer:
    """Models 0..P-1 of cfg, model p initialised with seed p, on dev: the one model (P = 1) or the P packed into one
    (overtok.packed), as a sweep's trials with seeds 0..P-1 would start."""
    from overtok.packed import pack_models

    models = []
    for seed in range(P):
        torch.manual_seed(seed)
        with torch.device(dev):
            models.append(Transformer(cfg.model))
    return models[0] if P == 1 else pack_models(models)


def time_packed(sets: dict, P: int, batch_size: int, steps: int, warmup: int, profile: bool = False,
                loss_kernel: str = "auto", compile_mode: str | None = None, whole: bool = False,
                mlp_kernel: str = "torch", rope_kernel: str = "torch") -> dict:
    """Median step time of P same-shape models packed into one (overtok.packed), as ``time_training`` does for one
    model: compiled body, bf16 autocast, PackedAdamW with per-slice clipping. ``compile_mode``: torch.compile's
    mode ("reduce-overhead": CUDA graphs); ``whole``: compile the embedding's lookup with the body (the whole
    forward). Also the host time to issue a step (if it is close to the step time, the loop is launch-bound) and,
    with ``profile``, the CUDA kernels of a few steps."""
    from overtok.optim import PackedAdamW

    cfg = config(sets)
    dev = fresh_device()
    model = seeded_models(cfg, P, dev)
    opt = PackedAdamW(model, cfg.train)
    kernels = set_kernels(model, dev, loss_kernel, mlp_kernel, rope_kernel, field="{}_kernel")
    if whole:
        model.forward = torch.compile(model.forward, mode=compile_mode)
    else:
        model.body_and_loss = torch.compile(model.body_and_loss, mode=compile_mode)
    graphs = compile_mode == "reduce-overhead"
    T = cfg.model.seq_len + cfg.model.lookahead
    batches = [torch.randint(0, cfg.model.input_vocab_size, (P * batch_size, T), device=dev) for _ in range(4)]
    lrs = torch.full((P,), 1e-3, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        first_loss = model(batches[0])[1]["total"].tolist()  # per slice: the same models and batch in every variant

    def step(i):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            _, losses = model(batches[i % 4])
        losses["total"].sum().backward()
        opt.step(lrs, 1.0)
        opt.zero_grad()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.time()
    for i in range(warmup):
        step(i)
    sync()
    warm_s = time.time() - t0
    times, host = [], []
    for i in range(steps):
        t = time.perf_counter()
        step(i)
        host.append(time.perf_counter() - t)  # issuing only: kernels run asynchronously
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    host.sort()
    med = times[len(times) // 2]
    block = time_block(step, sync, steps)
    tokens = P * batch_size * cfg.model.seq_len
    out = {"config": sets, "pack": P, "batch_size_per_slice": batch_size, "step_ms": med * 1000,
           "host_issue_ms": host[len(host) // 2] * 1000, "tokens_per_s": tokens / med,
           "step_ms_back_to_back": block * 1000, "tokens_per_s_back_to_back": tokens / block,
           "mfu": accounting.mfu(tokens / med, accounting.flops_per_token(cfg.model)),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"),
           "warmup_s": warm_s, "optimizer": "packed_adamw (fused kernel per slice)",
           "compile_mode": compile_mode or "default", "compiled": "forward" if whole else "body_and_loss",
           "loss": "fused triton" if model.fused_loss else "torch", "first_loss": first_loss[0], "first_losses": first_loss,
           **kernel_names(kernels)}
    if profile:
        out.update(profile_steps(step, sync, dev))
    model = opt = batches = step = None  # noqa: F841 - release before the next variant
    release(dev)
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

