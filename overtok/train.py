"""One training run: the loop shared by `overtok train` and every sweep trial.

``train(cfg, sink)`` builds the model and data from a resolved config, resumes from the newest valid
checkpoint in ``train.checkpoint_dir``, trains, evaluates, checkpoints, and logs through the sink with
step = base tokens seen. It raises :class:`TrainingDiverged` on a NaN/inf loss; callers record the status.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from functools import partial
from pathlib import Path

import torch

from overtok import accounting
from overtok.compat import ddp_ignore, foreach_mul_
from overtok.config import ConfigError, RunConfig, TrainConfig, stored_config, to_dict
from overtok.data.batches import Batches, group_ngrams, split_ngrams
from overtok.data.cfg import Grammar, accepts, sample_sentence
from overtok.errors import CheckpointError
from overtok.identity import trial_id
from overtok.model import Transformer
from overtok.sharded import ShardedRowSparseTable
from overtok.tracking import Sink

STOP_FILE = "STOP"
"""A file of this name in a run's checkpoint directory asks the run to checkpoint and stop (``overtok stop``)."""


class TrialStopped(Exception):
    """The run checkpointed and stopped on request (``overtok stop``); rerunning resumes it."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"stopped on request at step {step}")


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, reason: str):
        self.step = step
        super().__init__(f"loss became {reason} at step {step}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device without stalling the launch queue: a copy from pageable memory waits for the GPU to
    finish all queued work first, so the next step's launches could not overlap this step's kernels."""
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio*lr, WSD (constant then linear decay) or constant."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    lo = t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "wsd":
        decay_start = int(t.max_steps * (1 - t.decay_fraction))
        if step < decay_start:
            return t.lr
        frac = (step - decay_start) / max(t.max_steps - decay_start, 1)
        return t.lr + (lo - t.lr) * min(frac, 1.0)
    frac = (step - t.warmup_steps) / max(t.max_steps - t.warmup_steps, 1)
    return lo + 0.5 * (t.lr - lo) * (1 + math.cos(math.pi * min(frac, 1.0)))


def decay_groups(model: Transformer, t: TrainConfig, vector_dim: int = 1) -> list[tuple[list, float]]:
    """(params, weight_decay) groups: decay on matrices, none on vectors (norm weights: ``vector_dim`` dims, 2 in a
    packed model), embed_weight_decay (default 0) on the token embedding and OE tables. Row-sparse tables, which
    update themselves (overtok/sparse.py), are left out; with train.table_weight_decay set, the dense OE tables get
their own group with that decay. Empty groups are dropped."""
    decay, no_decay, embed, tables = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("embed.tables") and t.table_weight_decay is not None:
            tables.append(p)
        elif name.startswith(("embed.wte", "embed.tables")):
            embed.append(p)
        elif p.dim() <= vector_dim:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [(decay, t.weight_decay), (no_decay, 0.0), (embed, t.embed_weight_decay),
              (tables, t.table_weight_decay)]
    return [(params, wd) for params, wd in groups if params]


