"""Sweep files: every shipped one expands; malformed ones exit 2 before Ray or MLflow start."""

import os

import pytest

from overtok.sweep import load_sweep, plan_table, trial_id, trial_plan
from tests.conftest import ROOT, SHARED, tiny_config

SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_all_required_sweeps_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "quickstart_text", "cfg_paper", "vocab_scaling", "ot_grid"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweep_expands(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # corpus paths like ../shared/data/text are relative to the project root
    sweep = load_sweep(path)
    assert sweep.name == path.stem and sweep.trials  # (a measurement, e.g. cfg_curve, may be one trial)
    assert len({t.trial_id for t in sweep.trials}) == len(sweep.trials)
    table = plan_table(sweep)
    assert all(t.trial_id in table for t in sweep.trials) and "training FLOPs" in table


def test_speedup_code_shares_its_baselines_with_loglinear_code(monkeypatch):
    monkeypatch.chdir(ROOT)
    # part 3 of the campaign reuses part 1's baseline trials (results/REPRODUCTION.md): the same ids
    loglinear = {t.trial_id for t in load_sweep(ROOT / "sweeps" / "loglinear_code.yaml").trials}
    speedup = load_sweep(ROOT / "sweeps" / "speedup_code.yaml").trials
    assert {t.trial_id for t in speedup if t.config.model.oe.n == 1} <= loglinear


def test_cfg_paper_tok3_reruns_cells_of_cfg_paper():
    # the rerun's results stand in for those cells of cfg_paper (results/REPRODUCTION.md): the same trials
    paper = {t.trial_id: t for t in load_sweep(ROOT / "sweeps" / "cfg_paper.yaml").trials}
    rerun = load_sweep(ROOT / "sweeps" / "cfg_paper_tok3.yaml").trials
    assert len(rerun) == 2 and all(t.trial_id in paper for t in rerun)
    assert {t.config.model.tokenizer_ngram for t in rerun} == {3} and {t.config.model.d_model for t in rerun} == {128, 768}


def test_plan_counts_a_row_sharded_table_per_worker():
    sweep = load_sweep(ROOT / "sweeps" / "oe_sharded.yaml")
    oe = next(t for t in sweep.trials if t.config.model.oe.n == 3)
    whole, split = (trial_plan(oe, on_gpu=True, workers=w) for w in (1, 2))
    half_table_gib = 3 * 2 * split["N_oe_tables"] / 2 / 2**30  # bf16 rows and two moments, half on each worker
    assert abs((whole["memory_gb"] - split["memory_gb"]) - half_table_gib) < 0.01, (whole, split)
    assert split["tokens"] == 2 * whole["tokens"] == 2 * 300 * 16 * 1024  # every worker draws its own batches
    base = next(t for t in sweep.trials if t.config.model.oe.n == 1)
    assert trial_plan(base, on_gpu=True, workers=2)["memory_gb"] == trial_plan(base, on_gpu=True)["memory_gb"]
    table = plan_table(sweep)  # checkpoints off (checkpoint_every > max_steps, no final one): none on disk
    assert "peak memory per worker up to" in table and "checkpoints 0.0 GiB on disk" in table, table


def test_quickstart_shape():
    sweep = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    assert len(sweep.trials) == 12
    assert {t.config.model.oe.n for t in sweep.trials} == {1, 2, 3}
    assert {t.config.model.od_depth for t in sweep.trials} == {1, 2}
    assert {t.config.model.d_model for t in sweep.trials} == {32, 64}


def test_trial_ids_are_stable_and_ignore_paths(tmp_path):
    a = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    b = load_sweep(ROOT / "sweeps" / "quickstart.yaml", ["ray.storage_path=/elsewhere"])
    assert [t.trial_id for t in a.trials] == [t.trial_id for t in b.trials]
    c = load_sweep(ROOT / "sweeps" / "quickstart.yaml", ["base.train.lr=1e-3"])
    assert not {t.trial_id for t in a.trials} & {t.trial_id for t in c.trials}


def test_fields_added_later_keep_existing_trial_ids():
    # the quickstart's first ids since the runtime section left the id (the one change of every id, README): a new
    # config field must not change them while it holds the value that reproduces the old behaviour
    # (overtok.identity.ADDED_FIELDS). The CFG sampler's default changed (a new stream): trials set to the sentence
    # sampler keep the ids they had before the block sampler existed. (The quickstart then sampled 32 sentences for generation accuracy.)
    before = ["bce360f6ecfd", "1a1dc0d2a30f", "4307191cdefb"]
    old = ["base.data.cfg_sampler=sentence", "base.train.gen_samples=32"]
    a = load_sweep(ROOT / "sweeps" / "quickstart.yaml", old)
    assert [t.trial_id for t in a.trials[:3]] == before
    block = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    assert not {t.trial_id for t in a.trials} & {t.trial_id for t in block.trials}
    b = load_sweep(ROOT / "sweeps" / "quickstart.yaml", [*old, "base.train.residual_dtype=float32"])
    assert [t.trial_id for t in b.trials[:3]] == before
    runtime = ["cuda_graphs=false", "cuda_graph_scope=compiled", "ddp_bucket_mb=100", "compile=true", "device=cpu",
               "fail_at_step=3", "loss_kernel=torch", "mlp_kernel=triton", "rope_kernel=torch", "compile_eval=always"]
    g = load_sweep(ROOT / "sweeps" / "quickstart.yaml", [*old, *(f"base.runtime.{r}" for r in runtime)])
    assert [t.trial_id for t in g.trials[:3]] == before  # the runtime section is not part of the id
    c = load_sweep(ROOT / "sweeps" / "quickstart.yaml", [*old, "base.train.residual_dtype=bfloat16"])
    assert not {t.trial_id for t in a.trials} & {t.trial_id for t in c.trials}
    d = load_sweep(ROOT / "sweeps" / "quickstart.yaml", [*old, "base.train.grad_reduce_dtype=float32"])
    assert [t.trial_id for t in d.trials[:3]] == before
    e = load_sweep(ROOT / "sweeps" / "quickstart.yaml", [*old, "base.train.grad_reduce_dtype=bfloat16"])
    assert not {t.trial_id for t in a.trials} & {t.trial_id for t in e.trials}


def test_cfg_sampler_is_not_part_of_a_text_trial_id_nor_pack():
    from overtok.config import load_config
    from overtok.identity import pack_key

    text = ["data.kind=text", "data.path=/data/prepared", "model.vocab_size=100"]
    for key in (trial_id, pack_key):
        assert key(load_config(None, [*text, "data.cfg_sampler=sentence"])) == key(load_config(None, text))
        assert key(tiny_config(**{"data.cfg_sampler": "sentence"})) != key(tiny_config())


BASE = "name: bad\nbase:\n  model: {d_model: 32, n_heads: 2, seq_len: 16}\n  train: {max_steps: 2}\n"
def test_oversized_grid_needs_yes(cli, tmp_path):
    (tmp_path / "big.yaml").write_text(BASE + "max_trials: 3\ngrid:\n  train.lr: [1e-3, 2e-3, 3e-3, 4e-3]\n")
    res = cli("sweep", "big.yaml")
    assert res.returncode == 2 and "exceed max_trials=3" in res.stderr and "--yes" in res.stderr
    assert not (tmp_path / "results").exists()


def test_checkpoints_larger_than_the_free_disk_are_refused(cli, tmp_path):
    """A sweep whose checkpoints (OE tables + 2 Adam moments, 2 kept per trial) exceed the free disk exits 2 before
    anything starts; --yes overrides. (A GPU machine was once lost to exactly this.)"""
    (tmp_path / "huge.yaml").write_text("""
name: huge
base:
  model: {d_model: 64, n_layers: 1, n_heads: 2, seq_len: 16, oe: {n: 2, k: 1, m: 400000000001}}
  train: {max_steps: 10, checkpoint_every: 5}
seeds: [0, 1]
""")
    res = cli("sweep", "huge.yaml")
    assert res.returncode == 2 and "huge.yaml" in res.stderr and "base.train.checkpoint_every" in res.stderr
    assert "GiB free" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "results" / "mlflow.db").exists()
    ok = cli("plan", "huge.yaml")
    assert ok.returncode == 0  # planning is always allowed


