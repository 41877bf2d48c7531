"""Row-sparse OE tables: equal to dense AdamW where lazy Adam must be, and correct where they differ."""

import tempfile
from pathlib import Path

import pytest
import torch

from overtok.model import Transformer
from overtok.optim import make_optimizer
from overtok.train import train
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
    """With runtime.compile the OE projection and mean run inside the compiled body; the row-sparse table's gradient
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


def _trained_tables(sparse: dict, steps: int = 300, **extra):
    """The OE table and the loss curve after ``steps`` of the trainer's own loop (cosine schedule, clipping and
    weight decay on, rows of a 4096-row table touched sparsely) with the given table settings."""
    from overtok.tracking import Sink

    class Curve(Sink):
        def __init__(self):
            self.points = []

        def log(self, metrics, step):
            if "train/loss" in metrics:
                self.points.append(metrics["train/loss"])

    sets = {**OE, "model.oe.m": 4093, "model.vocab_size": 0, "train.max_steps": steps, "train.warmup_steps": 10,
            "train.log_every": 10, "train.eval_every": steps, "train.checkpoint_every": 10_000, "train.lr": 1e-2,
            "train.checkpoint_final": False, "train.grad_clip": 0.5, "train.weight_decay": 0.1,
            "train.table_weight_decay": 0.05, "runtime.device": "cpu", **sparse, **extra}
    cfg = tiny_config(**sets)
    cfg.train.checkpoint_dir = str(Path(tempfile.mkdtemp()) / "ckpt")
    curve = Curve()
    summary = train(cfg, curve)
    return curve.points, summary


def test_exact_row_adam_follows_dense_adamw():
    """Over 300 steps of the trainer with a cosine schedule, clipping that binds and weight decay on the tables, the
    exact mode's loss curve stays within 5e-4 of dense AdamW's (float rounding of the replayed steps, amplified by
    training: at lr 1e-3 the two curves differ by 2e-6 to 2.4e-4 on the CPU)."""
    dense, _ = _trained_tables({}, **{"train.lr": 1e-3})
    exact, _ = _trained_tables({"model.oe.sparse_update": True, "model.oe.sparse_mode": "exact"}, **{"train.lr": 1e-3})
    assert len(dense) == len(exact) == 30
    assert exact == pytest.approx(dense, abs=5e-4)


def test_exact_catch_up_equals_dense_steps_row_by_row():
    """A row touched once, then idle for 40 and 600 steps: its value, after the flush, equals dense AdamW's (fused
    torch.optim.AdamW on an nn.Parameter) with the same gradients, learning rates and weight decay."""
    from overtok.sparse import RowSparseTable

    torch.manual_seed(0)
    rows, width = 6, 5
    table = RowSparseTable(rows, width, mode="exact")
    table.reset_parameters(0.02)
    lazy = RowSparseTable(rows, width, mode="lazy")
    lazy.weight.data.copy_(table.weight)
    ref = torch.nn.Parameter(table.weight.detach().clone())
    opt = torch.optim.AdamW([ref], lr=1.0, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(700):
        lr = 1e-2 * (0.5 + 0.5 * torch.cos(torch.tensor(step / 700 * 3.14159)).item())
        touched = [0, 1] if step < 3 or step % 7 == 0 else [0]
        if step in (60, 100):
            touched = [0, 2]  # row 2: idle 40 steps between its touches
        if step in (20, 620):
            touched = [0, 3]  # row 3: touched at 20, idle 600 steps, touched at 620
        grads = torch.randn(len(touched), width, generator=g) * 1e-3
        dense_grad = torch.zeros(rows, width)
        dense_grad[touched] = grads
        ref.grad = dense_grad
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for t in (table, lazy):
            t._pending.append((torch.tensor(touched), grads))
            t.apply_update(lr, 0.9, 0.95, weight_decay=0.1)
    table.flush()
    torch.testing.assert_close(table.weight, ref.detach(), rtol=1e-5, atol=1e-7)
    lazy.flush()  # nothing to do in lazy mode: idle rows stood still
    assert (lazy.weight - ref.detach()).abs().max() > 1e-3
    assert not torch.equal(table.weight[4], table.weight.new_zeros(width))  # never touched: decayed, not zeroed


def test_tables_count_in_gradient_clipping():
    """clip_with_tables: the global norm includes the table's coalesced gradient, as nn.Embedding's would."""
    from overtok.optim import clip_with_tables

    cfg, dense, sparse = _pair()
    x = torch.randint(0, 7, (4, cfg.model.seq_len + 1))
    for model in (dense, sparse):
        model(x)[1]["total"].backward()
    expect = torch.nn.utils.clip_grad_norm_(dense.parameters(), 1e-3)
    norm, coef = clip_with_tables(sparse, sparse.sparse_tables(), 1e-3)
    assert float(norm) == pytest.approx(float(expect), rel=1e-5)
    assert float(coef) == pytest.approx(1e-3 / (float(expect) + 1e-6), rel=1e-5)
    torch.testing.assert_close(sparse.head_weight().grad, dense.head_weight().grad)


def test_bf16_stochastic_rounding_moves_rows_by_updates_below_half_an_ulp():
    """1,000 updates of 1e-5 on values near 1.0 (a bf16 ulp there is 2^-7 = 0.0078): nearest rounding never moves
    them; stochastic rounding moves them by 1,000 * 1e-5 = 0.01 in expectation (mean over 4,096 entries)."""
    from overtok.sparse import stochastic_round

    torch.manual_seed(0)
    x = torch.ones(4096, dtype=torch.bfloat16)
    nearest = x.clone()
    for step in range(1000):
        x = stochastic_round(x.float() + 1e-5, torch.bfloat16, step)
        nearest = (nearest.float() + 1e-5).to(torch.bfloat16)
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert float(x.float().mean() - 1) == pytest.approx(0.01, rel=0.05)
    # negative values round unbiased too, and the rounding depends on the salt alone (reproducible, no RNG used)
    y = torch.full((4096,), -1.0 - 0.3 * 2**-7)
    assert float(stochastic_round(y, torch.bfloat16, 7).float().mean()) == pytest.approx(float(y.mean()), abs=2e-4)
    assert torch.equal(stochastic_round(y, torch.bfloat16, 7), stochastic_round(y, torch.bfloat16, 7))


def test_exact_mode_resumes_from_a_checkpoint(tmp_path):
    """Exact mode keeps its per-row steps and learning-rate history in checkpoints (the history grows past its
    initial size in a long run and is restored at its saved size)."""
    from overtok.sparse import RowSparseTable

    table = RowSparseTable(8, 4, mode="exact")
    for step in range(1500):
        table._pending.append((torch.tensor([step % 8]), torch.ones(1, 4)))
        table.apply_update(1e-3, 0.9, 0.95)
    state = table.state_dict()
    fresh = RowSparseTable(8, 4, mode="exact")
    fresh.load_state_dict(state)
    assert fresh.hist.shape == table.hist.shape and torch.equal(fresh.last, table.last)
