"""The n-gram hash of Over-Encoding: the one place that defines which table row an n-gram hits.

Paper (Huang et al. 2025, Alg. 1): the suffix n-gram of order j ending at position t has id
``sum_{i<j} x_{t-i} * V^i`` (positions before the sequence start count as token 0), and a slice with
modulus m looks up row ``id mod m``. ``V^j`` overflows int64 for j >= 4 at V ~ 100k, so we never form
it: each term uses the weight ``V^i mod m`` (exact in Python ints) and is reduced mod m before summing,
which keeps every intermediate below ``V * m``.
"""

from __future__ import annotations

import torch


def hash_weights(vocab_size: int, order: int, modulus: int) -> list[int]:
    """``[V^i mod m for i < order]``, computed exactly."""
    return [pow(vocab_size, i, modulus) for i in range(order)]


def shifted_stack(input_ids: torch.Tensor, order: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) -> (B, T, order) with [..., i] = x_{t-i}, zero before the start (or before a document boundary)."""
    B, T = input_ids.shape
    cols = [input_ids]
    for i in range(1, order):
        shifted = torch.zeros_like(input_ids)
        if i < T:
            shifted[:, i:] = input_ids[:, :-i]
            if doc_ids is not None:
                same = torch.zeros_like(input_ids, dtype=torch.bool)
                same[:, i:] = doc_ids[:, i:] == doc_ids[:, :-i]
                shifted = shifted * same
        cols.append(shifted)
    return torch.stack(cols, dim=-1)


def hash_stacked(stacked: torch.Tensor, weights: torch.Tensor, moduli: torch.Tensor) -> torch.Tensor:
    """(B, T, n) shifted tokens, (S, n) weights, (S,) moduli -> (B, T, S) row ids, each in [0, m_s).

    Requires V * max(m) * n < 2^63 (V = 100k allows moduli up to ~1e13).
    """
    terms = (stacked.unsqueeze(-2) * weights) % moduli.unsqueeze(-1)  # (B, T, S, n)
    return terms.sum(-1) % moduli


def ngram_ids(input_ids: torch.Tensor, vocab_size: int, order: int, modulus: int) -> torch.Tensor:
    """Suffix n-gram id of ``order`` at every position, reduced mod ``modulus``. LongTensor (B, T) in and out."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if modulus < 1:
        raise ValueError(f"modulus must be >= 1, got {modulus}")
    stacked = shifted_stack(input_ids.long(), order)
    w = torch.tensor([hash_weights(vocab_size, order, modulus)], dtype=torch.long, device=input_ids.device)
    mod = torch.tensor([modulus], dtype=torch.long, device=input_ids.device)
    return hash_stacked(stacked, w, mod)[..., 0]
