"""The GPU benchmark script runs end to end in its CPU smoke mode (device time is scarce: a broken script should
fail here, not on the GPU machine), and its rows carry what RESULTS.md reads from them."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED


def test_bench_gpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--only", "trainer", "oe", "packed",
                          "--variants", "no-kernels", "bf16res", "--rounds", "2", "--packed-variants", "trainer",
                          "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert not [r for r in rows if "error" in r]

    # every row is the engine's step under the variant's config, and says what took effect
    trainer = [r for r in rows if r["name"] == "baseline tiny"]
    assert [r["runtime"]["loss_kernel"] for r in trainer] == ["torch", "auto"]
    assert trainer[1]["config"]["train.residual_dtype"] == "bfloat16"
    assert all(r["step_ms"] > 0 and r["step_ms_back_to_back"] > 0 and r["host_issue_ms"] > 0 for r in trainer)
    assert all(r["perf/cuda_graphs"] == 0.0 and r["perf/step_graph"] == 0.0 for r in trainer)  # no CUDA here
    assert trainer[0]["first_loss"] == trainer[1]["first_loss"]  # no autocast on the CPU: bf16res changes nothing

    oe = [r for r in rows if r["name"].startswith("OE-")]
    assert [r.get("row_update") for r in oe] == [None, "eager"]  # the row update is compiled on CUDA only
    assert [r["optimizer"] for r in oe] == ["adamw", "adamw+oe_row_adam"]
    for r in oe:  # interleaved rounds: a ratio per round, per-step and back to back
        assert len(r["round_ratios"]) == 2 and len(r["round_ratios_back_to_back"]) == 2
        assert r["ratio_vs_no_oe"] > 0 and r["ratio_vs_no_oe_back_to_back"] > 0

    packed = [r for r in rows if r["name"].startswith("8 packed")]
    assert len(packed) == 1 and packed[0]["pack"] == 8 and packed[0]["vs_one_model"] > 0
    assert packed[0]["optimizer"] == "packed_adamw" and len(packed[0]["first_losses"]) == 8
    singles = [r for r in rows if r["name"].startswith("one tiny model")]
    assert len(singles) == 1 and 0 < singles[0]["last_step_loss"] < 20


def test_bench_ddp_smoke_times_every_variant_on_every_rank(tmp_path):
    """2 gloo ranks on the CPU: the trainer's model under its DDP wrapper, no-sync and synced, plus extra settings."""
    out = tmp_path / "ddp.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_ddp.py", "--smoke", "--grad-dtypes", "bfloat16",
                          "--bucket-mb", "1", "--grad-accum", "2", "--oe-m", "1001", "--oe-sparse", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == ["1 process", "2 processes, no sync", "2 processes",
                                         "2 processes, bfloat16 gradients", "2 processes, 1 MiB buckets",
                                         "1 process, grad_accum 2", "2 processes, grad_accum 2",
                                         "1 process, OE table whole (sparse bf16)",
                                         "2 processes, OE table row-sharded (sparse bf16)"]
    assert [r["train"] for r in rows[3:5]] == [{"grad_reduce_dtype": "bfloat16"}, {"ddp_bucket_mb": 1.0}]
    for r in rows:  # every variant timed in every round (2 with --smoke), on each of its ranks
        assert [k["rank"] for k in r["ranks"]] == list(range(r["world"]))
        assert all(len(k["step_ms_blocks"]) == 2 and min(k["step_ms_blocks"]) > 0 for k in r["ranks"])
        assert 0 < r["step_ms_best"] <= max(max(k["step_ms_blocks"]) for k in r["ranks"])
        if r["world"] > 1:
            assert r["vs_1_process"] > 0 and r["vs_1_process_best_blocks"] > 0
    by_name = {r["name"]: r for r in rows}  # a step of 2 micro-batches counts both
    assert by_name["1 process, grad_accum 2"]["tokens_per_s"] == pytest.approx(
        2 * 2 * 32 / (by_name["1 process, grad_accum 2"]["step_ms"] / 1000))


def test_bench_eval_smoke_times_eager_and_compiled_evaluation(tmp_path):
    out = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_eval.py", "--smoke", "--cases", "tiny", "packed",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["name"], r["models"]) for r in rows] == [("tiny", 1), ("packed", 8)]
    for r in rows:
        assert r["eager_ms_per_batch"] > 0 and r["compiled_ms_per_batch"] > 0 and r["first_compiled_eval_s"] > 0
        assert len(r["loss_eager"]) == r["models"]  # one loss per packed slice
        assert r["loss_eager"] == pytest.approx(r["loss_compiled"], abs=1e-4)


