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
from overtok.train import make_optimizer

H100_BF16_PEAK = 989e12


def config(sets: dict):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def time_training(sets: dict, batch_size: int, steps: int, warmup: int, compile_body: bool = True) -> dict:
    """Median step time (CUDA events) of forward+backward+AdamW(+row-sparse update) on random tokens, bf16 autocast."""
    cfg = config(sets)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with torch.device(dev):
        model = Transformer(cfg.model)
    build_s = time.time() - t0
    opt = make_optimizer(model, cfg.train, dev)
    if compile_body:
        model.body_and_loss = torch.compile(model.body_and_loss)
    tables = model.sparse_tables()
    T = cfg.model.seq_len + cfg.model.lookahead
    V = cfg.model.input_vocab_size
    batches = [torch.randint(0, V, (batch_size, T), device=dev) for _ in range(4)]

    def step(i):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            _, losses = model(batches[i % 4])
        losses["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for t in tables:
            t.apply_update(1e-3, 0.9, 0.95)

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
    out = {"config": sets, "batch_size": batch_size, "step_ms": med * 1000, "tokens_per_s": tokens / med,
           "mfu": tokens / med * accounting.flops_per_token(cfg.model) / H100_BF16_PEAK,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"),
           "params": groups, "build_s": build_s, "warmup_s": warm_s,
           "optimizer": "adamw+oe_lazy_row_adam" if tables else "adamw"}
    model = opt = batches = step = tables = None  # noqa: F841 - release before the next variant
    # compiled code keeps the module (and so its OE tables) alive; drop it before the next variant's peak is measured
    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def dump(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
