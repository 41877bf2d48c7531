"""The fused head + cross-entropy kernel (overtok.kernels) against the stock loss, on the CPU under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1): losses and gradients, in a model, compiled, packed, and
through the trainer."""

import pytest
import torch
import torch.nn.functional as F

from overtok import kernels
from overtok.engine import use_kernel
from overtok.model import Transformer
from overtok.packed import pack_models
from overtok.tracking import MemorySink
from overtok.train import train, train_pack
from tests.conftest import tiny_config
from tests.test_packed import _assert_same, _configs

pytestmark = pytest.mark.skipif(not kernels.available(torch.device("cpu")), reason="needs triton (interpreter)")
CPU = torch.device("cpu")


@pytest.mark.parametrize("P,N,d,V", [(1, 12, 8, 37), (3, 5, 16, 1000), (2, 7, 8, 5000), (2, 6, 8, 128)])
def test_loss_and_gradients_equal_the_stock_loss(P, N, d, V):
    torch.manual_seed(P * V)
    h = torch.randn(P, N, d, requires_grad=True)
    w = torch.randn(P, V, d, requires_grad=True)
    t = torch.randint(0, V, (P, N))
    t[0, 0] = V - 1  # the last class (the kernel's final, masked block)
    g = torch.randn(P)  # an upstream gradient per slice, as lambda-weighted extra heads give
    loss = kernels.linear_cross_entropy(h, w, t)
    (loss * g).sum().backward()
    got = loss.detach(), h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.stack([F.cross_entropy(h[p] @ w[p].T, t[p]) for p in range(P)])
    (ref * g).sum().backward()
    for a, b in zip(got, (ref.detach(), h.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_without_grad():
    h, w, t = torch.randn(1, 4, 8), torch.randn(1, 50, 8), torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h.requires_grad_(), w, t)
    torch.testing.assert_close(loss, F.cross_entropy(h[0] @ w[0].T, t[0])[None])
    assert not loss.requires_grad


def _model_and_batch(extra: dict):
    cfg = tiny_config(**extra)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    return cfg, model, torch.randint(0, cfg.model.input_vocab_size, (3, cfg.model.seq_len + cfg.model.lookahead))


def _assert_grads_close(ref, got):
    """``_grads`` results (losses, parameter gradients) of the same model and batch, two ways."""
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    _, losses = model(x)
    losses["total"].sum().backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("extra", [{}, {"model.od_depth": 3, "model.od_mode": "mtp_ds", "model.oe.n": 2, "model.oe.m": 61},
                                   {"model.tie_embeddings": True, "model.od_depth": 2}])
def test_model_with_fused_loss_equals_stock_loss(extra):
    cfg, model, x = _model_and_batch(extra)
    stock = _grads(model, x)
    model.fused_loss = True
    logits, _ = model(x)
    assert logits is None  # the fused path never hands the logits out
    fused = _grads(model, x)
    _assert_grads_close(stock, fused)
    # inference still returns logits
    assert model(x[:, : cfg.model.seq_len], targets=False)[0].shape[-1] == cfg.model.output_vocab_size


@pytest.mark.parametrize("kernel", ["loss", "mlp", "rope"])
def test_compiled_and_packed_models_with_kernels(kernel):
    cfg = tiny_config()
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(Transformer(cfg.model))
    x = torch.randint(0, cfg.model.input_vocab_size, (4, cfg.model.seq_len + cfg.model.lookahead))
    packed = pack_models(models)
    stock = _grads(packed, x)
    if kernel == "loss":
        packed.fused_loss = True
    elif kernel == "mlp":
        packed.set_mlp_kernel(True)
    else:
        packed.set_rope_kernel(True)
    packed.body_and_loss = torch.compile(packed.body_and_loss, backend="aot_eager", fullgraph=True)
    fused = _grads(packed, x)
    assert fused[0]["total"].shape == (2,)
    _assert_grads_close(stock, fused)


KERNEL_FIELDS = [("runtime.loss_kernel", "perf/fused_loss"), ("runtime.mlp_kernel", "perf/mlp_kernel"),
                 ("runtime.rope_kernel", "perf/rope_kernel")]


@pytest.mark.parametrize("field,flag", KERNEL_FIELDS)
def test_trainer_with_kernel_follows_torch(tmp_path, field, flag):
    curves = {}
    for kernel in ("torch", "triton"):
        cfg = tiny_config(**{"train.max_steps": 8, "train.eval_every": 4, "train.log_every": 2, field: kernel})
        cfg.train.checkpoint_dir = str(tmp_path / kernel)
        sink = MemorySink()
        train(cfg, sink, device=CPU)
        curves[kernel] = sink.points
    _assert_same([curves["torch"]], [curves["triton"]])
    # every run records which kernel it used
    assert set(curves["torch"][flag].values()) == {0.0}
    assert set(curves["triton"][flag].values()) == {1.0}


@pytest.mark.parametrize("field,flag", KERNEL_FIELDS)
def test_packed_trainer_with_kernel(tmp_path, field, flag):
    cfgs = _configs(tmp_path, **{"train.max_steps": 6, "train.eval_every": 3})
    runs = {}
    for kernel in ("torch", "triton"):
        for c in cfgs:
            setattr(c.runtime, field.split(".")[1], kernel)
        runs[kernel] = [MemorySink() for _ in cfgs]
        train_pack(cfgs, runs[kernel], tmp_path / kernel, device=CPU)
    _assert_same([s.points for s in runs["torch"]], [s.points for s in runs["triton"]])
    assert {v for s in runs["triton"] for v in s.points[flag].values()} == {1.0}


@pytest.mark.parametrize("field", [f for f, _ in KERNEL_FIELDS])
def test_kernel_resolution_and_trial_id(monkeypatch, field):
    from overtok.sweep import trial_id

    # the same values up to float rounding: not part of the trial id
    assert trial_id(tiny_config(**{field: "torch"})) == trial_id(tiny_config())
    assert use_kernel("triton", CPU, field) and not use_kernel("auto", CPU, field)
    assert not use_kernel("torch", CPU, field)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=f"{field}=triton"):
        use_kernel("triton", CPU, field)