def test_kernel_overlap_splits_communication_into_hidden_and_exposed():
    from benchmarks.common import overlap_ms

    # NCCL 0-12 us and 30-40 us; compute 0-3, 8-35, 50-60: 12 us of the 22 run beside compute, 40-50 nothing runs
    got = overlap_ms([(0, 10), (5, 12), (30, 40)], [(0, 3), (8, 35), (50, 60)], n_steps=1)
    assert got == pytest.approx({"span": 0.060, "compute_busy": 0.040, "comm_busy": 0.022, "comm_hidden": 0.012,
                                 "comm_exposed": 0.010, "idle": 0.010})


def test_bench_eval_row_where_eager_was_not_slower():
    """On a busy CPU the eager validation can beat the compiled one: compiling never pays, and the row says so."""
    from benchmarks.bench_eval import format_row

    row = {"name": "tiny", "eager_ms_per_batch": 4.0, "compiled_ms_per_batch": 5.0, "first_compiled_eval_s": 3.0,
           "first_compiled_eval_warm_cache_s": 0.5, "break_even_batches": None, "break_even_batches_warm_cache": None,
           "loss_eager": [6.2298], "loss_compiled": [6.2298]}
    assert format_row(row).split()[-5:-3] == ["never", "never"]
    assert "2,456" in format_row({**row, "break_even_batches": 2456.2, "break_even_batches_warm_cache": 340.0})


def test_bench_reuse_smoke_finds_nothing_left_after_a_trial(tmp_path):
    """Two trials in one process, as a reused worker runs them: after each trial's release no tensor of it is
    still alive (a reference kept anywhere would show here)."""
    out = tmp_path / "reuse.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_reuse.py", "--smoke", "--d-models", "48", "32",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["trial"], r["d_model"]) for r in rows] == [(1, 48), (2, 32)]
    assert all(r["cuda_graphs"] == 0.0 and r["step_graph"] == 0.0 for r in rows)  # recorded; none on the CPU
    for r in rows:
        assert r["after_release"]["live_tensors"] == 0 and r["after_release"]["largest"] == []


def test_bench_data_times_both_cfg_samplers(tmp_path):
    out = tmp_path / "data.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--seconds", "0.2", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["sampler"], r["streams"]) for r in rows] == [("block", 1), ("sentence", 1), ("block", 8), ("sentence", 8)]
    assert all(r["steps"] > 0 and r["tokens_per_s"] > 0 and r["row_len"] == 513 for r in rows)


def test_probe_trainer_host_reports_its_three_timings(tmp_path):
    cfg = json.loads((ROOT / "benchmarks" / "configs" / "cfg_tiny.json").read_text())
    cfg["model"] = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32}
    cfg["data"]["batch_size"] = 2
    cfg["train"].update(log_every=300, eval_every=600, eval_batches=1)
    cfg["runtime"]["compile"] = False
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_trainer_host.py"), str(tmp_path / "cfg.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    probe = [line for line in res.stdout.splitlines() if line.startswith("PROBE")]
    assert [line.rsplit(" ", 2)[0] for line in probe] == [
        "PROBE wall per step under the profiler:", "PROBE wall per step, no profiler:",
        "PROBE host time in accumulate (fwd+bwd issue), median"]
    assert all(float(line.rsplit(" ", 2)[1]) > 0 for line in probe)


def test_bench_step_graph_runs_both_scopes_through_both_trainers(tmp_path):
    """CPU smoke: each scope's run of one trial and of a pack, with the trainers' own numbers; no step graph here."""
    out = tmp_path / "step_graph.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_step_graph.py", "--smoke", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["pack"], r["scope"]) for r in rows] == [(1, "compiled"), (1, "step"), (2, "compiled"), (2, "step")]
    assert all(r["steady_tokens_per_s"] > 0 and len(r["intervals_tokens_per_s"]) == 2 for r in rows)
    assert all(r["step_graph"] == 0.0 and 0 < r["last_train_loss"] < 20 for r in rows)
    assert rows[0]["last_train_loss"] == rows[1]["last_train_loss"]  # the scope changes nothing on the CPU


def test_bench_step_graph_on_text(tmp_path):
    """CPU smoke with --corpus/--tokenizer: the tiny model on text tokenized by the bench itself (vocabulary from
    the tokenizer); one trial only."""
    out = tmp_path / "step_graph_text.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_step_graph.py", "--smoke", "--packs", "1", "--out", str(out),
                          "--corpus", str(SHARED / "text" / "austen.txt.xz"), "--max-docs", "40",
                          "--tokenizer", str(SHARED / "tokenizers" / "gpt-neox-olmo.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["pack"], r["scope"]) for r in rows] == [(1, "compiled"), (1, "step")]
    assert all(r["config"]["data"]["kind"] == "text" and 8 < r["last_train_loss"] < 12 for r in rows)
