"""Packed trials: P same-shape runs trained as one model in one process, sharing every kernel.

Small models leave a big GPU idle: one tiny trial per process is launch-bound, and several processes on one GPU
only time-slice. Here P trials whose configs differ only in ``seed`` and ``train.lr`` become one model whose
parameters carry a leading pack dimension P; the batch is the P batches stacked along the batch dimension
(slice-major), so every matmul is one batched matmul over the P slices and attention, norms and the loss run
once over all of them. Nothing mixes between slices: each slice gets exactly the gradient it would get alone.

- ``pack_models(models)``: turn P built ``Transformer``s into one packed ``Transformer`` (weights stacked;
  nn.Linear -> PackedLinear, nn.Embedding -> PackedEmbedding, RMSNorm weights stacked). The model code is shared:
  a packed model returns per-slice losses of shape (P,).
- ``PackedAdamW``: AdamW with the same update as ``torch.optim.AdamW`` per slice, a learning rate per slice,
  and gradient clipping by each slice's own norm.
- ``train_packed(cfgs, sinks)``: the training loop (same schedule, evaluation, generation accuracy, checkpoints and
  exact resume as ``overtok.train.train``) for P configs at once.

Not packable (they run alone): row-sparse OE tables, data-parallel trials.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from overtok import accounting
from overtok.compat import foreach_norm, fused_adamw_
from overtok.config import RunConfig, to_dict
from overtok.data.batches import Batches
from overtok.identity import PACK_FREE_KEYS, pack_key
from overtok.model import RMSNorm, Transformer, packed_linear
from overtok.tracking import Sink
from overtok.train import (
    HistorySink,
    StepGraph,
    TrainingDiverged,
    accumulate,
    compiled_eval,
    decay_groups,
    evaluate,
    generation_accuracy,
    load_latest_checkpoint,
    lr_at,
    pick_device,
    prepare_model,
    read_bytes_per_token,
    save_checkpoint,
    synced_since,
    to_device,
)

# ----------------------------------------------------------------------------------------------
# Packed modules


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (P, out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight)


class PackedEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (P, rows, d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        P, rows, d = self.weight.shape
        shift = (torch.arange(P, device=idx.device) * rows).view(P, *[1] * idx.dim())
        flat = idx.view(P, -1, *idx.shape[1:]) + shift  # slice p reads its own rows
        return F.embedding(flat.view(idx.shape), self.weight.view(P * rows, d))


class PackedRMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(weight)  # (P, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P, d = self.weight.shape
        y = F.rms_norm(x, (d,), None, self.eps).view(P, -1, d) * self.weight[:, None, :]
        return y.view(x.shape)


def pack_models(models: list[Transformer]) -> Transformer:
    """One packed Transformer holding the P models' weights (the first model's object is reused)."""
    P = len(models)
    packed = models[0]
    if packed.sparse_tables():
        raise ValueError("row-sparse OE tables cannot be packed")
    for name, mod in list(packed.named_modules()):
        if isinstance(mod, (nn.Linear, nn.Embedding, RMSNorm)):
            w = torch.stack([m.get_submodule(name).weight.detach() for m in models])
            if isinstance(mod, nn.Linear):
                new = PackedLinear(w)
            elif isinstance(mod, nn.Embedding):
                new = PackedEmbedding(w)
            else:
                new = PackedRMSNorm(w, mod.eps)
            parent, _, attr = name.rpartition(".")
            setattr(packed.get_submodule(parent) if parent else packed, attr, new)
    if packed.pos is not None:  # learned positions: (P, positions, d)
        packed.pos = nn.Parameter(torch.stack([m.pos.detach() for m in models]))
    for name, p in packed.named_parameters():
        if p.shape[0] != P:
            raise ValueError(f"parameter {name} was not packed")
    packed.pack = P
    return packed


def unpack_slice(packed: Transformer, p: int, into: Transformer) -> Transformer:
    """Copy slice p of a packed model into a plain model of the same config."""
    into.load_state_dict({k: v[p] for k, v in packed.state_dict().items()})
    return into


# ----------------------------------------------------------------------------------------------
# Optimizer


class PackedAdamW:
    """torch.optim.AdamW(fused=True)'s update on packed parameters, with a learning rate per slice.

    Parameter groups as in ``overtok.train.make_optimizer``: weight decay on matrices, none on norms, the
    embedding's own decay. Each slice p is updated by torch's fused AdamW kernel over the views ``param[p]``
    (one multi-tensor launch per slice and group, on CPU and CUDA alike, nothing to compile). ``step`` clips each
    slice by its own global gradient norm, as ``clip_grad_norm_`` would in a separate run, inside the kernel (its
    ``grad_scale``), without a pass over the gradients of its own.
    """

    def __init__(self, model: Transformer, t):
        self.t = t
        self.eps = 1e-8  # torch.optim.AdamW's default, as make_optimizer uses
        self.groups = decay_groups(model, t, vector_dim=2)  # packed vectors (norm weights) are (P, d)
        self.params = [p for ps, _ in self.groups for p in ps]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.P = model.pack
        # per-slice views of the parameters and moments, made once (load_state_dict copies into them in place); of
        # the parameters' data: a view with autograd history would keep each parameter's AccumulateGrad node, made
        # here on the default stream, alive into every backward, which breaks recording a step graph on its stream
        self._views = [(p.detach().unbind(0), m.unbind(0), v.unbind(0))
                       for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq)]
        dev = self.params[0].device
        # the step count, on the device: the kernel's bias correction reads it, and a replayed step graph
        # (overtok.train.StepGraph) advances it without the host
        self._step = torch.zeros((), dtype=torch.float32, device=dev)

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, max_norm: float = math.inf) -> torch.Tensor:
        """One AdamW step of every slice p at learning rate lrs[p] (a float32 tensor on the parameters' device),
        its gradients first clipped to max_norm by the slice's own global norm (inf: no clipping), as torch's
        clip_grad_norm_ does: multiplied by min(1, max_norm / (norm + 1e-6)), here as the kernel's gradient divisor.
        Returns the per-slice gradient norms (P,) before clipping."""
        grads = [g for p in self.params if (g := p.grad) is not None]
        per_tensor = torch.stack(foreach_norm([s for g in grads for s in g.unbind(0)]))  # (n * P,)
        norms = per_tensor.view(len(grads), self.P).pow(2).sum(0).sqrt()
        scale = 1.0 / (max_norm / (norms + 1e-6)).clamp(max=1.0) if math.isfinite(max_norm) else None
        self._step += 1
        t = self.t
        i = 0
        for params, wd in self.groups:
            live = [j for j in range(i, i + len(params)) if self.params[j].grad is not None]
            i += len(params)
            if not live:
                continue
            slices = [self.params[j].grad.unbind(0) for j in live]
            for p in range(self.P):
                ps, ms, vs = ([self._views[j][k][p] for j in live] for k in range(3))
                gs = [g[p] for g in slices]
                fused_adamw_(ps, gs, ms, vs, self._step, lr=lrs[p], beta1=t.beta1, beta2=t.beta2, weight_decay=wd,
                             eps=self.eps, grad_scale=None if scale is None else scale[p])
        return norms

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"step": int(self._step.item()), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self._step.fill_(state["step"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src)


# ----------------------------------------------------------------------------------------------
# The loop


def check_packable(cfgs: list[RunConfig]) -> None:
    keys = {pack_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError(f"configs differ in more than {', '.join(PACK_FREE_KEYS)} or use row-sparse tables; "
                         "they cannot share a pack")


def train_packed(cfgs: list[RunConfig], sinks: list[Sink | None], checkpoint_dir: str | Path,
                 device: torch.device | None = None) -> list[dict]:
    """Train P packable configs as one packed model; returns one summary per config.

    A slice whose loss becomes NaN/inf is reported (``TrainingDiverged`` in its summary under ``error``) and
    dropped from logging; the other slices train on unaffected (slices never mix).
    """
    t_enter = time.time()
    check_packable(cfgs)
    P = len(cfgs)
    cfg0, t = cfgs[0], cfgs[0].train
    hsinks = [HistorySink(s or Sink()) for s in sinks]
    device = device or pick_device(cfg0.runtime.device)
    train_data = [Batches(c, "train") for c in cfgs]
    val_data = [Batches(c, "val") for c in cfgs]
    models = []
    for c in cfgs:  # each slice starts exactly where a separate run with its seed would
        torch.manual_seed(c.seed)
        with torch.device(device):
            models.append(Transformer(c.model, eos_id=train_data[0].eos_id))
    model = pack_models(models)
    del models
    plain = None  # a plain model for generation, filled from one slice at a time
    opt = PackedAdamW(model, t)
    autocast, perf_flags = prepare_model(model, cfg0, device, step_graphs=True)
    ckpt_dir = Path(checkpoint_dir)
    step, tokens_seen, resumed_from = 0, 0, None
    state = load_latest_checkpoint(ckpt_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for d, s in zip(train_data, state["data"]):
            d.load_state_dict(s)
        torch.set_rng_state(state["rng"])
        step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], state["step"]
        print(f"[overtok] resumed pack of {P} from {ckpt_dir} at step {step}")
        for s, h in zip(hsinks, state["history"]):
            s.replay(h)

    max_norm = t.grad_clip if t.grad_clip > 0 else math.inf

    def run(batch: torch.Tensor, lrs: torch.Tensor):  # a step graph's step (one micro-batch) on device tensors
        parts = accumulate(model, lambda: batch, 1, device, autocast)
        return parts, opt.step(lrs, max_norm)

    def draw() -> torch.Tensor:  # every slice's next batch, on the host
        return torch.cat([d.next() for d in train_data])

    step_graph = StepGraph(run, opt.zero_grad, device) if perf_flags["perf/step_graph"] else None
    flops_per_token = accounting.flops_per_token(cfg0.model) / cfg0.model.tokenizer_ngram
    summaries: list[dict] = [{} for _ in range(P)]
    alive = [True] * P
    t_last, tokens_last = time.time(), tokens_seen
    startup = {"perf/setup_s": t_last - t_enter}
    first_step = step + 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def log(p: int, metrics: dict) -> None:
        if alive[p]:
            hsinks[p].log(metrics, tokens_seen)
            summaries[p].update(metrics)

    while True:
        last_step = step >= t.max_steps
        if ((step % t.eval_every == 0 and step > 0) or last_step) and step != resumed_from:
            t_eval = time.time()
            val = evaluate(model, val_data, t.eval_batches, device, autocast, compiled_eval(cfg0)).tolist()
            eval_s = time.time() - t_eval  # .tolist() waited for the GPU
            for p, c in enumerate(cfgs):
                metrics = {"val/loss": val[p], "perf/eval_s": eval_s}
                if c.data.kind == "text":
                    bpt = read_bytes_per_token(c)
                    if bpt > 0:
                        metrics["val/bpb"] = val[p] / math.log(2) / bpt
                if c.data.kind == "cfg" and t.gen_samples and (last_step or (t.gen_every and step % t.gen_every == 0)) \
                        and alive[p]:
                    if plain is None:
                        with torch.device(device):
                            plain = Transformer(c.model, eos_id=train_data[0].eos_id)
                    unpack_slice(model, p, plain)
                    metrics["val/gen_acc"] = generation_accuracy(plain, val_data[p], t.gen_samples, device, c.seed)
                log(p, metrics)

        if step > 0 and (step % t.checkpoint_every == 0 or (last_step and t.checkpoint_final)) and step != resumed_from:
            save_checkpoint(ckpt_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                       "tokens_seen": tokens_seen, "data": [d.state_dict() for d in train_data],
                                       "rng": torch.get_rng_state(), "configs": [to_dict(c) for c in cfgs],
                                       "history": [s.history for s in hsinks]})
            for s in hsinks:
                s.flush()
        if last_step:
            break

        if step == cfg0.runtime.fail_at_step:
            raise RuntimeError(f"fail_at_step={step} (deliberate failure for testing)")
        lr_list = [lr_at(step, c.train) for c in cfgs]
        if step_graph is not None:
            parts, grad_norms = step_graph.step(draw(), torch.tensor(lr_list))
        else:
            parts = accumulate(model, draw, t.grad_accum, device, autocast)
            grad_norms = opt.step(to_device(torch.tensor(lr_list), device), max_norm)
            opt.zero_grad()
        step += 1
        tokens_seen += cfg0.tokens_per_step
        if step == first_step:
            startup["perf/first_step_s"] = synced_since(t_last, device)
            print(f"[overtok] pack of {P}: setup {startup['perf/setup_s']:.1f} s, first step "
                  f"{startup['perf/first_step_s']:.1f} s" + (" (compilation included)" if cfg0.runtime.compile else ""), flush=True)

        if step % t.log_every == 0 or step == t.max_steps:
            totals = parts["total"].tolist()
            now = time.time()
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)  # per slice
            t_last, tokens_last = now, tokens_seen
            host = {k: v.tolist() for k, v in parts.items()}
            norms = grad_norms.tolist()
            for p in range(P):
                if not alive[p]:
                    continue
                if not math.isfinite(totals[p]):
                    err = TrainingDiverged(step, "nan" if math.isnan(totals[p]) else "inf")
                    summaries[p]["error"] = f"{type(err).__name__}: {err}"
                    hsinks[p].flush()
                    alive[p] = False
                    continue
                metrics = {"train/loss": host["next"][p], "train/loss_total": totals[p], "train/lr": lr_list[p],
                           "train/grad_norm": norms[p], "perf/tokens_per_s": tps, "perf/pack_size": P,
                           "perf/pack_tokens_per_s": tps * P, **perf_flags}
                metrics.update({f"train/loss_{k}": v[p] for k, v in host.items() if k not in ("total", "next")})
                metrics.update(startup)
                if train_data[p].epoch_tokens:
                    metrics["train/epochs"] = tokens_seen / train_data[p].epoch_tokens
                if device.type == "cuda":
                    metrics["perf/mfu"] = accounting.mfu(tps * P, flops_per_token)  # one GPU, P slices
                    metrics["perf/mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                log(p, metrics)
            startup = {}
            if not any(alive):
                break
    for p in range(P):
        summaries[p]["tokens_seen"] = tokens_seen
        hsinks[p].flush()
    return summaries
