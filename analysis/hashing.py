"""How Over-Encoding's hashed tables are used by a corpus: rows hit, updates per row, collisions.

A log-linear law in the table size m can only hold while a larger m still separates n-grams that a smaller one
merged, and while the rows see enough updates to learn. Both are properties of the corpus and the hash alone
(``overtok/ngram.py``: the order-j suffix n-gram ending at t has id ``sum_{i<j} x_{t-i} V^i`` and hits row
``id mod m``), so they are counted here from the token stream, without training:

- ``rows_used``: the share of the m rows that some n-gram of the split hits;
- ``per_row``: n-gram occurrences per row (all m rows) in one pass over the split: the updates a row gets per
  epoch, on average; ``per_used_row`` the same over the rows hit;
- ``purity``: the share of occurrences that belong to their row's most frequent n-gram (1.0: every row serves one
  n-gram; lower: rows are shared, and the less frequent n-grams of a row get another n-gram's vector);
- ``shared``: the share of occurrences whose row also serves at least one other n-gram.

The stream is read as one sequence (the trainer pads with token 0 before each window's start; those few
positions per window are not counted). numpy only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def ngram_counts(tokens: np.ndarray, vocab_size: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct order-``order`` suffix n-grams of ``tokens`` (exact ids ``sum_i x_{t-i} V^i``, positions
    ``order - 1`` onwards) and how often each occurs."""
    if order < 2:
        raise ValueError(f"order must be >= 2, got {order}")
    if vocab_size ** order >= 2**63:
        raise ValueError(f"V^{order} = {vocab_size}^{order} does not fit in int64: exact n-gram ids need a smaller "
                         "order")
    x = np.asarray(tokens, dtype=np.int64)
    T = len(x)
    if T < order:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = x[order - 1:].copy()
    for i in range(1, order):
        ids += x[order - 1 - i: T - i] * vocab_size**i
    return np.unique(ids, return_counts=True)


def table_use(ids: np.ndarray, counts: np.ndarray, modulus: int) -> dict[str, float]:
    """``rows_used``, ``per_row``, ``per_used_row``, ``purity`` and ``shared`` (module docstring) of a table of
    ``modulus`` rows, for n-grams ``ids`` occurring ``counts`` times."""
    total = int(counts.sum())
    rows = ids % modulus
    order = np.lexsort((-counts, rows))  # by row, the most frequent n-gram of each row first
    rows, c = rows[order], counts[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    used = int(first.sum())
    row_sizes = np.diff(np.append(np.flatnonzero(first), len(rows)))  # distinct n-grams per used row
    shared_rows = np.repeat(row_sizes > 1, row_sizes)
    return {"rows_used": used / modulus, "per_row": total / modulus, "per_used_row": total / max(used, 1),
            "purity": float(c[first].sum()) / total, "shared": float(c[shared_rows].sum()) / total}


def hash_use(tokens: np.ndarray, vocab_size: int, tables: list[tuple[int, int]], epochs: float = 1.0) -> pd.DataFrame:
    """One row per (order, modulus) in ``tables``: the split's distinct n-grams of that order, those occurring 10
    times or more, and :func:`table_use`; ``per_row_trial`` = ``per_row`` x ``epochs`` (passes a trial makes)."""
    out, by_order = [], {}
    for order, modulus in tables:
        if order not in by_order:
            by_order[order] = ngram_counts(tokens, vocab_size, order)
        ids, counts = by_order[order]
        use = table_use(ids, counts, modulus)
        out.append({"order": order, "m": modulus, "ngrams": len(ids), "ngrams_10plus": int((counts >= 10).sum()),
                    **use, "per_row_trial": use["per_row"] * epochs})
    return pd.DataFrame(out)


def hash_use_markdown(df: pd.DataFrame) -> str:
    lines = ["| order | m | distinct n-grams (10+ times) | rows used | occurrences per row: epoch / trial "
             "(per used row) | purity | occurrences in shared rows |", "|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.order} | {r.m:,} | {r.ngrams:,} ({r.ngrams_10plus:,}) | {r.rows_used:.1%} | "
                     f"{r.per_row:,.1f} / {r.per_row_trial:,.1f} ({r.per_used_row:,.1f}) | {r.purity:.3f} | "
                     f"{r.shared:.1%} |")
    return "\n".join(lines) + "\n"
