import pytest

from overtok.config import ConfigError, load_config, load_yaml

BAD = {
    "unknown_key.yaml": ("model:\n  d_modle: 64\n", "model.d_modle", "unknown key"),
    "wrong_type.yaml": ("model:\n  d_model: sixty\n", "model.d_model", "expected an integer"),
    "heads.yaml": ("model:\n  d_model: 66\n  n_heads: 4\n", "model.d_model", "not divisible by n_heads"),
    "oe_width.yaml": ("model:\n  d_model: 64\n  oe: {n: 3, k: 3, m: 1000}\n", "model.d_model", "k*(n-1)=6"),
    "order.yaml": ("model:\n  oe: {n: 0}\n", "model.oe.n", "order must be >= 1"),
    "od.yaml": ("model:\n  od_depth: 0\n", "model.od_depth", "OD depth must be >= 1"),
    "modulus.yaml": ("model:\n  oe: {n: 2, k: 1, m: 42}\n", "model.oe.m", "multiple of the vocabulary size"),
    "negative.yaml": ("data:\n  batch_size: -3\n", "data.batch_size", "must be >= 1"),
    "choice.yaml": ("train:\n  schedule: linear\n", "train.schedule", "must be one of"),
    "syntax.yaml": ("model:\n  d_model: [64\n", None, "YAML syntax error"),
    "missing_text.yaml": ("data:\n  kind: text\n  path: /nonexistent/dir\n", "data.path", "meta.json"),
    "section.yaml": ("model: 5\n", "model", "expected a mapping"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_train_config_exits_2_with_one_line(cli, tmp_path, name):
    text, key, problem = BAD[name]
    (tmp_path / name).write_text(text)
    res = cli("train", name, "--set", "train.max_steps=1")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert name in lines[0] and problem in lines[0]
    if key:
        assert key in lines[0]
    assert not (tmp_path / "results").exists()  # no MLflow store, no run


def test_error_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel:\n  d_model: 64\n  n_layerz: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.line == 4 and str(e.value).startswith(f"{p}:4: model.n_layerz")


def test_scientific_numbers_load_as_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 3e-4\n  max_steps: 1e3\nmodel:\n  oe: {m: 1.28e7, n: 2}\n")
    data, _ = load_yaml(p)
    assert data["train"]["lr"] == 3e-4 and isinstance(data["train"]["lr"], float)
    cfg = load_config(p, ["train.beta2=9.9e-1"])
    assert cfg.train.max_steps == 1000 and cfg.model.oe.m == 12_800_000 and cfg.train.beta2 == 0.99


def test_every_subcommand_has_help(cli):
    for cmd in [["train"], ["data", "prepare"], ["plan"], ["sweep"], ["export"], ["fit"], ["plots"], ["fit-law"]]:
        res = cli(*cmd, "--help")
        assert res.returncode == 0 and "usage: overtok" in res.stdout