# SwiGLU's pointwise part (overtok.kernels.swiglu, runtime.mlp_kernel)


@pytest.mark.parametrize("shape,dtype", [((3, 5, 2 * 7), torch.float32), ((2, 3, 2 * 1500), torch.float32),
                                         ((4, 2 * 96), torch.bfloat16)])
def test_swiglu_kernel_equals_torch(shape, dtype):
    torch.manual_seed(shape[-1])
    gu = (torch.randn(shape) * 3).to(dtype).requires_grad_()  # wide enough that silu's both regimes are hit
    dout = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
    out = kernels.swiglu(gu)
    (gd,) = torch.autograd.grad(out, gu, dout)
    gate, up = gu.float().chunk(2, -1)  # the reference in fp32, rounded once, as the kernel computes
    ref = F.silu(gate) * up
    (rd,) = torch.autograd.grad(ref, gu, dout.float())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert out.dtype == gd.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), **tol)
    torch.testing.assert_close(gd, rd.to(dtype), **tol)


def test_swiglu_kernel_rejects_an_odd_width():
    with pytest.raises(ValueError, match="must be even"):
        kernels.swiglu(torch.randn(2, 7))


# (the modules each kernel serves: SwiGLU has gate_up, Attention has qkv; trunk and extra heads alike)
MODULE_KERNELS = {"mlp": ("set_mlp_kernel", "gate_up"), "rope": ("set_rope_kernel", "qkv")}


@pytest.mark.parametrize("kind", list(MODULE_KERNELS))
@pytest.mark.parametrize("extra", [{}, {"model.od_depth": 2, "model.od_mode": "mtp"},
                                   {"model.od_depth": 3, "model.od_mode": "mtp_ds", "model.oe.n": 2, "model.oe.m": 61}])
def test_model_with_module_kernel_equals_torch(kind, extra):
    _, model, x = _model_and_batch(extra)
    ref = _grads(model, x)
    setter, attr = MODULE_KERNELS[kind]
    getattr(model, setter)(True)
    assert all(m.kernel for m in model.modules() if hasattr(m, attr))
    got = _grads(model, x)
    _assert_grads_close(ref, got)


# RoPE of queries and keys over the qkv projection (overtok.kernels.rope_qkv, runtime.rope_kernel)


@pytest.mark.parametrize("B,T,H,hd,dtype,tokens", [(2, 5, 3, 8, torch.float32, 64), (1, 7, 2, 6, torch.float32, 64),
                                                   (2, 9, 4, 16, torch.bfloat16, 64), (2, 9, 3, 8, torch.float32, 4)])
def test_rope_kernel_equals_torch(monkeypatch, B, T, H, hd, dtype, tokens):
    """(tokens: per program; 4 leaves 18 tokens in 5 programs, the last one part-masked)"""
    from overtok.model import apply_rope, rope_tables

    monkeypatch.setattr(kernels, "ROPE_TOKENS_INTERPRETED", tokens)
    torch.manual_seed(T * H)
    cos, sin = rope_tables(T + 3, hd, 10_000.0)  # longer tables than the sequence, as a model's with lookahead
    qkv = torch.randn(B, T, 3 * H * hd).to(dtype).requires_grad_()
    got = kernels.rope_qkv(qkv, cos, sin, H)
    assert all(x.shape == (B, H, T, hd) and x.dtype == dtype for x in got)
    assert got[0].transpose(1, 2).is_contiguous()  # (B, T, H, hd) memory
    # the reference in fp32 with cos and sin rounded to the activations' dtype (as apply_rope), rounded once
    ref_in = qkv.detach().float().requires_grad_()
    q, k, v = ref_in.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    cs = [x.to(dtype).float() for x in (cos, sin)]
    ref = (apply_rope(q, *cs), apply_rope(k, *cs), v)
    grads = [torch.randn(B, H, T, hd).to(dtype) for _ in range(3)]
    grads[1] = grads[1].transpose(2, 3).contiguous().transpose(2, 3)  # a gradient with a last stride other than 1
    (gq,) = torch.autograd.grad(got, qkv, grads)
    (rq,) = torch.autograd.grad(ref, ref_in, [g.float() for g in grads])
    # (bf16: Triton's interpreter may round fp32 -> bf16 differently from torch, by an ulp or two at the extremes)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 4e-2}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.to(dtype), **tol)
    assert gq.dtype == dtype
    torch.testing.assert_close(gq, rq.to(dtype), **tol)


def test_rope_kernel_rejects_odd_heads():
    with pytest.raises(ValueError, match="even head size"):
        kernels.rope_qkv(torch.randn(1, 2, 3 * 2 * 5), torch.ones(2, 3), torch.ones(2, 3), 2)


def test_cached_generation_keeps_torch_rope():
    """The kernel rotates positions 0..T-1 only; cached generation takes torch's path: the same samples either way."""
    _, model, x = _model_and_batch({})
    samples = []
    for on in (True, False):
        model.set_rope_kernel(on)
        with torch.no_grad():
            samples.append(model.generate(x[:2, :5], 6, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)
