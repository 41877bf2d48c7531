"""CUDA-only checks: the trainers with CUDA graphs (runtime.cuda_graphs) train as without them.

Skipped without a CUDA device (CI here has none); run on the GPU machine with
``python -m pytest tests/test_cuda.py`` (benchmarks/RESULTS.md names the run).
"""

import pytest
import torch

from overtok.tracking import MemorySink
from overtok.train import train, train_pack
from tests.conftest import tiny_config
from tests.sweeplib import sweep_with_and_without_reuse

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def _run(tmp_path, tag, graphs, **sets):
    cfg = tiny_config(**{"runtime.compile": True, "runtime.cuda_graphs": graphs, "train.max_steps": 40,
                         "train.eval_every": 20, "train.log_every": 10, **sets})
    cfg.train.checkpoint_dir = str(tmp_path / f"{tag}-{graphs}")
    sink = MemorySink()
    train(cfg, sink, device=CUDA)
    return sink.points


def _assert_close(a, b, keys=("train/loss", "val/loss")):
    for k in keys:
        assert a[k].keys() == b[k].keys(), k
        for step in a[k]:
            assert abs(a[k][step] - b[k][step]) < 2e-3 * max(1.0, abs(a[k][step])), (k, step, a[k][step], b[k][step])


@pytest.mark.parametrize("tag, sets", [
    ("dense", {}),
    ("grad_accum", {"train.grad_accum": 2}),
    ("oe_sparse_mtp_ds", {"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 2000, "model.oe.sparse_update": True,
                          "model.od_depth": 2, "model.od_mode": "mtp_ds"}),
    ("gen_acc", {"train.gen_samples": 64}),
])
def test_cuda_graphs_train_as_without(tmp_path, tag, sets):
    """torch.compile's graphs (runtime.cuda_graph_scope = compiled) train as without graphs."""
    sets = {"runtime.cuda_graph_scope": "compiled", **sets}
    on, off = _run(tmp_path, tag, True, **sets), _run(tmp_path, tag, False, **sets)
    # gradient accumulation runs without graphs (prepare_model)
    assert set(on["perf/cuda_graphs"].values()) == {float(tag != "grad_accum")}
    assert set(off["perf/cuda_graphs"].values()) == {0.0}
    _assert_close(on, off)
    if "train.gen_samples" in sets:
        assert on["val/gen_acc"].keys() == off["val/gen_acc"].keys()


@pytest.mark.parametrize("tag, sets", [
    ("dense", {}),
    ("oe_dense_mtp_ds_clip", {"model.oe.n": 3, "model.oe.k": 2, "model.oe.m": 2000, "model.od_depth": 2,
                              "model.od_mode": "mtp_ds", "train.grad_clip": 0.05, "train.gen_samples": 64}),
])
def test_whole_step_graph_trains_as_compiled_graphs(tmp_path, tag, sets):
    """runtime.cuda_graph_scope = step (forward, backward, clipping and AdamW replayed as one CUDA graph) gives the
    curves of torch.compile's graphs (scope 'compiled'), including the warm-up steps before recording, a learning
    rate that changes every step (warm-up, cosine), clipping that bites, evaluation and generation in between."""
    step = _run(tmp_path, f"{tag}-step", True, **{"runtime.cuda_graph_scope": "step", **sets})
    compiled = _run(tmp_path, f"{tag}-compiled", True, **{"runtime.cuda_graph_scope": "compiled", **sets})
    assert set(step["perf/step_graph"].values()) == {1.0} and set(compiled["perf/step_graph"].values()) == {0.0}
    _assert_close(step, compiled, ("train/loss", "val/loss", "train/grad_norm"))
    if "train.gen_samples" in sets:
        assert step["val/gen_acc"].keys() == compiled["val/gen_acc"].keys()


def test_whole_step_graph_resumes_and_falls_back(tmp_path):
    """A step-graph run stopped at step 25 resumes from its step-20 checkpoint (warm-up and recording again) to the
    curve of the uninterrupted run; row-sparse tables, which update outside autograd, run without a step graph."""
    sets = {"runtime.cuda_graph_scope": "step", "train.checkpoint_every": 20}
    full = _run(tmp_path, "full", True, **sets)
    with pytest.raises(RuntimeError, match="fail_at_step"):
        _run(tmp_path, "broken", True, **sets, **{"runtime.fail_at_step": 25})
    resumed = _run(tmp_path, "broken", True, **sets)
    _assert_close(resumed, full)
    sparse = _run(tmp_path, "sparse", True, **sets, **{"model.oe.n": 2, "model.oe.k": 2, "model.oe.m": 2000,
                                                        "model.oe.sparse_update": True})
    assert set(sparse["perf/step_graph"].values()) == {0.0} and set(sparse["perf/cuda_graphs"].values()) == {1.0}


def test_packed_cuda_graphs_train_as_without(tmp_path):
    """Packed trials with torch.compile's graphs, and with the whole step as one graph, train as without graphs."""
    curves = {}
    for variant, graphs, scope in (("compiled", True, "compiled"), ("step", True, "step"), ("off", False, "compiled")):
        cfgs = []
        for i, (seed, lr) in enumerate([(0, 3e-3), (1, 1e-3)]):
            c = tiny_config(seed=seed, **{"train.lr": lr, "runtime.compile": True, "runtime.cuda_graphs": graphs,
                                          "runtime.cuda_graph_scope": scope, "train.max_steps": 40,
                                          "train.eval_every": 20, "train.log_every": 10, "train.grad_clip": 0.05})
            c.train.checkpoint_dir = str(tmp_path / f"alone{i}")
            cfgs.append(c)
        sinks = [MemorySink() for _ in cfgs]
        train_pack(cfgs, sinks, tmp_path / f"pack-{variant}", device=CUDA)
        curves[variant] = [s.points for s in sinks]
    for compiled, step, off in zip(curves["compiled"], curves["step"], curves["off"]):
        assert set(compiled["perf/cuda_graphs"].values()) == {1.0} and set(compiled["perf/step_graph"].values()) == {0.0}
        assert set(step["perf/step_graph"].values()) == {1.0}
        _assert_close(compiled, off)
        _assert_close(step, off, ("train/loss", "val/loss", "train/grad_norm"))


