"""Row-sparse OE tables: equal to dense AdamW where lazy Adam must be, and correct where they differ."""

import pytest
import torch

from overtok.model import Transformer
from overtok.train import make_optimizer, train
from tests.conftest import tiny_config

OE = {"model.oe.n": 2, "model.oe.k": 1, "model.oe.m": 8, "model.d_model": 32, "model.vocab_size": 7,
      "train.weight_decay": 0.0, "train.grad_clip": 0.0}


def _pair(**extra):
    dense_cfg = tiny_config(**OE, **extra)
    sparse_cfg = tiny_config(**OE, **{"model.oe.sparse_update": True}, **extra)
    torch.manual_seed(0)
    dense = Transformer(dense_cfg.model)
    sparse = Transformer(sparse_cfg.model)
    sparse.load_state_dict(dense.state_dict(), strict=False)
    with torch.no_grad():
        sparse.embed.tables.weight.copy_(dense.embed.tables.weight)
    return dense_cfg, dense, sparse


def _step(model, opt, x, cfg):
    _, losses = model(x)
    losses["total"].backward()
    opt.step()
    opt.zero_grad()
    for t in model.sparse_tables():
        t.apply_update(cfg.train.lr, cfg.train.beta1, cfg.train.beta2, weight_decay=cfg.train.embed_weight_decay)
    return losses["total"].item()


def test_lazy_row_adam_equals_dense_adamw_when_every_row_is_touched():
    cfg, dense, sparse = _pair()
    od, os_ = make_optimizer(dense, cfg.train, torch.device("cpu")), make_optimizer(sparse, cfg.train, torch.device("cpu"))
    assert all(p is not sparse.embed.tables.weight for g in os_.param_groups for p in g["params"])
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randint(0, 7, (8, cfg.model.seq_len + 1))  # 8*33 bigrams mod 8 rows: every row every step
        assert len(set(((x[:, 1:] + 7 * x[:, :-1]) % 8).flatten().tolist())) == 8
        ld, ls = _step(dense, od, x, cfg), _step(sparse, os_, x, cfg)
        assert ld == pytest.approx(ls, rel=1e-5)
    torch.testing.assert_close(sparse.embed.tables.weight, dense.embed.tables.weight, rtol=1e-5, atol=1e-6)


def test_untouched_rows_stay_put_and_touched_rows_move():
    cfg = tiny_config(**{**OE, "model.oe.m": 1000, "model.oe.sparse_update": True})
    model = Transformer(cfg.model)
    before = model.embed.tables.weight.clone()
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    x = torch.randint(0, 7, (2, cfg.model.seq_len + 1))
    _step(model, opt, x, cfg)
    touched = torch.zeros(1000, dtype=torch.bool)
    touched[model.embed.slice_ids(x[:, :-1]).flatten() - model.embed.offsets[0]] = True
    changed = (model.embed.tables.weight != before).any(1)
    assert torch.equal(changed, touched)


def test_bf16_tables_train_and_resume(tmp_path):
    sets = {**OE, "model.oe.sparse_update": True, "model.oe.table_dtype": "bfloat16", "train.max_steps": 12,
            "train.checkpoint_every": 6, "train.log_every": 3, "train.checkpoint_dir": str(tmp_path)}
    summary = train(tiny_config(**sets))
    assert summary["train/loss"] < 2.0
    state = torch.load(sorted(tmp_path.glob("ckpt_*.pt"))[-1], weights_only=True)
    assert state["model"]["embed.tables.weight"].dtype == torch.bfloat16
    assert int(state["model"]["embed.tables.step"]) == 12


def test_compiled_row_update_equals_the_eager_one_and_compiles_once():
    """The trainer compiles the row update on CUDA (RowSparseTable.compile_update); same numbers as eager, and a
    new learning rate each step must not recompile it."""
    from torch._dynamo.utils import counters

    cfg = tiny_config(**{**OE, "model.oe.m": 1000, "model.oe.sparse_update": True})
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Transformer(cfg.model))
    models[1].embed.tables.compile_update()
    assert models[1].embed.tables.update_compiled and not models[0].embed.tables.update_compiled
    init = models[0].embed.tables.weight.clone()
    torch._dynamo.reset()
    counters.clear()
    opts = [make_optimizer(m, cfg.train, torch.device("cpu")) for m in models]
    torch.manual_seed(1)
    for lr, wd in [(1e-2, 0.0), (5e-3, 0.1), (2e-3, 0.1)]:
        x = torch.randint(0, 7, (4, cfg.model.seq_len + 1))
        for m, o in zip(models, opts):
            _, losses = m(x)
            losses["total"].backward()
            o.step()
            o.zero_grad()
            m.embed.tables.apply_update(lr, 0.9, 0.95, weight_decay=wd)
    eager, compiled = (m.embed.tables for m in models)
    for name in ("weight", "exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-5, atol=1e-7, msg=name)
    assert int(eager.step) == 3 and (eager.weight != init).any(1).sum() > 10  # rows were touched and moved
    assert counters["stats"]["unique_graphs"] == 2  # one per weight-decay branch, none per learning rate


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_compiled_ngram_ids_equal_the_eager_ones(stop_at_eos):
    """The trainer compiles the n-gram ids on CUDA (OverEncoding.compile_ids): the same rows, document
    boundaries included."""
    cfg = tiny_config(**{**OE, "model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1001, "model.oe.stop_at_eos": stop_at_eos})
    oe = Transformer(cfg.model, eos_id=6).embed
    x = torch.randint(0, 7, (3, 40), generator=torch.Generator().manual_seed(0))
    eager = oe.slice_ids(x)
    oe.compile_ids()
    assert torch.equal(oe.slice_ids(x), eager)
    assert eager.shape == (3, 40, 4) and (eager >= oe.offsets).all()


def test_oe_mix_inside_the_compiled_body_trains_as_eager():
    """With train.compile the OE projection and mean run inside the compiled body; the row-sparse table's gradient
    still reaches it through the autograd hook on the looked-up rows (compiled backward), so losses, tables and
    dense weights follow the eager model."""
    cfg = tiny_config(**{**OE, "model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 1001, "model.oe.sparse_update": True})
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Transformer(cfg.model))
    models[1].body_and_loss = torch.compile(models[1].body_and_loss, backend="aot_eager", fullgraph=True)
    models[1].embed.compile_ids()
    opts = [make_optimizer(m, cfg.train, torch.device("cpu")) for m in models]
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 7, (4, cfg.model.seq_len + 1))
        eager, compiled = (_step(m, o, x, cfg) for m, o in zip(models, opts))
        assert compiled == pytest.approx(eager, rel=1e-5)
    torch.testing.assert_close(models[1].embed.tables.weight, models[0].embed.tables.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(models[1].embed.proj.weight, models[0].embed.proj.weight, rtol=1e-5, atol=1e-6)
    assert int(models[1].embed.tables.step) == 3
