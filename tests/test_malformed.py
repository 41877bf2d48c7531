"""The malformed-input corpus (tests/malformed/): every file exits 2 with one line naming the file, the line when
known, the key and the problem; no traceback; nothing started or created (no MLflow store, no Ray storage)."""

import shutil

import pytest

from tests.conftest import ROOT
from tests.sweeplib import sigint_default

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


# Arguments and data inputs a careless or hostile user gives, each refused with exit 2 and one line before anything
# starts. Files are written into the test's folder first: name -> bytes.
ARG_CASES = {
    "tracking_scheme": (["train", "--set", "train.max_steps=1", "--tracking-uri", "bogus://x"], {}, {},
                        "unsupported tracking URI"),
    "tracking_scheme_env": (["export", "quickstart"], {"MLFLOW_TRACKING_URI": "ftp://x"}, {}, "unsupported tracking URI"),
    "tracking_garbage_db": (["export", "quickstart", "--tracking-uri", "sqlite:///bad.db"], {},
                            {"bad.db": b"garbage, not a database"}, "not a SQLite database"),
    "tracking_missing_dir": (["export", "quickstart", "--tracking-uri", "sqlite:///nowhere/x.db"], {}, {},
                             "does not exist"),
    "set_broken_yaml": (["train", "--set", "train.lr=[1,"], {}, {}, "is not valid YAML"),
    "set_python_tag": (["train", "--set", "model=!!python/object/apply:os.system [true]"], {}, {}, "constructor"),
    "ui_port": (["ui", "--port", "70000"], {}, {}, "a port is 1-65535"),
    "merge_out_file": (["merge", "a", "b", "--out", "taken"], {}, {"taken": b"x"}, "is not a directory"),
    "prepare_out_file": (["data", "prepare", "doc.txt", "--out", "taken", "--tokenizer", "bpe:300"], {},
                         {"taken": b"x", "doc.txt": b"hello world\n\nagain"}, "is not a directory"),
    "prepare_bad_jsonl": (["data", "prepare", "d.jsonl", "--out", "o", "--tokenizer", "bpe:300"], {},
                          {"d.jsonl": b'{"text": "ok"}\n{not json\n'}, "not a JSON line"),
    "prepare_jsonl_array": (["data", "prepare", "d.jsonl", "--out", "o", "--tokenizer", "bpe:300"], {},
                            {"d.jsonl": b'["text", "x"]\n'}, "a JSON list"),
    "prepare_jsonl_number": (["data", "prepare", "d.jsonl", "--out", "o", "--tokenizer", "bpe:300"], {},
                             {"d.jsonl": b'{"text": 42}\n'}, "holds int, not a string"),
    "prepare_fake_xz": (["data", "prepare", "d.txt.xz", "--out", "o", "--tokenizer", "bpe:300"], {},
                        {"d.txt.xz": b"this is not xz"}, "not a valid .xz file"),
    "prepare_corrupt_parquet": (["data", "prepare", "d.parquet", "--out", "o", "--tokenizer", "bpe:300"], {},
                                {"d.parquet": b"PAR1 not really"}, "not a readable Parquet file"),
    "prepare_nul_bytes": (["data", "prepare", "d.txt", "--out", "o", "--tokenizer", "bpe:300"], {},
                          {"d.txt": b"some text\x00more"}, "NUL bytes"),
    "prepare_bpe_word": (["data", "prepare", "d.txt", "--out", "o", "--tokenizer", "bpe:abc"], {},
                         {"d.txt": b"a\n\nb"}, "expected bpe:<V>"),
    "prepare_bpe_zero": (["data", "prepare", "d.txt", "--out", "o", "--tokenizer", "bpe:0"], {},
                         {"d.txt": b"a\n\nb"}, "expected bpe:<V>"),
    "prepare_truncated_tokenizer": (["data", "prepare", "d.txt", "--out", "o", "--tokenizer", "tok.json"], {},
                                    {"d.txt": b"a\n\nb", "tok.json": b'{"version": "1.0", "model": {'},
                                    "not a tokenizer.json"),
    "train_bad_grammar_json": (["train", "--set", "data.grammar=g.json"], {}, {"g.json": b"{not json"},
                               "not a JSON file"),
    "train_grammar_wrong_shape": (["train", "--set", "data.grammar=g.json"], {}, {"g.json": b'{"all": 3}'},
                                  "not a Physics-of-LMs rule table"),
    "report_script_url": (["report", "exp", "--ui", "javascript:alert(1)"], {}, {}, "must be an http(s) URL"),
    "sweep_cuda_missing": (["sweep", "s.yaml"], {"RAY_TMPDIR": "/nonexistent-ray-tmp"},
                           {"s.yaml": b"name: nocuda\nbase: {runtime: {device: cuda}}\n"}, "this machine has 0 CUDA GPUs"),
    "fit_law_negative_bootstrap": (["fit-law", "loglinear", "t.csv", "--bootstrap", "-5"], {},
                                   {"t.csv": b"vocab,loss\n1,2\n"}, "expected an integer >= 0"),
}


