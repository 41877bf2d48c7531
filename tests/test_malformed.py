"""The malformed-input corpus (tests/malformed/): every file exits 2 with one line naming the file, the line when
known, the key and the problem; no traceback; nothing started or created (no MLflow store, no Ray storage)."""

import shutil

import pytest

from tests.conftest import ROOT

CORPUS = ROOT / "tests" / "malformed"
FILES = sorted(CORPUS.glob("*.yaml"))


def _expectation(path):
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), path
    key, problem = (x.strip() for x in first.removeprefix("# expect: ").split("|", 1))
    return (None if key == "-" else key), problem


def test_corpus_is_large_enough():
    assert len(FILES) >= 40
    assert {p.name.split("_")[0] for p in FILES} == {"train", "sweep"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_malformed_file_exits_2_and_starts_nothing(cli, tmp_path, path):
    key, problem = _expectation(path)
    local = tmp_path / path.name
    shutil.copy(path, local)
    if b"tests/malformed" in local.read_bytes():  # relative corpus paths point into this folder
        local.write_text(local.read_text().replace("tests/malformed", str(CORPUS)))
    commands = [["train", local.name, "--set", "train.max_steps=1"]] if path.name.startswith("train_") else \
        [["plan", local.name], ["sweep", local.name]]
    for cmd in commands:
        res = cli(*cmd)
        assert res.returncode == 2, (cmd, res.stdout[-500:], res.stderr[-1500:])
        line = res.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert local.name in line and problem in line, line
        if key:
            assert key in line, line
    assert not (tmp_path / "results").exists()
