"""Packed trials: P runs in one model must train exactly as P separate runs (on CPU, float32)."""

import pytest
import torch

from overtok.model import Transformer
from overtok.optim import PackedAdamW
from overtok.packed import check_packable, pack_key, pack_models, unpack_slice
from overtok.tracking import MemorySink
from overtok.train import train, train_pack
from tests.conftest import tiny_config


def _configs(tmp_path, **extra):
    sets = {"train.max_steps": 12, "train.eval_every": 6, "train.log_every": 3, "train.checkpoint_every": 6, **extra}
    cfgs = []
    for i, (seed, lr) in enumerate([(0, 3e-3), (1, 1e-3), (2, 3e-3)]):
        c = tiny_config(**sets, seed=seed, **{"train.lr": lr})
        c.train.checkpoint_dir = str(tmp_path / f"alone{i}")
        cfgs.append(c)
    return cfgs


def _alone(cfgs):
    out = []
    for c in cfgs:
        s = MemorySink()
        train(c, s, device=torch.device("cpu"))
        out.append(s.points)
    return out


def _assert_same(alone, packed, keys=("train/loss", "train/grad_norm", "val/loss")):
    for a, b in zip(alone, packed):
        for k in keys:
            assert a[k].keys() == b[k].keys(), k
            for step in a[k]:
                assert abs(a[k][step] - b[k][step]) < 2e-4 * max(1.0, abs(a[k][step])), (k, step, a[k][step], b[k][step])


def test_packed_equals_separate_runs_with_different_seeds_and_lrs(tmp_path):
    cfgs = _configs(tmp_path)
    alone = _alone(cfgs)
    sinks = [MemorySink() for _ in cfgs]
    summaries = train_pack(cfgs, sinks, tmp_path / "pack", device=torch.device("cpu"))
    _assert_same(alone, [s.points for s in sinks])
    assert all(s["tokens_seen"] == cfgs[0].train.max_steps * cfgs[0].tokens_per_step for s in summaries)
    # different seeds and learning rates really give different curves
    assert sinks[0].points["train/loss"] != sinks[1].points["train/loss"]


def test_packed_oe_mtp_ds_and_tied_embeddings(tmp_path):
    cfgs = _configs(tmp_path, **{"model.oe.n": 3, "model.oe.m": 401, "model.od_depth": 2, "model.od_mode": "mtp_ds",
                                 "model.tie_embeddings": True})
    alone = _alone(cfgs)
    sinks = [MemorySink() for _ in cfgs]
    train_pack(cfgs, sinks, tmp_path / "pack", device=torch.device("cpu"))
    _assert_same(alone, [s.points for s in sinks], keys=("train/loss", "train/loss_head2", "val/loss"))


def test_packed_resume_and_unpack(tmp_path):
    cfgs = _configs(tmp_path)
    full = [MemorySink() for _ in cfgs]
    train_pack(cfgs, full, tmp_path / "full", device=torch.device("cpu"))
    # fail after the first checkpoint (step 6), then resume from it
    for c in cfgs:
        c.runtime.fail_at_step = 8
    with pytest.raises(RuntimeError, match="fail_at_step"):
        train_pack(cfgs, [MemorySink() for _ in cfgs], tmp_path / "resumed", device=torch.device("cpu"))
    for c in cfgs:
        c.runtime.fail_at_step = -1
    resumed = [MemorySink() for _ in cfgs]
    train_pack(cfgs, resumed, tmp_path / "resumed", device=torch.device("cpu"))
    for a, b in zip(full, resumed):
        assert a.points["train/loss"] == b.points["train/loss"]  # replayed history + exact continuation

    # a slice of a packed model is the plain model of that seed
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(Transformer(c.model))
    torch.manual_seed(cfgs[1].seed)
    ref = Transformer(cfgs[1].model)
    tok = torch.randint(0, cfgs[0].model.vocab_size, (2, cfgs[0].model.seq_len + 1))
    want = ref(tok)[1]["next"]
    packed = pack_models(models)
    got = packed(tok.repeat(3, 1))[1]["next"]
    assert got.shape == (3,) and torch.allclose(got[1], want, atol=1e-5)
    plain = unpack_slice(packed, 1, Transformer(cfgs[1].model))
    assert torch.allclose(plain(tok)[1]["next"], want, atol=1e-6)