REUSE_SWEEP = """
name: reuse
base:
  model: {n_layers: 2, n_heads: 2, seq_len: 32}
  data: {batch_size: 4}
  train: {max_steps: 40, eval_every: 20, log_every: 10, checkpoint_every: 20, gen_samples: 16}
  runtime: {compile: true}
grid:
  model.d_model: [64, 48, 32]
resources: {cpu: 1, gpu: 1}
max_concurrent: 1
reuse_processes: %s
"""


def test_reused_process_runs_compiled_trials_with_cuda_graphs(tmp_path):
    """Through `overtok sweep`: three compiled trials of different shapes, with CUDA graphs, one after another in
    one reused process train as with a process each (the trial thread keeps CUDA graph trees' per-thread state;
    each trial starts from released compile caches)."""
    runs = sweep_with_and_without_reuse(tmp_path, REUSE_SWEEP, "reuse", 3, ("train/loss", "val/loss", "val/gen_acc"))
    assert all(r.data.metrics["perf/cuda_graphs"] == 1.0 for rs in runs.values() for r, _ in rs)
    assert len({r.data.tags["overtok.pid"] for r, _ in runs["true"]}) == 1
    assert len({r.data.tags["overtok.pid"] for r, _ in runs["false"]}) == 3
    off = {r.data.params["model.d_model"]: c for r, c in runs["false"]}
    for r, on in runs["true"]:
        alone = off[r.data.params["model.d_model"]]
        _assert_close(on, alone)
        assert on["val/gen_acc"].keys() == alone["val/gen_acc"].keys()
    # Peaks (perf/mem_gb) are not compared: a reused trial peaked 58 MiB higher than alone whenever the trials before
    # it in the process had compiled cold, although nothing stays allocated between trials (bench_reuse.py); see
    # benchmarks/RESULTS.md, section 3.


def test_swiglu_kernel_on_cuda(tmp_path):
    """overtok.kernels.swiglu against torch at a 124M model's MLP width in bf16, then the trainer with
    runtime.mlp_kernel triton vs torch (compiled, the whole step as one CUDA graph)."""
    import torch.nn.functional as F

    from overtok import kernels

    torch.manual_seed(0)
    gu = (torch.randn(4096, 2 * 2048, device=CUDA) * 3).bfloat16().requires_grad_()
    dout = torch.randn(4096, 2048, device=CUDA).bfloat16()
    out = kernels.swiglu(gu)
    (gd,) = torch.autograd.grad(out, gu, dout)
    gate, up = gu.float().chunk(2, -1)
    ref = F.silu(gate) * up
    (rd,) = torch.autograd.grad(ref, gu, dout.float())
    torch.testing.assert_close(out, ref.bfloat16(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gd, rd.bfloat16(), rtol=1e-2, atol=1e-2)
    _assert_trainer_follows_torch(tmp_path, "runtime.mlp_kernel", "perf/mlp_kernel")


def _assert_trainer_follows_torch(tmp_path, field, flag):
    """The trainer (compiled, the whole step as one CUDA graph) with a kernel field triton vs torch: the same curves,
    and each run's perf flag says which ran."""
    runs = {k: _run(tmp_path, f"{field}_{k}", True, **{field: k}) for k in ("torch", "triton")}
    assert set(runs["triton"][flag].values()) == {1.0}
    assert set(runs["torch"][flag].values()) == {0.0}
    assert set(runs["triton"]["perf/step_graph"].values()) == {1.0}
    _assert_close(runs["torch"], runs["triton"])


def test_rope_kernel_on_cuda(tmp_path):
    """overtok.kernels.rope_qkv against apply_rope at a 124M model's attention shape in bf16 (values and d(qkv)),
    then the trainer with runtime.rope_kernel triton vs torch (compiled, the whole step
    as one CUDA graph)."""
    from overtok import kernels
    from overtok.model import apply_rope, rope_tables

    torch.manual_seed(0)
    B, T, H, hd = 4, 1024, 12, 64
    cos, sin = (x.to(CUDA) for x in rope_tables(T + 1, hd, 10_000.0))
    qkv = torch.randn(B, T, 3 * H * hd, device=CUDA).bfloat16().requires_grad_()
    got = kernels.rope_qkv(qkv, cos, sin, H)
    ref_in = qkv.detach().float().requires_grad_()
    q, k, v = ref_in.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    cs = [x.bfloat16().float() for x in (cos, sin)]
    ref = (apply_rope(q, *cs), apply_rope(k, *cs), v)
    grads = [torch.randn(B, H, T, hd, device=CUDA).bfloat16() for _ in range(3)]
    (gq,) = torch.autograd.grad(got, qkv, grads)
    (rq,) = torch.autograd.grad(ref, ref_in, [g.float() for g in grads])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.bfloat16(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gq, rq.bfloat16(), rtol=1e-2, atol=1e-2)
    _assert_trainer_follows_torch(tmp_path, "runtime.rope_kernel", "perf/rope_kernel")