@pytest.mark.parametrize("case", ARG_CASES, ids=list(ARG_CASES))
def test_malformed_argument_exits_2_in_one_line(cli, tmp_path, case):
    import time

    args, env, files, problem = ARG_CASES[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    t0 = time.time()
    res = cli(*args, env=env, timeout=120)
    assert res.returncode == 2, (res.stdout[-500:], res.stderr[-1500:])
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and problem in line, line
    assert time.time() - t0 < 60
    assert not (tmp_path / "results" / "mlflow.db").exists() and not (tmp_path / "o").exists()


def test_report_of_a_crafted_export_writes_nothing_outside(cli, tmp_path):
    """An export whose sweep column is a path (../../elsewhere) is refused: the page's path never comes from data."""
    import pandas as pd

    src = ROOT / "results" / "quickstart"
    exp = tmp_path / "exp"
    exp.mkdir()
    runs = pd.read_parquet(src / "runs.parquet")
    runs["sweep"] = "../../elsewhere"
    runs.to_parquet(exp / "runs.parquet")
    shutil.copy(src / "curves.parquet", exp / "curves.parquet")
    res = cli("report", "exp", timeout=300)
    assert res.returncode == 2 and "is not a sweep name" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path.parent / "elsewhere").exists() and not (tmp_path / "dashboards").exists()


def test_ctrl_c_early_in_report_exits_130_in_one_line(tmp_path):
    """Ctrl-C within the first second (imports, reading the export): exit 130 and one line."""
    import signal
    import subprocess
    import sys
    import time

    shutil.copytree(ROOT / "results" / "quickstart", tmp_path / "exp", ignore=shutil.ignore_patterns("figures"))
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "overtok", "report", "exp"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    time.sleep(0.6)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip() == "overtok: interrupted", err[-2000:]


def test_servers_that_do_not_answer_cost_one_line_and_bounded_time(cli, tmp_path):
    """A tracking server that accepts connections but never answers, and a Ray head where nothing listens: export,
    sweep and train each give up within the connect timeout (10 s) with one line."""
    import socket
    import time

    from tests.sweeplib import free_port

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # the kernel completes connections; nobody ever reads or answers
    uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
    (tmp_path / "s.yaml").write_text("name: s\nbase: {train: {max_steps: 2}}\n")
    try:
        for args in (["export", "quickstart", "--tracking-uri", uri], ["sweep", "s.yaml", "--tracking-uri", uri],
                     ["train", "--set", "train.max_steps=1", "--tracking-uri", uri],
                     ["sweep", "s.yaml", "--address", f"127.0.0.1:{free_port()}"]):
            t0 = time.time()
            res = cli(*args, timeout=120)
            line = res.stderr.strip()
            assert res.returncode == 2 and "does not answer" in line and "\n" not in line, (args, res.stderr[-2000:])
            assert time.time() - t0 < 45, args
    finally:
        hole.close()
