"""The engine: what the training loop steps, made from built models and the ``runtime`` config.

``build_engine(models, cfgs, device, draw)`` takes P >= 1 built ``Transformer``s and applies, from outside the model
code, everything that changes how they run but not what they compute: packing P same-shape models into one
(overtok/packed.py), the Triton kernels, ``torch.compile``, CUDA graphs (torch.compile's, or a whole recorded step),
the bf16 residual stream, and for one model DistributedDataParallel, row-sparse and row-sharded OE tables. The
result offers the loop (``overtok.train.train_pack``) one interface whatever was applied:

- ``step(lrs)``: one optimizer step of every slice at its learning rate; returns (losses, gradient norms), float32
  on the device, shape () for one model and (P,) for a pack;
- ``model`` (what evaluation runs), ``autocast``, ``flags`` (the perf/* flags each logged step carries: which of the
  above took effect), ``generation_model(p)`` (a plain model holding slice p);
- ``flush()`` (row-sparse tables: every row up to date before it is read or saved), ``state()`` / ``load(...)`` /
  ``save_own(...)`` (model and optimizer state for checkpoints), ``gather(obj)`` (one object per data-parallel rank).
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from overtok.checkpoint import load_shard_state, save_shard_state
from overtok.compat import ddp_ignore
from overtok.config import RunConfig
from overtok.errors import CheckpointError
from overtok.model import Transformer
from overtok.optim import (
    PackedAdamW,
    clip_sharded,
    clip_with_tables,
    make_optimizer,
    optimizer_state,
    table_weight_decay,
)
from overtok.packed import check_packable, pack_models, unpack_slice


def data_parallel() -> tuple[bool, int, int]:
    """(distributed, rank, world size): torch.distributed as Ray Train sets it up for multi-worker trials."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device without stalling the launch queue: a copy from pageable memory waits for the GPU to
    finish all queued work first, so the next step's launches could not overlap this step's kernels."""
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def use_kernel(value: str, device: torch.device, field: str) -> bool:
    """Resolve a kernel choice (runtime.loss_kernel, mlp_kernel, rope_kernel: auto / triton / torch) on this device:
    whether overtok.kernels runs."""
    from overtok import kernels

    if value == "triton" and not kernels.available(device):
        raise RuntimeError(f"{field}=triton: overtok.kernels cannot run on {device.type} here "
                           "(needs triton, and on the CPU TRITON_INTERPRET=1); use 'auto' or 'torch'")
    return value == "triton" or (value == "auto" and device.type == "cuda" and kernels.available(device))


def set_kernels(model: Transformer, device: torch.device, loss: str, mlp: str, rope: str,
                field: str = "runtime.{}_kernel") -> dict[str, bool]:
    """Resolve the loss, MLP and RoPE kernel choices (``use_kernel``; ``field`` names them in errors) and set them on
    ``model``; returns which of them run, {"loss", "mlp", "rope"}."""
    on = {kind: use_kernel(value, device, field.format(kind)) for kind, value in (("loss", loss), ("mlp", mlp),
                                                                                  ("rope", rope))}
    model.fused_loss = on["loss"]
    model.set_mlp_kernel(on["mlp"])
    model.set_rope_kernel(on["rope"])
    return on


def prepare_model(model: Transformer, cfg: RunConfig, device: torch.device, distributed: bool = False,
                  step_graphs: bool = False):
    """What the engine does to a built model (or pack) before training: pick the loss, MLP and RoPE kernels
    (runtime.loss_kernel, mlp_kernel, rope_kernel) and the residual stream's dtype (train.residual_dtype: bfloat16
    takes effect under bf16 autocast only), and under runtime.compile compile the OE mix, body, heads and loss (the
    lookups stay eager: row-sparse tables work through autograd hooks), as CUDA graphs where runtime.cuda_graphs
    applies, plus on CUDA the small eager parts of OE around the lookup. ``step_graphs``: the caller can record whole
    steps (``StepGraph``), which runtime.cuda_graph_scope = step then asks for instead of torch.compile's graphs.
    Returns (autocast: a context factory for forward passes, the perf/* flags every logged step carries: which of
    these took effect)."""
    t, r = cfg.train, cfg.runtime
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    kernels = set_kernels(model, device, r.loss_kernel, r.mlp_kernel, r.rope_kernel)
    model.residual_dtype = torch.bfloat16 if use_bf16 and t.residual_dtype == "bfloat16" else None
    # with gradient accumulation (several backward passes into the same gradients per step) a graphed run's curve
    # differs from the plain one (tests/test_cuda.py): no graphs there
    graphs = r.compile and r.cuda_graphs and device.type == "cuda" and not distributed and t.grad_accum == 1
    whole_step = graphs and step_graphs and r.cuda_graph_scope == "step" and not model.sparse_tables()
    # autocast's cache of cast weights would be recorded into a step graph and replayed stale: off there
    autocast = (partial(torch.autocast, device.type, dtype=torch.bfloat16, cache_enabled=not whole_step) if use_bf16
                else contextlib.nullcontext)
    if r.compile:
        compiled_graphs = graphs and not whole_step
        model.body_and_loss = torch.compile(model.body_and_loss, mode="reduce-overhead" if compiled_graphs else None)
        if device.type == "cuda":
            model.embed.compile_ids()
            for table in model.sparse_tables():
                table.compile_update()
    flags = {"perf/fused_loss": float(kernels["loss"]), "perf/mlp_kernel": float(kernels["mlp"]),
             "perf/rope_kernel": float(kernels["rope"]), "perf/cuda_graphs": float(graphs),
             "perf/step_graph": float(whole_step),
             "perf/residual_bf16": float(model.residual_dtype is not None), "perf/compiled_eval": float(compiled_eval(cfg))}
    return autocast, flags


def shard_state(model: Transformer) -> tuple[list[tuple[str, torch.nn.Parameter]], list[str]]:
    """Row-sharded OE tables (model.oe.shard with several ranks), where each rank owns some rows: their weights as
    (name, parameter), and the names of every parameter and buffer of theirs, which DDP must neither average nor
    broadcast from rank 0 (row-sparse shards keep their Adam moments and step in buffers)."""
    tables = model.sharded_tables()
    weights = {id(m.weight) for m in tables}
    buffers = {id(b) for m in tables for b in m.buffers()}
    sharded = [(n, p) for n, p in model.named_parameters() if id(p) in weights]
    return sharded, [n for n, _ in sharded] + [n for n, b in model.named_buffers() if id(b) in buffers]


def wrap_ddp(model: Transformer, cfg: RunConfig, device: torch.device, ignore: list[str]) -> torch.nn.Module:
    """The model under DistributedDataParallel, leaving out the parameters and buffers named in ``ignore``
    (row-sharded tables: each rank owns its rows). Buckets of runtime.ddp_bucket_mb; gradients are views of them
    (no copy into them and back); with train.grad_reduce_dtype = bfloat16 they travel as bf16."""
    from torch.nn.parallel import DistributedDataParallel

    if ignore:
        ddp_ignore(model, ignore)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  bucket_cap_mb=cfg.runtime.ddp_bucket_mb, gradient_as_bucket_view=True)
    if cfg.train.grad_reduce_dtype == "bfloat16":
        ddp.register_comm_hook(None, _bf16_all_reduce)
    return ddp


def _bf16_all_reduce(group, bucket):
    """DDP communication hook: average a gradient bucket in bf16 (divided by the world size first, so the sum cannot
    overflow what the float32 average would not), written back into the float32 bucket. torch's own bf16 hook
    refuses anything but NCCL; this one runs over gloo too, so the CPU tests exercise it."""
    import torch.distributed as dist

    flat = bucket.buffer()
    sent = flat.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(sent, group=group, async_op=True).get_future()

    def unpack(done):
        return flat.copy_(done.value()[0])

    return fut.then(unpack)


def accumulate(step_model: torch.nn.Module, draw, micro_steps: int, device: torch.device,
               autocast) -> dict[str, torch.Tensor]:
    """Forward and backward over ``micro_steps`` micro-batches (``draw()`` hands out the next, on the host) into the
    same gradients; returns the step's losses, means over the micro-batches, float32 on the device (a packed model's:
    one per slice; their sum is what is differentiated, so each slice gets its own gradient). Under DDP only the last
    backward all-reduces: the others run in ``no_sync()`` and their gradients wait in the buckets."""
    parts: dict[str, torch.Tensor] = {}
    ddp = hasattr(step_model, "no_sync")
    for i in range(micro_steps):
        with step_model.no_sync() if ddp and i < micro_steps - 1 else contextlib.nullcontext():
            batch = to_device(draw(), device)
            with autocast():
                _, losses = step_model(batch)
            total = losses["total"] if losses["total"].dim() == 0 else losses["total"].sum()
            (total / micro_steps if micro_steps > 1 else total).backward()
        # one micro-batch (the usual case for small models, whose steps the host issues) adds no kernels here
        for k, v in losses.items():
            v = v.detach().float()
            if micro_steps > 1:
                v = v / micro_steps
            parts[k] = parts[k] + v if k in parts else v
    return parts


class StepGraph:
    """A training step (runtime.cuda_graph_scope = step) recorded once as a CUDA graph and then replayed, so that the host
    issues its inputs' copies and one launch per step instead of every kernel.

    ``run(*inputs)`` is the step on device tensors: forward, backward, clipping, the optimizer's update; it returns what
    the caller reads (losses, gradient norms). ``zero_grad()`` drops the gradients. ``step(*inputs)`` copies each input
    (the batch, the learning rates: host tensors, or already on the device) into a device buffer that keeps its address,
    then runs the step: the first ``WARMUP`` steps as usual, on a side stream (compilation, cuBLAS's and the optimizer's
    lazy set-up happen there), each followed by ``zero_grad``; the next step is recorded (which runs nothing) and
    replayed, as is every later one. ``run`` must read its learning rates from its inputs (an optimizer made capturable,
    holding the buffer), and the gradients, None when the step is recorded, are then written afresh by each replay's
    backward. Every step returns ``run``'s outputs; after recording they are the graph's, overwritten by the next
    replay."""

    WARMUP = 3

    def __init__(self, run, zero_grad, device: torch.device):
        self.run, self.zero_grad, self.device = run, zero_grad, device
        self.inputs: list[torch.Tensor] | None = None  # on the device, allocated at the first step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream(device)  # the warm-up steps'
        self.steps = 0
        self.outputs = None

    def step(self, *inputs: torch.Tensor):
        if self.inputs is None:
            self.inputs = [torch.empty_like(x, device=self.device) for x in inputs]
        for buf, x in zip(self.inputs, inputs):
            buf.copy_(x.pin_memory() if x.device.type == "cpu" else x, non_blocking=True)
        self.steps += 1
        if self.graph is None and self.steps <= self.WARMUP:
            current = torch.cuda.current_stream(self.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                out = self.run(*self.inputs)
                self.zero_grad()
            current.wait_stream(self.side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            # (as torch.compile's graph trees record: other threads of the process, such as a Ray worker's, may
            # call CUDA meanwhile)
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.run(*self.inputs)
        self.graph.replay()
        return self.outputs


def model_step_graph(model: Transformer, opt: torch.optim.Optimizer, max_norm: float, device: torch.device,
                     autocast) -> StepGraph:
    """``train``'s step as a StepGraph: inputs (batch, lr as a 0-dim float32 tensor); forward, backward,
    clipping to ``max_norm``, AdamW (made capturable here, before its first step, so that it keeps its step counts on
    the device; every parameter group reads the lr buffer); outputs (losses, gradient norm)."""
    for group in opt.param_groups:
        group["capturable"] = True

    def run(batch: torch.Tensor, lr: torch.Tensor):
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast():
            _, losses = model(batch)
        losses["total"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        return {k: v.detach().float() for k, v in losses.items()}, norm

    return StepGraph(run, lambda: opt.zero_grad(set_to_none=True), device)


# Under runtime.compile_eval = auto, evaluation runs compiled only when the run evaluates at least this many batches in
# all: compiling the forward without gradients is a second compilation (seconds to tens of seconds), while an eager
# forward costs a few milliseconds more per batch (benchmarks/bench_eval.py, benchmarks/RESULTS.md section 3).
EVAL_COMPILE_MIN_BATCHES = 500


def compiled_eval(cfg: RunConfig) -> bool:
    """Whether validation forwards run compiled (runtime.compile_eval): 'auto' compiles them only for runs that
    evaluate EVAL_COMPILE_MIN_BATCHES batches or more in all (every eval_every steps and at the end)."""
    t, r = cfg.train, cfg.runtime
    if not r.compile or r.compile_eval == "never":
        return False
    evaluations = -(-t.max_steps // t.eval_every)
    return r.compile_eval == "always" or evaluations * t.eval_batches >= EVAL_COMPILE_MIN_BATCHES


# ----------------------------------------------------------------------------------------------
# Engines


class Engine(Protocol):
    """What ``overtok.train.train_pack`` steps (module docstring); ``SingleEngine`` and ``PackEngine`` are the two."""

    P: int
    model: Transformer
    flags: dict[str, float]
    distributed: bool
    rank: int
    world: int
    evaluates: bool

    def autocast(self) -> contextlib.AbstractContextManager: ...
    def step(self, lrs: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...
    def generation_model(self, p: int) -> Transformer: ...
    def flush(self) -> None: ...
    def state(self) -> dict: ...
    def load(self, state: dict, ckpt_dir: Path) -> None: ...
    def save_own(self, ckpt_dir: Path, step: int) -> None: ...
    def gather(self, obj) -> list: ...


class SingleEngine:
    """One model: torch AdamW, row-sparse tables' own updates, gradient clipping over everything, DDP when
    torch.distributed is initialised (every rank draws its own batches, gradients are averaged, row-sharded tables
    stay each rank's own), and a recorded step (runtime.cuda_graph_scope = step) where it applies."""

    def __init__(self, model: Transformer, cfg: RunConfig, device: torch.device, draw):
        self.distributed, self.rank, self.world = data_parallel()
        if self.distributed and cfg.model.oe.sparse_update and cfg.model.oe.n > 1 and not cfg.model.oe.shard:
            raise ValueError("row-sparse OE tables with several data-parallel ranks must be sharded over them: set "
                             "model.oe.shard: true (or model.oe.sparse_update: false)")
        self.P, self.model, self.cfg, self.device, self.draw = 1, model, cfg, device, draw
        self.opt = make_optimizer(model, cfg.train, device)
        self.autocast, self.flags = prepare_model(model, cfg, device, self.distributed, step_graphs=True)
        self.tables = model.sparse_tables()
        self.sharded, ignore = shard_state(model)
        self.step_model = wrap_ddp(model, cfg, device, ignore) if self.distributed else model
        self.max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
        self.graph: StepGraph | None = None  # recorded at the first step, after a checkpoint's optimizer state

    @property
    def evaluates(self) -> bool:
        """Whether this rank evaluates: rank 0, and with sharded tables every rank (they take part in the lookups)."""
        return self.rank == 0 or bool(self.sharded)

    def step(self, lrs: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        t, (lr,) = self.cfg.train, lrs
        if self.flags["perf/step_graph"]:
            if self.graph is None:
                self.graph = model_step_graph(self.model, self.opt, self.max_norm, self.device, self.autocast)
            return self.graph.step(self.draw(), torch.tensor(lr, dtype=torch.float32))
        for group in self.opt.param_groups:
            group["lr"] = lr
        parts = accumulate(self.step_model, self.draw, t.grad_accum, self.device, self.autocast)
        table_scale = 1.0
        if self.tables:  # row-sparse tables, whole or sharded (a sharded table's norm is over every shard)
            grad_norm, table_scale = clip_with_tables(self.model, self.tables, self.max_norm)
        elif self.sharded:
            grad_norm = clip_sharded(self.model, [p for _, p in self.sharded], self.world, t.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for table in self.tables:
            table.apply_update(lr, t.beta1, t.beta2, weight_decay=table_weight_decay(t), grad_scale=table_scale)
        return parts, grad_norm

    def generation_model(self, p: int) -> Transformer:
        return self.model

    def flush(self) -> None:
        for table in self.tables:  # exact mode: every row up to date
            table.flush()

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": optimizer_state(self.opt)}

    def load(self, state: dict, ckpt_dir: Path) -> None:
        if self.sharded and state.get("world", self.world) != self.world:
            raise CheckpointError(f"{ckpt_dir}: checkpoint of a table sharded over {state['world']} ranks, now "
                                  f"{self.world}")
        own = load_shard_state(ckpt_dir, state["step"], self.rank) if self.sharded and self.rank > 0 else state
        self.model.load_state_dict(own["model"])
        self.opt.load_state_dict(own["optimizer"])

    def save_own(self, ckpt_dir: Path, step: int) -> None:
        """Sharded tables: ranks > 0 save their own rows and optimizer state; rank 0's checkpoint completes the set."""
        import torch.distributed as dist

        if self.sharded:
            if self.rank > 0:
                save_shard_state(ckpt_dir, step, self.rank, self.state())
            dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


class PackEngine:
    """P same-shape models packed into one (overtok/packed.py): ``PackedAdamW`` with a learning rate per slice and
    clipping by each slice's own norm, and a recorded step where it applies. One process, no data parallelism."""

    distributed, rank, world, evaluates = False, 0, 1, True

    def __init__(self, models: list[Transformer], cfgs: list[RunConfig], device: torch.device, draw):
        check_packable(cfgs)
        self.P, self.cfgs, self.device, self.draw = len(models), cfgs, device, draw
        self.eos_id = models[0].embed.eos_id
        self.model = pack_models(models)
        self.plain: Transformer | None = None  # a plain model for generation, filled from one slice at a time
        self.opt = PackedAdamW(self.model, cfgs[0].train)
        self.autocast, self.flags = prepare_model(self.model, cfgs[0], device, step_graphs=True)
        self.max_norm = cfgs[0].train.grad_clip if cfgs[0].train.grad_clip > 0 else math.inf
        self.graph: StepGraph | None = None

    def _run(self, batch: torch.Tensor, lrs: torch.Tensor):
        """One step on device tensors (one micro-batch): what a recorded step replays."""
        parts = accumulate(self.model, lambda: batch, 1, self.device, self.autocast)
        return parts, self.opt.step(lrs, self.max_norm)

    def step(self, lrs: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.flags["perf/step_graph"]:
            if self.graph is None:
                self.graph = StepGraph(self._run, self.opt.zero_grad, self.device)
            return self.graph.step(self.draw(), torch.tensor(lrs))
        parts = accumulate(self.model, self.draw, self.cfgs[0].train.grad_accum, self.device, self.autocast)
        norms = self.opt.step(to_device(torch.tensor(lrs), self.device), self.max_norm)
        self.opt.zero_grad()
        return parts, norms

    def generation_model(self, p: int) -> Transformer:
        if self.plain is None:
            with torch.device(self.device):
                self.plain = Transformer(self.cfgs[p].model, eos_id=self.eos_id)
        return unpack_slice(self.model, p, self.plain)

    def flush(self) -> None:
        pass

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load(self, state: dict, ckpt_dir: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def save_own(self, ckpt_dir: Path, step: int) -> None:
        pass

    def gather(self, obj) -> list:
        return [obj]


def build_engine(models: list[Transformer], cfgs: list[RunConfig], device: torch.device, draw) -> Engine:
    """The engine for these built models (one: ``SingleEngine``; several: ``PackEngine``). ``draw()`` hands out the
    next training batch on the host (a pack's: the slices' batches stacked)."""
    if len(models) == 1:
        return SingleEngine(models[0], cfgs[0], device, draw)
    return PackEngine(models, cfgs, device, draw)
