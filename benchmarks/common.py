"""Shared helpers for the GPU benchmarks: build a model from overtok's config, time training steps side by side."""

from __future__ import annotations

import gc
import json
import platform
import time

import torch

from overtok import accounting
from overtok.config import load_config
from overtok.model import Transformer
from overtok.train import make_optimizer, use_fused_loss

H100_BF16_PEAK = 989e12


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
    import contextlib

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    return sdpa_kernel([getattr(SDPBackend, names[backend])])


def profile_steps(step, sync, dev: torch.device, n: int = 3) -> str:
    """The top kernels of n steps (CUDA time on a GPU), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as pr:
        for i in range(n):
            step(i)
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    return pr.key_averages().table(sort_by=key, row_limit=24, max_name_column_width=60)


def time_training(sets: dict, batch_size: int, steps: int, warmup: int, compile_body: bool = True,
                  loss_kernel: str = "auto", compile_mode: str | None = None, sdpa: str | None = None,
                  profile: bool = False, compile_update: bool | None = None) -> dict:
    """Median step time (CUDA events) of forward+backward+AdamW(+row-sparse update) on random tokens, bf16 autocast.

    loss_kernel as train.loss_kernel; compile_mode as torch.compile's mode; sdpa pins the attention backend;
    compile_update: compile the row-sparse tables' update (default: as the trainer, with the body on CUDA)."""
    cfg = config(sets)
    dev = fresh_device()
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        model = Transformer(cfg.model)
    build_s = time.time() - t0
    opt = make_optimizer(model, cfg.train, dev)
    model.fused_loss = use_fused_loss(loss_kernel, dev)
    if compile_body:
        model.body_and_loss = torch.compile(model.body_and_loss, mode=compile_mode)
    tables = model.sparse_tables()
    if compile_update is None:  # as the trainer
        compile_update = compile_body and dev.type == "cuda"
    if compile_update:
        for t in tables:
            t.compile_update()
    T = cfg.model.seq_len + cfg.model.lookahead
    V = cfg.model.input_vocab_size
    batches = [torch.randint(0, V, (batch_size, T), device=dev) for _ in range(4)]

    def step(i):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"), sdpa_context(sdpa):
            _, losses = model(batches[i % 4])
        losses["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for t in tables:
            t.apply_update(1e-3, 0.9, 0.95)

    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        first_loss = model(batches[0])[1]["total"].item()  # the same model and batch for every variant of a size
    t0 = time.time()
    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.time() - t0
    times = []
    for i in range(steps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.time()
            step(i)
            times.append(time.time() - t)
    times.sort()
    med = times[len(times) // 2]
    tokens = batch_size * cfg.model.seq_len
    groups = accounting.param_groups(cfg.model)
    out = {"config": sets, "batch_size": batch_size, "first_loss": first_loss, "step_ms": med * 1000, "tokens_per_s": tokens / med,
           "mfu": tokens / med * accounting.flops_per_token(cfg.model) / H100_BF16_PEAK,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"),
           "params": groups, "build_s": build_s, "warmup_s": warm_s,
           "optimizer": "adamw+oe_lazy_row_adam" if tables else "adamw",
           "row_update": ("compiled" if tables[0].update_compiled else "eager") if tables else None,
           "loss": "fused triton" if model.fused_loss else "torch", "compile_mode": compile_mode or "default",
           "sdpa": sdpa or "auto"}
    if profile:
        out["profile_top_kernels"] = profile_steps(step, torch.cuda.synchronize if dev.type == "cuda" else lambda: None,
                                                   dev)
    model = opt = batches = step = tables = None  # noqa: F841 - release before the next variant
    release(dev)
    return out


def time_packed(sets: dict, P: int, batch_size: int, steps: int, warmup: int, compile_opt: bool = True,
                profile: bool = False, loss_kernel: str = "auto") -> dict:
    """Median step time of P same-shape models packed into one (overtok.packed), as ``time_training`` does for one
    model: compiled body, bf16 autocast, PackedAdamW with per-slice clipping (compiled or eager). Also the host time
    to issue a step (if it is close to the step time, the loop is launch-bound) and, with ``profile``, the top
    CUDA kernels of a few steps."""
    from overtok.packed import PackedAdamW, pack_models

    cfg = config(sets)
    dev = fresh_device()
    models = []
    for seed in range(P):
        torch.manual_seed(seed)
        with torch.device(dev):
            models.append(Transformer(cfg.model))
    model = pack_models(models)
    del models
    opt = PackedAdamW(model, cfg.train, compile_step=compile_opt)
    model.fused_loss = use_fused_loss(loss_kernel, dev)
    model.body_and_loss = torch.compile(model.body_and_loss)
    T = cfg.model.seq_len + cfg.model.lookahead
    batches = [torch.randint(0, cfg.model.input_vocab_size, (P * batch_size, T), device=dev) for _ in range(4)]
    lrs = torch.full((P,), 1e-3, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        first_loss = model(batches[0])[1]["total"].tolist()  # per slice: the same models and batch in every variant

    def step(i):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            _, losses = model(batches[i % 4])
        losses["total"].sum().backward()
        opt.clip_(1.0)
        opt.step(lrs)
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
    tokens = P * batch_size * cfg.model.seq_len
    out = {"config": sets, "pack": P, "batch_size_per_slice": batch_size, "step_ms": med * 1000,
           "host_issue_ms": host[len(host) // 2] * 1000, "tokens_per_s": tokens / med,
           "mfu": tokens / med * accounting.flops_per_token(cfg.model) / H100_BF16_PEAK,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"),
           "warmup_s": warm_s, "optimizer": f"packed_adamw ({'compiled' if compile_opt else 'eager'} clip+update)",
           "loss": "fused triton" if model.fused_loss else "torch", "first_loss": first_loss[0], "first_losses": first_loss}
    if profile:
        out["profile_top_kernels"] = profile_steps(step, sync, dev)
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

