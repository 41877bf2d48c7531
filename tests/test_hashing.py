"""analysis.hashing: table use counted from a token stream, checked against a direct count, and `overtok hashstats`."""

import collections

import numpy as np
import pytest
import torch

from analysis.hashing import hash_use, ngram_counts, table_use
from overtok.ngram import ngram_ids

V = 37


def _direct(tokens: list[int], order: int, m: int) -> dict:
    """Row of every n-gram occurrence by overtok's own hash (overtok/ngram.py), counted in plain Python."""
    rows = ngram_ids(torch.tensor([tokens]), V, order, m)[0, order - 1:].tolist()
    grams = [tuple(tokens[t - order + 1: t + 1]) for t in range(order - 1, len(tokens))]
    by_row: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r, g in zip(rows, grams):
        by_row[r][g] += 1
    total = len(grams)
    return {"rows_used": len(by_row) / m, "purity": sum(c.most_common(1)[0][1] for c in by_row.values()) / total,
            "shared": sum(sum(c.values()) for c in by_row.values() if len(c) > 1) / total,
            "distinct": len(set(grams))}


@pytest.mark.parametrize("order,m", [(2, 7), (2, 101), (2, 5003), (3, 211)])
def test_table_use_matches_a_direct_count_by_overtoks_hash(order, m):
    rng = np.random.default_rng(order * m)
    tokens = (rng.zipf(1.3, 3000) % V).tolist()  # skewed, as text is: frequent n-grams collide with rare ones
    ids, counts = ngram_counts(np.array(tokens, dtype=np.uint16), V, order)
    use = table_use(ids, counts, m)
    want = _direct(tokens, order, m)
    assert len(ids) == want["distinct"] and counts.sum() == len(tokens) - order + 1
    for key in ("rows_used", "purity", "shared"):
        assert use[key] == pytest.approx(want[key], abs=1e-12), key
    assert use["per_row"] == pytest.approx((len(tokens) - order + 1) / m)


def test_hash_use_rows_and_limits():
    tokens = np.arange(1000, dtype=np.uint16) % V
    df = hash_use(tokens, V, [(2, 11), (2, 10007)], epochs=3.0)
    assert list(df.m) == [11, 10007]
    big = df.iloc[1]
    assert big.purity == 1.0 and big.shared == 0.0 and big.per_row_trial == pytest.approx(3 * big.per_row)
    with pytest.raises(ValueError, match="int64"):
        ngram_counts(tokens, 50_000, 5)


def test_hashstats_refuses_a_sweep_without_oe_in_one_line(cli, tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nbase: {model: {d_model: 32}}\n")
    res = cli("hashstats", "s.yaml")
    assert res.returncode == 2 and "model.oe.n" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_hashstats_counts_a_sweeps_tables_on_its_corpus(cli, tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(80)]
    (tmp_path / "corpus").mkdir()
    for f in ("a.txt", "b.txt"):
        (tmp_path / "corpus" / f).write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(300)))
    (tmp_path / "s.yaml").write_text(
        "name: s\nbase:\n  model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 32, oe: {k: 1}}\n"
        "  data: {kind: text, corpus: corpus, tokenizer: 'bpe:300', val_fraction: 0.1, batch_size: 2}\n"
        "  train: {max_steps: 10}\n"
        "zip:\n  - model.oe.n: [1, 2, 2]\n    model.oe.m: [0, 101, 1009]\n")
    res = cli("hashstats", "s.yaml", timeout=600)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["101", "1,009"]
    assert "a trial reads" in res.stdout