def test_packed_adamw_equals_torch_adamw_per_slice():
    cfg = tiny_config()
    torch.manual_seed(0)
    models = [Transformer(cfg.model) for _ in range(2)]
    refs = [Transformer(cfg.model) for _ in range(2)]
    for r, m in zip(refs, models):
        r.load_state_dict(m.state_dict())
    from overtok.optim import make_optimizer

    ref_opts = [make_optimizer(r, cfg.train, torch.device("cpu")) for r in refs]
    packed = pack_models(models)
    opt = PackedAdamW(packed, cfg.train)
    lrs = [1e-2, 3e-3]
    for _ in range(3):
        tok = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1))
        for r, o, lr in zip(refs, ref_opts, lrs):
            for g in o.param_groups:
                g["lr"] = lr
            r(tok)[1]["total"].backward()
            torch.nn.utils.clip_grad_norm_(r.parameters(), 0.5)
            o.step()
            o.zero_grad()
        packed(tok.repeat(2, 1))[1]["total"].sum().backward()
        opt.step(torch.tensor(lrs), 0.5)
        opt.zero_grad()
    for p, r in enumerate(refs):
        for k, v in r.state_dict().items():
            assert torch.allclose(packed.state_dict()[k][p], v, atol=1e-6), k


def test_packed_adamw_views_hold_no_autograd_history():
    """The optimizer's per-slice views of the parameters carry no autograd history: one that did would keep each
    parameter's AccumulateGrad node (made on the stream current at construction) alive into every backward, and on
    the H200 recording the packed step as a CUDA graph (runtime.cuda_graph_scope = step) then failed."""
    packed = pack_models([Transformer(tiny_config().model) for _ in range(2)])
    opt = PackedAdamW(packed, tiny_config().train)
    views = [v for per_param in opt._views for kind in per_param for v in kind]
    assert views and all(v.grad_fn is None and not v.requires_grad for v in views)


def test_pack_key_groups_only_seed_and_lr():
    a = tiny_config(seed=0)
    assert pack_key(a) == pack_key(tiny_config(seed=5, **{"train.lr": 1e-4}))
    assert pack_key(a) != pack_key(tiny_config(**{"model.d_model": 64}))
    assert pack_key(tiny_config(**{"model.oe.n": 2, "model.oe.m": 101, "model.oe.sparse_update": True})) is None
    try:
        check_packable([a, tiny_config(**{"train.max_steps": 7})])
    except ValueError as e:
        assert "cannot share a pack" in str(e)
    else:
        raise AssertionError("configs with different max_steps were packed")


def test_a_diverging_slice_fails_alone(tmp_path):
    cfgs = _configs(tmp_path)
    alone = _alone([cfgs[0], cfgs[2]])
    cfgs[1].train.lr = float("nan")  # slice 1's weights become NaN at the first step
    sinks = [MemorySink() for _ in cfgs]
    summaries = train_pack(cfgs, sinks, tmp_path / "pack", device=torch.device("cpu"))
    assert "TrainingDiverged" in summaries[1]["error"] and "train/loss" not in sinks[1].points
    _assert_same(alone, [sinks[0].points, sinks[2].points])


def test_packed_reference_body_learned_positions_and_gelu(tmp_path):
    """The reference-style body (learned absolute positions, GELU MLP, untied head, embedding init std 1.0, OE summed
    instead of averaged) packs: each slice trains as its run alone."""
    cfgs = _configs(tmp_path, **{"model.pos_encoding": "learned", "model.mlp": "gelu", "model.tie_embeddings": False,
                                 "model.embed_init_std": 1.0, "model.oe.n": 2, "model.oe.m": 401,
                                 "model.oe.combine": "sum"})
    alone = _alone(cfgs)
    sinks = [MemorySink() for _ in cfgs]
    train_pack(cfgs, sinks, tmp_path / "pack", device=torch.device("cpu"))
    _assert_same(alone, [s.points for s in sinks])
