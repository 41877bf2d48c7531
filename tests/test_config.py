import pytest

from overtok.config import ConfigError, load_config, load_yaml


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


def test_ui_refuses_a_wide_bind_without_expose(cli):
    res = cli("ui", "--host", "0.0.0.0")
    assert res.returncode == 2 and "--expose" in res.stderr and "Traceback" not in res.stderr
