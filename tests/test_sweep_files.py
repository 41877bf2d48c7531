"""Sweep files: every shipped one expands; malformed ones exit 2 before Ray or MLflow start."""

import pytest

from overtok.sweep import load_sweep, plan_table
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_all_required_sweeps_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "quickstart_text", "cfg_paper", "vocab_scaling", "ot_grid"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweep_expands(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # corpus paths like ../shared/data/text are relative to the project root
    sweep = load_sweep(path)
    assert sweep.name == path.stem and len(sweep.trials) >= 4
    assert len({t.trial_id for t in sweep.trials}) == len(sweep.trials)
    table = plan_table(sweep)
    assert all(t.trial_id in table for t in sweep.trials) and "training FLOPs" in table


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


BASE = "name: bad\nbase:\n  model: {d_model: 32, n_heads: 2, seq_len: 16}\n  train: {max_steps: 2}\n"
BAD_SWEEPS = {
    "unknown_top.yaml": (BASE + "grids:\n  model.oe.n: [1]\n", "grids", "unknown key"),
    "no_name.yaml": ("base: {}\n", "name", "required"),
    "empty_grid_list.yaml": (BASE + "grid:\n  model.oe.n: []\n", "grid.model.oe.n", "non-empty list"),
    "grid_not_list.yaml": (BASE + "grid:\n  model.oe.n: 3\n", "grid.model.oe.n", "non-empty list"),
    "bad_grid_key.yaml": (BASE + "grid:\n  model.d_modle: [32]\n", "grid.model.d_modle", "unknown key"),
    "bad_grid_value.yaml": (BASE + "grid:\n  model.oe.n: [1, 3]\n  model.oe.m: [100]\n  model.oe.k: [3]\n",
                            "model.d_model", "k*(n-1)"),
    "zip_lengths.yaml": (BASE + "zip:\n  - {model.d_model: [32, 64], model.n_layers: [1]}\n", "zip[0]", "equal length"),
    "dup_trials.yaml": (BASE + "grid:\n  model.d_model: [32, 32]\n", "grid", "duplicate trials"),
    "bad_base.yaml": ("name: bad\nbase:\n  model: {n_heads: 0}\n", "base.model.n_heads", ">= 1"),
    "bad_resources.yaml": (BASE + "resources: {cpu: -1}\n", "resources.cpu", ">= 0"),
    "bad_seeds.yaml": (BASE + "seeds: [0, x]\n", "seeds", "list of integers"),
    "bad_ray.yaml": (BASE + "ray: {adress: x}\n", "ray.adress", "unknown key"),
    "od_zero.yaml": (BASE + "grid:\n  model.od_depth: [0, 1]\n", "grid.model.od_depth", "OD depth must be >= 1"),
    "modulus.yaml": (BASE + "grid:\n  model.oe.n: [2]\n  model.oe.m: [21]\n", "grid.model.oe.m", "multiple of the vocabulary"),
    "syntax.yaml": ("name: bad\nbase: {model: [\n", None, "YAML syntax error"),
    "missing_corpus.yaml": (BASE.replace("train:", "data: {kind: text, corpus: /no/such/dir, tokenizer: bpe:300}\n  train:")
                            + "grid:\n  model.oe.n: [1]\n", "data.corpus", "no such file"),
}


@pytest.mark.parametrize("name", BAD_SWEEPS)
def test_malformed_sweep_exits_2_and_starts_nothing(cli, tmp_path, name):
    text, key, problem = BAD_SWEEPS[name]
    (tmp_path / name).write_text(text)
    for cmd in ("plan", "sweep"):
        res = cli(cmd, name)
        assert res.returncode == 2, (cmd, res.stdout, res.stderr)
        line = res.stderr.strip()
        assert "\n" not in line and "Traceback" not in line and name in line and problem in line, line
        if key:
            assert key in line
    assert not (tmp_path / "results").exists()  # no MLflow store, no Ray storage, no checkpoints


def test_oversized_grid_needs_yes(cli, tmp_path):
    (tmp_path / "big.yaml").write_text(BASE + "max_trials: 3\ngrid:\n  train.lr: [1e-3, 2e-3, 3e-3, 4e-3]\n")
    res = cli("sweep", "big.yaml")
    assert res.returncode == 2 and "exceed max_trials=3" in res.stderr and "--yes" in res.stderr
    assert not (tmp_path / "results").exists()
