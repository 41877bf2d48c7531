import random

import pytest
import torch

import overtok
from overtok.model import OverEncoding
from tests.conftest import tiny_config


def big_int_ids(x: list[list[int]], V: int, order: int, m: int) -> list[list[int]]:
    out = []
    for row in x:
        ids = []
        for t in range(len(row)):
            full = sum((row[t - i] if t - i >= 0 else 0) * V**i for i in range(order))  # exact, unbounded int
            ids.append(full % m)
        out.append(ids)
    return out


@pytest.mark.parametrize("V,order,m", [(7, 3, 1000), (50280, 2, 3_200_000), (100278, 5, 12_800_001), (100278, 4, 2**40 + 7)])
def test_ngram_ids_match_big_integer_formula(V, order, m):
    rng = random.Random(order)
    x = [[rng.randrange(V) for _ in range(17)] for _ in range(3)]
    got = overtok.ngram_ids(torch.tensor(x), V, order, m)
    assert got.dtype == torch.long and got.shape == (3, 17)
    assert got.tolist() == big_int_ids(x, V, order, m)


def test_oe_module_uses_the_same_hash_with_distinct_moduli():
    cfg = tiny_config(**{"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 100, "model.d_model": 32})
    oe = OverEncoding(cfg.model)
    moduli = oe.moduli.tolist()
    assert moduli == [100, 102, 104, 106] and len(set(moduli)) == 4
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    ids = oe.slice_ids(x) - oe.offsets
    for s, (order, mod) in enumerate(cfg.model.oe_moduli()):
        assert torch.equal(ids[..., s], overtok.ngram_ids(x, cfg.model.vocab_size, order, mod))


def test_odd_moduli_option():
    cfg = tiny_config(**{"model.oe.n": 2, "model.oe.k": 2, "model.oe.m": 100, "model.oe.odd_moduli": True, "model.d_model": 32})
    assert [m for _, m in cfg.model.oe_moduli()] == [101, 103]


def test_oe_with_n1_equals_plain_embedding():
    cfg = tiny_config()
    oe = OverEncoding(cfg.model)
    emb = torch.nn.Embedding(cfg.model.vocab_size, cfg.model.d_model)
    emb.weight.data.copy_(oe.wte.weight.data)
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    assert torch.equal(oe(x), emb(x))


def test_oe_is_mean_of_unigram_and_projected_slices():
    cfg = tiny_config(**{"model.oe.n": 2, "model.oe.k": 2, "model.oe.m": 31})
    oe = OverEncoding(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 5))
    w = oe.width
    parts = [oe.wte(x)]
    for s, (order, mod) in enumerate(cfg.model.oe_moduli()):
        rows = oe.tables.weight[oe.offsets[s] + overtok.ngram_ids(x, cfg.model.vocab_size, order, mod)]
        parts.append(rows @ oe.proj.weight[:, s * w : (s + 1) * w].T)  # slice s's own projection
    torch.testing.assert_close(oe(x), torch.stack(parts).mean(0))


def test_stop_at_eos_cuts_lookback():
    cfg = tiny_config(**{"model.oe.n": 2, "model.oe.m": 1001, "model.oe.stop_at_eos": True})
    eos = 4
    oe = OverEncoding(cfg.model, eos_id=eos)
    x = torch.tensor([[1, 2, eos, 3, 1]])
    ids = (oe.slice_ids(x) - oe.offsets)[0, :, 0].tolist()
    V = cfg.model.vocab_size
    # position 3 starts a new document: its bigram has no previous token
    assert ids == [1, 2 + 1 * V, eos + 2 * V, 3, 1 + 3 * V]
