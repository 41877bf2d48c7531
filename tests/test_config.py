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


def test_degenerate_moduli_by_arithmetic():
    """A modulus degenerates when an earlier token of the n-gram takes fewer than min(m, V) values in the hash:
    m / gcd(m, V^j) < min(m, V). The paper's Table 4 control m = 64 V runs only with allow_degenerate."""
    from overtok.config import degenerate_modulus

    V = 50280  # 2^3 * 3 * 5 * 419
    assert degenerate_modulus(V, 2, 64 * V) is not None and "takes only 64" in degenerate_modulus(V, 2, 64 * V)
    assert degenerate_modulus(V, 3, 1_000_003) is None  # prime
    assert degenerate_modulus(V, 2, 12_501) is not None  # odd, but shares 3 with V
    assert degenerate_modulus(V, 2, 12_503) is None
    assert degenerate_modulus(V, 3, 419 * 1009) is not None  # the token 1 back: factor 419
    assert degenerate_modulus(7, 2, 448) is None  # 64 V with V = 7: the previous token still takes all 7 values
    assert degenerate_modulus(7, 2, 14) is not None
    sets = ["model.vocab_size=50280", "model.oe.n=2", f"model.oe.m={64 * V}", "data.kind=text", "data.path=x"]
    with pytest.raises(ConfigError, match="allow_degenerate"):
        load_config(None, sets)
    assert load_config(None, sets + ["model.oe.allow_degenerate=true"]).model.oe.m == 64 * V


@pytest.mark.parametrize("value, problem", [("[1,", "is not valid YAML"), ("!!python/name:os.system", "constructor"),
                                            ("&a [*a]", "")])
def test_set_values_that_are_not_plain_yaml_are_config_errors(value, problem):
    with pytest.raises(ConfigError, match=problem) as e:
        load_config(None, [f"train.lr={value}"])
    assert e.value.key == "train.lr" or "train.lr" in str(e.value)


def test_config_reference_is_current_and_every_field_documented():
    """docs/config.md is what `overtok config reference` prints now; every field has a note."""
    from overtok.config import config_reference, field_docs
    from tests.conftest import ROOT

    assert all(field_docs().values()), [k for k, v in field_docs().items() if not v]
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), "regenerate: overtok config reference"


def test_config_show_prints_the_resolved_config(cli):
    res = cli("config", "show", "--set", "model.oe.n=3", "--set", "model.oe.m=1009")
    assert res.returncode == 0, res.stderr
    assert "model.oe.n: 3   (default 1)" in res.stdout and "# Largest n-gram order" in res.stdout
