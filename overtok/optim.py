"""Optimizers and their schedule: the learning-rate schedule, AdamW's parameter groups, gradient clipping that
counts row-sparse and row-sharded tables, and ``PackedAdamW`` for packed models (overtok/packed.py)."""

from __future__ import annotations

import math

import torch

from overtok.compat import foreach_mul_, foreach_norm, fused_adamw_
from overtok.config import TrainConfig
from overtok.model import Transformer


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


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` as a checkpoint keeps it: a step graph's tensor learning rate as the number it holds
    and capturable off (what the optimizer was built with), so that any run resumes from it the same way."""
    state = opt.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"], group["capturable"] = group["lr"].item(), False
    return state


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


def clip_sharded(model: Transformer, shards: list[torch.nn.Parameter], world: int, max_norm: float) -> torch.Tensor:
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


class PackedAdamW:
    """torch.optim.AdamW(fused=True)'s update on packed parameters, with a learning rate per slice.

    Parameter groups as in ``overtok.optim.make_optimizer``: weight decay on matrices, none on norms, the
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
        # (overtok.engine.StepGraph) advances it without the host
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