def make_optimizer(model: Transformer, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups`."""
    return torch.optim.AdamW([{"params": params, "weight_decay": wd} for params, wd in decay_groups(model, t)],
                             lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically (tmp + rename); a truncated newest file falls back to the previous one.


def _write_atomically(path: Path, state: dict) -> None:
    """torch.save to a temporary file of this writer's own (process and thread in its name), fsync, rename: a crash
    leaves the previous file intact, and two writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _refuse_links(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from None


def _refuse_links(directory: Path) -> None:
    """A checkpoint directory that is, or lies under (below the working directory), a symbolic link would let writes
    and the cleanup of old checkpoints reach files outside it: refused."""
    here = Path.cwd()
    full = Path(os.path.abspath(directory))
    # the directory itself, and every folder of its path below the working directory (results/, results/checkpoints/)
    for p in [full, *(q for q in full.parents if here in q.parents)]:
        if p.is_symlink():
            raise CheckpointError(f"checkpoint directory {directory}: {p} is a symbolic link; refusing to write "
                                  "or delete checkpoints through it")


def save_checkpoint(ckpt_dir: Path, state: dict, keep: int = 2) -> Path:
    path = ckpt_dir / f"ckpt_{state['step']:09d}.pt"
    _write_atomically(path, state)
    _remove_old(ckpt_dir, "ckpt_*.pt", keep)
    return path


def _remove_old(ckpt_dir: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` newest files matching ``pattern``; never through a link, and a file another
    writer removed first is no error."""
    for old in sorted(ckpt_dir.glob(pattern))[:-keep]:
        if not old.is_symlink():
            old.unlink(missing_ok=True)


def load_latest_checkpoint(ckpt_dir: Path) -> dict | None:
    for path in sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt file: use the previous one
            print(f"[overtok] skipping unreadable checkpoint {path.name}: {type(e).__name__}")
    return None


def default_checkpoint_dir(cfg: RunConfig) -> Path:
    """train.checkpoint_dir, else results/checkpoints/<trial id>: a run resumes only from a checkpoint of its own
    configuration (overtok.identity.trial_id)."""
    return Path(cfg.train.checkpoint_dir or Path("results") / "checkpoints" / trial_id(cfg))


def check_checkpoint_config(state: dict, cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse to resume from a checkpoint of another configuration (another trial id)."""
    saved = state.get("config")
    if saved is None:
        return
    try:
        theirs = trial_id(stored_config(saved))  # runtime fields (fail_at_step too) are not in it
    except (ConfigError, TypeError):
        theirs = "an unreadable configuration"
    ours = trial_id(cfg)
    if theirs != ours:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint there is of trial {theirs}, this run is trial {ours} (another "
                              "configuration); point train.checkpoint_dir elsewhere or remove the old checkpoints")


# ----------------------------------------------------------------------------------------------
# Evaluation


def use_kernel(value: str, device: torch.device, field: str) -> bool:
    """Resolve a kernel choice (runtime.loss_kernel, mlp_kernel, rope_kernel: auto / triton / torch) on this device:
    whether overtok.kernels runs."""
    from overtok import kernels

    if value == "triton" and not kernels.available(device):
        raise RuntimeError(f"{field}=triton: overtok.kernels cannot run on {device.type} here "
                           "(needs triton, and on the CPU TRITON_INTERPRET=1); use 'auto' or 'torch'")
    return value == "triton" or (value == "auto" and device.type == "cuda" and kernels.available(device))


def set_kernels(model: Transformer, device: torch.device, loss: str, mlp: str, rope: str,
                field: str = "train.{}_kernel") -> dict[str, bool]:
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
    """What both trainers do to a built model before training: pick the loss, MLP and RoPE kernels
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


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` as a checkpoint keeps it: a step graph's tensor learning rate as the number it holds
    and capturable off (what the optimizer was built with), so that any run resumes from it the same way."""
    state = opt.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"], group["capturable"] = group["lr"].item(), False
    return state


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


@torch.no_grad()
def evaluate(model: Transformer, streams: list[Batches], n_batches: int, device: torch.device, autocast,
             compiled: bool = True) -> torch.Tensor:
    """Mean next-token validation loss over n_batches batches, each one batch of every stream concatenated (a packed
    model's slices in order): a float tensor, one value per slice. ``compiled`` False runs the compiled parts of the
    model eagerly (no second compilation for the forward without gradients)."""
    model.eval()
    for s in streams:
        s.rewind()
    total = torch.zeros((), device=device)
    with contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager"):
        for _ in range(n_batches):
            batch = torch.cat([s.next() for s in streams]).to(device)
            with autocast():
                _, losses = model(batch)
            total = total + losses["next"].float()
    model.train()
    return total / n_batches


def eval_loss(model: Transformer, batches: Batches, n_batches: int, device: torch.device, autocast,
              compiled: bool = True) -> float:
    return evaluate(model, [batches], n_batches, device, autocast, compiled).item()


def generation_prompts(g: Grammar, n: int, count: int, seed: int) -> torch.Tensor:
    """(count, 1) prompts for sampling sentences: one model token that ends a sentence, as in the training stream.

    With the 1-gram tokenizer that is EOS. With an n-gram tokenizer it is the n-gram (last n-1 tokens of a sentence,
    EOS), drawn from held-out sentences: a sentence starts after exactly such a token in the training stream, while
    an n-gram of n EOS tokens never occurs there (its embedding is untrained).
    """
    rng = random.Random(seed)
    rows = [(sample_sentence(g, rng)[-(n - 1):] if n > 1 else []) + [g.eos_id] for _ in range(count)]
    return group_ngrams(torch.tensor(rows, dtype=torch.long), g.vocab_size, n)


@torch.no_grad()
def generation_accuracy(model: Transformer, batches: Batches, n_samples: int, device: torch.device, seed: int,
                        batch_size: int = 0) -> float:
    """Fraction of sampled sentences (prompt: a sentence end, stop at EOS) that the grammar accepts (paper sec. 3.1).

    Sampling stops at the grammar's longest sentence plus its EOS: a longer sample cannot be accepted.
    """
    model.eval()
    batch_size = batch_size or (512 if device.type == "cuda" else 64)
    g, n = batches.grammar, model.cfg.tokenizer_ngram
    V = g.vocab_size
    # n-gram tokenizer: a row stops at the first n-gram that holds an EOS and is padded with the all-EOS n-gram
    pad = int(group_ngrams(torch.full((1, n), g.eos_id, dtype=torch.long), V, n))

    def is_stop(ids: torch.Tensor) -> torch.Tensor:
        return (split_ngrams(ids[:, None], V, n) == g.eos_id).any(-1)

    prompts = generation_prompts(g, n, n_samples, seed + 1).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ok = 0
    for start in range(0, n_samples, batch_size):
        prompt = prompts[start : start + batch_size]
        out = model.generate(prompt, max_new=-(-(g.max_len + 1) // n), stop_id=pad, is_stop=is_stop, generator=gen)
        base = split_ngrams(out[:, 1:].cpu(), V, n)
        for row in base.tolist():
            sentence = row[: row.index(g.eos_id)] if g.eos_id in row else None
            ok += bool(sentence) and accepts(g, sentence)
    model.train()
    return ok / n_samples


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, sink: Sink | None = None, device: torch.device | None = None) -> dict:
    """Train to cfg.train.max_steps (resuming if a checkpoint exists); return the final summary metrics.

    Data-parallel when torch.distributed is initialised (Ray Train sets it up for multi-worker trials): every
    rank draws its own batches, gradients are averaged by DDP, rank 0 evaluates, checkpoints and logs.
    """
    import torch.distributed as dist

    t_enter = time.time()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if distributed and cfg.model.oe.sparse_update and cfg.model.oe.n > 1 and not cfg.model.oe.shard:
        raise ValueError("row-sparse OE tables with several data-parallel ranks must be sharded over them: set "
                         "model.oe.shard: true (or model.oe.sparse_update: false)")
    sink = HistorySink(sink if (sink and rank == 0) else Sink())
    t = cfg.train
    device = device or pick_device(cfg.runtime.device)
    torch.manual_seed(cfg.seed)
    train_data, val_data = Batches(cfg, "train", rank, world), Batches(cfg, "val")
    with torch.device(device):  # build in place: OE tables can be tens of GB
        model = Transformer(cfg.model, eos_id=train_data.eos_id)
    opt = make_optimizer(model, t, device)
    autocast, perf_flags = prepare_model(model, cfg, device, distributed, step_graphs=True)
    sparse_tables = model.sparse_tables()
    sharded, ignore = shard_state(model)
    step_model = wrap_ddp(model, cfg, device, ignore) if distributed else model
    ckpt_dir = default_checkpoint_dir(cfg)
    step, tokens_seen, resumed_from = 0, 0, None
    state = load_latest_checkpoint(ckpt_dir)
    if state is not None:
        check_checkpoint_config(state, cfg, ckpt_dir)
        if sharded and state.get("world", world) != world:
            raise CheckpointError(f"{ckpt_dir}: checkpoint of a table sharded over {state['world']} ranks, now {world}")
        own = load_shard_state(ckpt_dir, state["step"], rank) if sharded and rank > 0 else state
        model.load_state_dict(own["model"])
        opt.load_state_dict(own["optimizer"])
        train_data.load_state_dict(state["data_ranks"][rank])
        torch.set_rng_state(state["rng"])
        step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], state["step"]
        print(f"[overtok] resumed from {ckpt_dir} at step {step}")
        # re-send the curve up to the checkpoint: whatever the tracker missed (a driver killed before it
        # wrote them) fills in, and what it has is dropped there by step, so curves have no gaps
        sink.replay(state.get("history", []))

    max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
    step_graph = None
    if perf_flags["perf/step_graph"]:  # after the checkpoint's optimizer state, whose groups it adjusts
        step_graph = model_step_graph(model, opt, max_norm, device, autocast)
    flops_per_token = accounting.flops_per_token(cfg.model) / cfg.model.tokenizer_ngram  # per base token
    tokens_per_step = cfg.tokens_per_step * world  # global tokens
    summary: dict[str, float] = {}
    t_last, tokens_last = time.time(), tokens_seen
    startup = {"perf/setup_s": t_last - t_enter}  # data, model, optimizer, checkpoint; then the first step
    first_step = step + 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    while True:
        last_step = step >= t.max_steps

        # once in a while: evaluate (and on the last step); with sharded tables every rank takes part in the lookups
        if (rank == 0 or sharded) and ((step % t.eval_every == 0 and step > 0) or last_step) and step != resumed_from:
            t_eval = time.time()
            for table in sparse_tables:  # exact mode: every row up to date before it is read
                table.flush()
            metrics = {"val/loss": eval_loss(model, val_data, t.eval_batches, device, autocast, compiled_eval(cfg))}
            metrics["perf/eval_s"] = time.time() - t_eval  # the loss's .item() waited for the GPU
            if cfg.data.kind == "text":
                bpt = read_bytes_per_token(cfg)
                if bpt > 0:
                    metrics["val/bpb"] = metrics["val/loss"] / math.log(2) / bpt
            if cfg.data.kind == "cfg" and t.gen_samples and (last_step or (t.gen_every and step % t.gen_every == 0)):
                metrics["val/gen_acc"] = generation_accuracy(model, val_data, t.gen_samples, device, cfg.seed)
            if rank == 0:
                sink.log(metrics, tokens_seen)
                summary.update(metrics)

        # a stop request (overtok stop) is honoured at a logging step: checkpoint, then stop
        stopping = (not distributed and not last_step and step > 0 and step % t.log_every == 0
                    and (ckpt_dir / STOP_FILE).exists())
        # once in a while: checkpoint (not at step 0; at the end too unless checkpoint_final is off)
        if step > 0 and (step % t.checkpoint_every == 0 or (last_step and t.checkpoint_final) or stopping) \
                and step != resumed_from:
            for table in sparse_tables:
                table.flush()
            data_states = [train_data.state_dict()]
            if distributed:  # every rank's stream position, so a resumed run continues each one exactly
                data_states = [None] * world
                dist.all_gather_object(data_states, train_data.state_dict())
            if sharded:  # ranks > 0 save their own rows and optimizer state first; rank 0's file completes the set
                if rank > 0:
                    save_shard_state(ckpt_dir, step, rank, {"model": model.state_dict(), "optimizer": optimizer_state(opt)})
                dist.barrier()
            if rank == 0:
                save_checkpoint(ckpt_dir, {"model": model.state_dict(), "optimizer": optimizer_state(opt), "step": step,
                                           "tokens_seen": tokens_seen, "data_ranks": data_states,
                                           "rng": torch.get_rng_state(), "config": to_dict(cfg),
                                           "history": sink.history, "world": world})
                sink.flush()

        if stopping:
            sink.flush()
            (ckpt_dir / STOP_FILE).unlink(missing_ok=True)
            raise TrialStopped(step)
        if last_step:
            break

        # single training step (gradient accumulation over micro-batches)
        if step == cfg.runtime.fail_at_step:
            raise RuntimeError(f"fail_at_step={step} (deliberate failure for testing)")
        lr = lr_at(step, t)
        if step_graph is not None:
            parts, grad_norm = step_graph.step(train_data.next(), torch.tensor(lr, dtype=torch.float32))
        else:
            for group in opt.param_groups:
                group["lr"] = lr
            parts = accumulate(step_model, train_data.next, t.grad_accum, device, autocast)
            table_scale = 1.0
            if sharded:
                grad_norm = _clip_sharded(model, [p for _, p in sharded], world, t.grad_clip)
            elif sparse_tables and not isinstance(sparse_tables[0], ShardedRowSparseTable):
                grad_norm, table_scale = clip_with_tables(model, sparse_tables, max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for table in sparse_tables:
                table.apply_update(lr, t.beta1, t.beta2, weight_decay=table_weight_decay(t), grad_scale=table_scale)
        step += 1
        tokens_seen += tokens_per_step
        if step == first_step:  # compilation happens here: worth knowing apart from the steady rate
            startup["perf/first_step_s"] = synced_since(t_last, device)
            if rank == 0:
                print(f"[overtok] setup {startup['perf/setup_s']:.1f} s, first step {startup['perf/first_step_s']:.1f} s"
                      + (" (compilation included)" if cfg.runtime.compile else ""), flush=True)

        # logging (the .item() syncs only here)
        if step % t.log_every == 0 or step == t.max_steps:
            total = parts["total"].item()
            if not math.isfinite(total):
                raise TrainingDiverged(step, "nan" if math.isnan(total) else "inf")
            now = time.time()
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens_seen
            # train/loss is the next-token loss in every variant (comparable across OD depths);
            # the objective with the extra heads is train/loss_total
            metrics = {"train/loss": parts["next"].item(), "train/loss_total": total, "train/lr": lr,
                       "train/grad_norm": float(grad_norm), "perf/tokens_per_s": tps, **perf_flags}
            metrics.update({f"train/loss_{k}": v.item() for k, v in parts.items() if k not in ("total", "next")})
            metrics.update(startup)  # once, with the first logged step
            startup = {}
            epoch_tokens = train_data.epoch_tokens
            if epoch_tokens:
                metrics["train/epochs"] = tokens_seen / epoch_tokens
            if device.type == "cuda":
                metrics["perf/mfu"] = accounting.mfu(tps, flops_per_token, world)  # per GPU; tps is global
                metrics["perf/mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            sink.log(metrics, tokens_seen)
            summary.update(metrics)
    summary["tokens_seen"] = tokens_seen
    sink.flush()
    return summary


def table_weight_decay(t: TrainConfig) -> float:
    """The OE tables' weight decay: train.table_weight_decay, else train.embed_weight_decay."""
    return t.embed_weight_decay if t.table_weight_decay is None else t.table_weight_decay


def clip_with_tables(model: Transformer, tables: list, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient clipping that counts row-sparse tables as dense clipping counts an nn.Embedding: the global norm over
    the dense gradients and the tables' pending gradients (duplicate ids summed). Scales the dense gradients in place;
    returns (norm, the factor the tables' update applies to their gradient)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dense = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=tables[0].weight.device)
    norm = (dense.float() ** 2 + sum(table.grad_sq_norm() for table in tables)).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if grads:
        foreach_mul_(grads, coef.to(grads[0].device))
    return norm, coef


def synced_since(t0: float, device: torch.device) -> float:
    """Seconds since t0 once the device has finished the work issued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - t0


def _clip_sharded(model: Transformer, shards: list[torch.nn.Parameter], world: int, max_norm: float) -> torch.Tensor:
    """Gradient clipping with row-sharded tables: the shard gradients (sums over every rank's batch) are divided
    by the world size, as DDP averages the replicated ones; the norm is global (all-reduced over the shards)."""
    import torch.distributed as dist

    shard_ids = {id(p) for p in shards}
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in shard_ids]
    for p in shards:
        if p.grad is not None:
            p.grad.div_(world)
    own = [p.grad for p in shards if p.grad is not None]
    sq_rep = sum((g.float().pow(2).sum() for g in replicated), torch.zeros((), device=shards[0].device))
    sq_own = sum((g.float().pow(2).sum() for g in own), torch.zeros((), device=shards[0].device))
    dist.all_reduce(sq_own)
    norm = (sq_rep + sq_own).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in replicated + own:
            g.mul_(coef.to(g.dtype))
    return norm


def save_shard_state(ckpt_dir: Path, step: int, rank: int, state: dict, keep: int = 2) -> None:
    """A rank's own part of a checkpoint with row-sharded tables (its rows and optimizer state)."""
    _write_atomically(ckpt_dir / f"shard_{step:09d}_rank{rank}.pt", state)
    _remove_old(ckpt_dir, f"shard_*_rank{rank}.pt", keep)


def load_shard_state(ckpt_dir: Path, step: int, rank: int) -> dict:
    path = ckpt_dir / f"shard_{step:09d}_rank{rank}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: this rank's part of the step-{step} checkpoint is unreadable "
                              f"({type(e).__name__})") from None


class HistorySink(Sink):
    """Keeps every logged point (saved in checkpoints) and forwards to the real sink."""

    def __init__(self, inner: Sink):
        self.inner = inner
        self.history: list[tuple[str, float, int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.extend((k, float(v), int(step)) for k, v in metrics.items())
        self.inner.log(metrics, step)

    def replay(self, history: list) -> None:
        for k, v, step in history:
            self.history.append((k, v, step))
            self.inner.log({k: v}, step)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def read_bytes_per_token(cfg: RunConfig) -> float:
    from overtok.data.text import read_meta

    return read_meta(cfg.data.path)["val_bytes_per_token"]