def test_the_sweep_driver_does_not_import_torch(tmp_path):
    """The driver validates, plans, packs and tracks; only trials import torch (seconds per sweep otherwise)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from overtok.sweep import load_sweep, plan_table, trial_plan\n"
        "from overtok.tune import SweepTracker, resolve_tracking_uri\n"
        f"s = load_sweep({str(ROOT / 'sweeps' / 'quickstart.yaml')!r}, ['pack=4'])\n"
        "assert s.packs() and plan_table(s)\n"
        f"SweepTracker(s, resolve_tracking_uri('sqlite:///{tmp_path}/mlflow.db'))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_plan_and_train_note_generation_that_cannot_fit_the_context(cli):
    """Runs whose CFG samples mostly cannot fit the context get a one-line note (once per sweep) from `overtok plan`,
    `overtok sweep` and `overtok train`; they still run."""
    quick = ROOT / "sweeps" / "quickstart.yaml"
    short = load_sweep(quick, ["base.train.gen_samples=8"])  # seq_len 64
    assert len(short.notes()) == 1 and "0% of cfg3f's sentences fit the context (model.seq_len 64;" in short.notes()[0]
    assert plan_table(short).endswith("\nnote: " + short.notes()[0])
    assert load_sweep(quick).notes() == []  # the quickstart samples none
    assert load_sweep(quick, ["base.train.gen_samples=8", "base.model.seq_len=512"]).notes() == []
    assert load_sweep(ROOT / "sweeps" / "cfg_paper_tok3.yaml").notes() == []  # 171 3-gram tokens = 513
    res = cli("train", "--dry-run", "--set", "model.seq_len=40", "--set", "model.tokenizer_ngram=3")
    assert res.returncode == 0 and "(model.seq_len 40 x 3-gram tokens;" in res.stdout.splitlines()[-1]
    res = cli("train", "--dry-run", "--set", "model.seq_len=512")
    assert res.returncode == 0 and "note:" not in res.stdout


def test_plan_estimates_time_memory_and_disk_of_a_gpu_sweep(cli):
    """overtok plan of a GPU sweep: minutes per trial from the committed H200 calibration, GPU-hours, the memory of
    the trials that share a GPU, the checkpoint disk against the free disk, and a legend."""
    from tests.conftest import ROOT

    res = cli("plan", str(ROOT / "sweeps" / "ot_grid.yaml"), "--set", f"base.data.corpus={SHARED}/text",
              "--set", f"base.data.tokenizer={SHARED}/tokenizers/gpt-neox-olmo.json")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "est_min" in out and "GPU-hours" in out and "from NVIDIA H200 measurements of 2026-11-29" in out
    assert "share one GPU" in out and "disk: new checkpoints need about" in out and "columns: N_*" in out


def test_a_subset_of_trials_keeps_the_grids_ids(cli):
    """`--only` (ids or prefixes) and `--seeds` choose trials of a grid without changing any id; a prefix that
    names no trial or several, or an unknown seed, is one line (exit 2)."""
    import re

    sweep = ROOT / "sweeps" / "quickstart.yaml"
    everything = load_sweep(sweep)
    ids = [t.trial_id for t in everything.trials]
    chosen = load_sweep(sweep)
    chosen.select([ids[3][:6], ids[0]], None)
    assert [t.trial_id for t in chosen.trials] == [ids[0], ids[3]]
    res = cli("plan", sweep, "--only", f"{ids[0]},{ids[5][:8]}")
    assert res.returncode == 0, res.stderr
    assert re.findall(r"^([0-9a-f]{12}) ", res.stdout, re.M) == [ids[0], ids[5]]
    for args, problem in ((["--only", "fff0"], "names no trial"), (["--seeds", "7"], "seed 7 is not one"),
                          (["--only", "xyz"], "expected comma-separated trial ids")):
        bad = cli("plan", sweep, *args)
        assert bad.returncode == 2 and problem in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_plan_of_a_gpu_sweep_gives_the_time_left():
    """On a GPU sweep `plan --done` sums the estimated minutes of the trials still to run (the campaign's ledger, here
    as it stood after its first wave; run where the campaign runs, the project root, whose ../shared the sweep's
    corpus path names)."""
    import re
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "overtok", "plan", "sweeps/loglinear_code.yaml", "--done",
                          "results/loglinear_code/wave1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    rows = re.findall(r"^([0-9a-f]{12}) .* (\d+\.\d)\s+(\S+)$", res.stdout, re.M)
    left = [float(minutes) for _, minutes, where in rows if where == "-"]
    hours = float(re.search(r"to run \(([0-9.]+) GPU-hours by the estimate above\): --only", res.stdout).group(1))
    assert len(rows) == 18 and len(left) == 16 and hours == pytest.approx(sum(left) / 60, abs=0.01)


def test_plan_marks_the_trials_that_finished_in_exports(cli, tmp_path):
    """`plan --done EXPORT...`: each trial's wave (a merged export's `export` column, else the folder's name), only
    FINISHED rows count, a later export wins, and the --only list of the rest runs exactly those; a folder that is
    not an export is one line (exit 2)."""
    import re

    import pandas as pd

    sweep = ROOT / "sweeps" / "quickstart.yaml"
    ids = [t.trial_id for t in load_sweep(sweep).trials]
    waves = {"wave1": (ids[:3], ["FINISHED", "FINISHED", "FAILED"]), "wave2": (ids[2:4], ["FINISHED", "FINISHED"])}
    for name, (tids, status) in waves.items():
        (tmp_path / name).mkdir()
        pd.DataFrame({"schema_version": 1, "trial_id": tids, "status": status}).to_parquet(tmp_path / name / "runs.parquet")
        pd.DataFrame({"schema_version": [1], "trial_id": [tids[0]]}).to_parquet(tmp_path / name / "curves.parquet")
    res = cli("plan", sweep, "--done", tmp_path / "wave1", tmp_path / "wave2")
    assert res.returncode == 0, res.stderr
    where = dict(re.findall(r"^([0-9a-f]{12}) .* (\S+)$", res.stdout, re.M))
    assert [where[t] for t in ids[:5]] == ["wave1", "wave1", "wave2", "wave2", "-"], where
    todo = re.search(r"to run: --only (\S+)", res.stdout).group(1).split(",")  # CPU trials: no time estimate
    assert todo == ids[4:]
    rest = cli("plan", sweep, "--only", ",".join(todo))
    assert re.findall(r"^([0-9a-f]{12}) ", rest.stdout, re.M) == ids[4:]
    bad = cli("plan", sweep, "--done", tmp_path)
    assert bad.returncode == 2 and "not an export" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    # the next wave without pasting ids: what has not finished, at most N of it (`overtok sweep` takes the same)
    wave = cli("plan", sweep, "--skip-done", tmp_path / "wave1", tmp_path / "wave2", "--max-trials", "3")
    assert re.findall(r"^([0-9a-f]{12}) ", wave.stdout, re.M) == ids[4:7], wave.stdout + wave.stderr
    done = [tmp_path / "wave1", tmp_path / "wave2"]
    none_left = cli("plan", sweep, "--only", ",".join(ids[:2]), "--skip-done", *done)
    assert none_left.returncode == 2 and "nothing left to run" in none_left.stderr, none_left.stderr


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_time_box_starts_a_trial_only_if_the_last_ones_time_scaled_to_it_fits():
    from overtok.tune import TimeBox

    clock = _Clock()
    box = TimeBox(clock.t, 600.0, {"a": 1.0, "b": 1.0, "c": 2.0}, clock=clock)
    assert box.needs("a") is None and box.admits("a")  # nothing measured yet: the first trial starts
    box.started("a")
    clock.t += 200.0  # a: 200 s
    box.ended("a")
    assert box.needs("b") == pytest.approx(200.0) and box.needs("c") == pytest.approx(400.0)
    assert box.admits("b")  # 400 s left >= 200 * 1.05 + 5
    box.started("b")
    clock.t += 150.0  # b took 150 s: the latest trial is the measure
    box.ended("b")
    assert box.needs("c") == pytest.approx(300.0)
    assert not box.admits("c")  # 250 s left < 300 * 1.05 + 5
    assert box.held_back == "c" and box.needed_s == pytest.approx(300.0)
    assert not box.expired() and not box.timed_out
    clock.t += 250.0
    assert box.expired() and box.timed_out and not box.admits("a")


def test_time_box_holds_back_a_first_trial_its_estimate_says_cannot_end():
    """Before any trial has ended, a trial starts unless even FLOOR of its estimated GPU seconds would pass the
    limit; without estimates (no calibration) it starts."""
    from overtok.tune import TimeBox

    clock = _Clock()
    box = TimeBox(clock.t, 300.0, {"a": 1.0, "b": 2.0}, clock=clock, estimates={"a": 350.0, "b": 400.0})
    assert box.admits("a")  # 0.8 * 350 = 280 s <= 300 s left
    assert not box.admits("b") and box.held_back == "b" and box.by_estimate
    assert box.needed_s == pytest.approx(0.8 * 400.0)
    assert TimeBox(clock.t, 300.0, {"b": 2.0}, clock=clock).admits("b")
    box.started("a")
    clock.t += 100.0
    box.ended("a")  # measured: a took 100 s, so b needs 200 s, and 200 s left < 200 * 1.05 + 5
    assert box.needs("b") == pytest.approx(200.0) and not box.admits("b") and not box.by_estimate


def test_time_box_is_not_scaled_by_a_trial_that_did_not_end():
    from overtok.tune import TimeBox

    clock = _Clock()
    box = TimeBox(clock.t, 100.0, {"a": 1.0, "b": 1.0}, clock=clock)
    box.started("a")
    clock.t += 5.0
    box.ended("b")  # never started here: no measure
    assert box.last is None and box.admits("b")


def test_time_limit_must_be_a_positive_number_of_seconds(tmp_path):
    import subprocess
    import sys

    for bad in ("0", "-3", "ten", "inf"):
        res = subprocess.run([sys.executable, "-m", "overtok", "sweep", str(ROOT / "sweeps" / "quickstart.yaml"),
                              "--time-limit", bad], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 2 and "--time-limit" in res.stderr and "seconds" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "results").exists()
