import pytest
import torch

from overtok import accounting
from overtok.model import Transformer
from tests.conftest import tiny_config

VARIANTS = {
    "baseline": {},
    "oe": {"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 97},
    "od": {"model.od_depth": 3},
    "od_lowrank": {"model.od_depth": 2, "model.od_rank": 8},
    "mtp": {"model.od_depth": 2, "model.od_mode": "mtp"},
    "mtp_ds": {"model.od_depth": 3, "model.od_mode": "mtp_ds"},
    "ot": {"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 97, "model.od_depth": 2, "model.od_mode": "mtp_ds"},
    "ngram_tok": {"model.tokenizer_ngram": 3},
    "ngram_out": {"model.output_ngram": 3},
    "untied": {"model.tie_embeddings": False},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_accounting_equals_numel(name):
    cfg = tiny_config(**VARIANTS[name])
    model = Transformer(cfg.model)
    groups = accounting.param_groups(cfg.model)
    assert sum(groups.values()) == sum(p.numel() for p in model.parameters())
    assert groups["oe_tables"] == (model.embed.tables.weight.numel() if hasattr(model.embed, "tables") else 0)
    assert groups["body"] == sum(p.numel() for p in model.blocks.parameters()) + model.norm.weight.numel()
    assert accounting.flops_per_token(cfg.model) > 6 * groups["body"] * 0.9


def test_mfu_is_per_gpu():
    # a data-parallel trial logs its global tokens/s; MFU divides them over its GPUs (2 GPUs at twice the rate of 1
    # are as utilised as the one)
    assert accounting.mfu(2e6, 5e8, gpus=2) == accounting.mfu(1e6, 5e8) == 1e6 * 5e8 / accounting.BF16_PEAK


@pytest.mark.parametrize("name", ["oe", "od", "mtp", "mtp_ds", "ot", "ngram_out", "ngram_tok"])
def test_no_future_leakage(name):
    """Changing token t+1 leaves the main head's logits at positions <= t unchanged."""
    cfg = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    T, L = cfg.model.seq_len, cfg.model.lookahead
    V = cfg.model.input_vocab_size
    x = torch.randint(1, V, (2, T + L))
    t = 10
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 1) % V
    with torch.no_grad():
        lx, losses_x = model(x)
        ly, losses_y = model(y)
    torch.testing.assert_close(lx[:, : t + 1], ly[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(lx[:, t + 1 :], ly[:, t + 1 :])


def test_od_with_zero_lambda_gives_baseline_loss():
    base = tiny_config()
    od = tiny_config(**{"model.od_depth": 3, "model.od_lambda": 0.0})
    torch.manual_seed(0)
    m_base = Transformer(base.model)
    torch.manual_seed(0)
    m_od = Transformer(od.model)
    # same trunk and head weights; the OD model has extra heads on top
    m_od.load_state_dict(m_base.state_dict(), strict=False)
    x = torch.randint(1, base.model.vocab_size, (2, base.model.seq_len + 3))
    _, lb = m_base(x[:, : base.model.seq_len + 1])
    _, lo = m_od(x)
    torch.testing.assert_close(lo["total"], lb["total"])
    assert lo["head2"] > 0 and lo["head3"] > 0


def test_mtp_ds_default_lambda_is_point_one():
    assert tiny_config(**{"model.od_depth": 2, "model.od_mode": "mtp_ds"}).model.extra_head_lambda == 0.1
    assert tiny_config(**{"model.od_depth": 2}).model.extra_head_lambda == 1.0


def test_ngram_output_marginal_is_a_distribution():
    cfg = tiny_config(**VARIANTS["ngram_out"])
    model = Transformer(cfg.model)
    x = torch.randint(1, cfg.model.vocab_size, (2, 8))
    logits, _ = model(x, targets=False)
    assert logits.shape[-1] == cfg.model.vocab_size**3
    marg = model.next_token_logits(logits)
    torch.testing.assert_close(marg.exp().sum(-1), torch.ones(2, 8))


@pytest.mark.parametrize("name", ["baseline", "ot"])
def test_tiny_model_overfits_a_batch(name):
    cfg = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    x = torch.randint(1, cfg.model.vocab_size, (4, cfg.model.seq_len + cfg.model.lookahead))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        _, losses = model(x)
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
    assert losses["next"].item() < 0.1


@pytest.mark.parametrize("sets", [{}, {"model.oe.n": 3, "model.oe.m": 401}, {"model.tokenizer_ngram": 2},
                                  {"model.pos_encoding": "learned", "model.mlp": "gelu", "model.oe.n": 2, "model.oe.m": 401}])
def test_kv_cached_generation_samples_the_same_tokens(sets):
    """The KV cache changes the cost of sampling, not the samples (also past the RoPE table: windowed fallback)."""
    cfg = tiny_config(**{"model.seq_len": 16, **sets})
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    prompt = torch.randint(0, cfg.model.input_vocab_size, (3, 2))
    a = model.generate(prompt, 30, generator=torch.Generator().manual_seed(1), use_cache=True)
    b = model.generate(prompt, 30, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert a.shape == (3, 32) and torch.equal(a, b)


@pytest.mark.parametrize("sets", [{}, {"model.oe.n": 3, "model.oe.m": 401}])
def test_generation_stops_rows_and_drops_them_from_the_batch(sets):
    """Rows stop at their own stop token and are padded; dropping stopped rows (and their caches) from the batch
    keeps cached and windowed sampling identical, also past the context."""
    cfg = tiny_config(**{"model.seq_len": 16, **sets})  # V = 7
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    prompt = torch.randint(1, 7, (40, 2))
    a = model.generate(prompt, 40, stop_id=3, generator=torch.Generator().manual_seed(2), use_cache=True)
    b = model.generate(prompt, 40, stop_id=3, generator=torch.Generator().manual_seed(2), use_cache=False)
    assert torch.equal(a, b)
    new = a[:, 2:]
    stopped = (new == 3).any(1)
    assert stopped.all() and 16 < a.shape[1] < 42  # all stopped early, some after the context (windowed steps)
    for row in new[stopped]:
        first = int((row == 3).nonzero()[0])
        assert (row[first:] == 3).all()


@pytest.mark.parametrize("name", ["baseline", "mtp_ds"])
def test_bf16_residual_stream_applies_under_autocast_only(name):
    """train.residual_dtype: bfloat16 carries the stream between blocks in bf16 under autocast (every block then
    sees bf16 input); without autocast (CPU float32 runs, generation) nothing changes."""
    cfg = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    tokens = torch.randint(0, cfg.model.input_vocab_size, (2, cfg.model.seq_len + cfg.model.lookahead))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype)) for b in model.blocks]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(tokens)[1]["total"].item()
    assert set(seen) == {torch.float32}
    seen.clear()
    model.residual_dtype = torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens)[1]["total"].item()
    assert set(seen) == {torch.bfloat16}
    assert got == pytest.approx(ref, rel=2e-2)
    seen.clear()
    plain = model(tokens)[1]["total"]  # no autocast: float32 throughout
    assert set(seen) == {torch.float32} and plain.dtype == torch.float32
    for h in hooks:
        h.remove()


def test_gpu_memory_estimate_follows_the_measured_peaks():
    """overtok plan's memory on a GPU (bf16 autocast, flash attention, fused loss) against the peaks the H200
    measured for 25M-350M models in benchmarks/results/gpu_trainer_sizes.json, both residual-stream dtypes."""
    import json

    from overtok.accounting import memory_estimate_bytes
    from overtok.config import load_config
    from tests.conftest import ROOT

    rows = json.loads((ROOT / "benchmarks/results/gpu_trainer_sizes.json").read_text())["results"]
    assert len(rows) == 6
    for r in rows:
        cfg = load_config(None, [f"{k}={v}" for k, v in r["config"].items()])
        residual = "bfloat16" if r["residual_dtype"] == "bfloat16" else "float32"
        est = memory_estimate_bytes(cfg.model, r["batch_size"], cuda_bf16=True, residual_dtype=residual) / 2**30
        assert abs(est / r["peak_mem_gib"] - 1) < 0.05, (r["name"], residual, est, r["peak_mem_gib"])


def test_kernel_tests_run_where_triton_is_installed():
    """tests/test_kernels.py skips itself where overtok.kernels cannot run. A dev install on Linux x86_64 has triton
    (pyproject.toml), and tests/conftest.py turns on its CPU interpreter there, so those tests must run, not skip."""
    import importlib.util

    from overtok import kernels

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (not a Linux x86_64 dev install)")
    assert kernels.available(torch.device("cpu")) or torch.cuda.is_available()


def test_reference_style_options_shape_the_model():
    """pos_encoding: learned adds a (positions, d) parameter; mlp: gelu is d -> 4d -> d; embed_init_std and
    oe.table_init_std set the initial spreads; oe.combine: sum skips the 1/(1 + k(n-1)) mean."""
    cfg = tiny_config(**{"model.pos_encoding": "learned", "model.mlp": "gelu", "model.embed_init_std": 1.0,
                         "model.oe.n": 3, "model.oe.m": 401, "model.oe.table_init_std": 0.0,
                         "model.oe.combine": "sum", "model.tie_embeddings": False})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    d = cfg.model.d_model
    assert model.pos.shape == (cfg.model.seq_len + 1, d)
    assert model.blocks[0].mlp.up.weight.shape == (4 * d, d)
    assert 0.9 < float(model.embed.wte.weight.std()) < 1.1
    assert float(model.embed.tables.weight.abs().max()) == 0.0
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    looked = model.embed.lookup(x)
    torch.testing.assert_close(model.embed.mix(*looked), looked[0] + model.embed.proj(looked[1].flatten(-2)))
    rope = Transformer(tiny_config().model)
    assert rope.pos is None and not hasattr(rope.blocks[0].mlp, "up")
