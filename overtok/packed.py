"""Packed trials: P same-shape runs trained as one model in one process, sharing every kernel.

Small models leave a big GPU idle: one tiny trial per process is launch-bound, and several processes on one GPU
only time-slice. Here P trials whose configs differ only in ``seed`` and ``train.lr`` become one model whose
parameters carry a leading pack dimension P; the batch is the P batches stacked along the batch dimension
(slice-major), so every matmul is one batched matmul over the P slices and attention, norms and the loss run
once over all of them. Nothing mixes between slices: each slice gets exactly the gradient it would get alone.

- ``pack_models(models)``: turn P built ``Transformer``s into one packed ``Transformer`` (weights stacked;
  nn.Linear -> PackedLinear, nn.Embedding -> PackedEmbedding, RMSNorm weights stacked). The model code is shared:
  a packed model returns per-slice losses of shape (P,).
- ``unpack_slice``: one slice back into a plain model (generation runs on plain models).
- ``check_packable(cfgs)``: whether configs may share a pack (``overtok.identity.pack_key``).

Its optimizer is ``overtok.optim.PackedAdamW``; ``overtok.engine`` applies packing to built models and
``overtok.train.train_pack`` trains a pack. Not packable (they run alone): row-sparse OE tables, data-parallel trials.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from overtok.config import RunConfig
from overtok.identity import PACK_FREE_KEYS, pack_key
from overtok.model import RMSNorm, Transformer, packed_linear

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


def check_packable(cfgs: list[RunConfig]) -> None:
    keys = {pack_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError(f"configs differ in more than {', '.join(PACK_FREE_KEYS)} or use row-sparse tables; "
                         "they cannot share a pack")
