"""scripts/wave.sh, a campaign's wave on a machine that keeps nothing: each wave runs what the merged export of the
earlier waves lacks, exports to its own folder (also when its time limit stops the sweep), and the waves merge
into the whole grid. Real Ray, real MLflow, one fresh project folder per wave (as a fresh machine)."""

import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from overtok.identity import code_version
from tests.conftest import ROOT
from tests.sweeplib import env, overtok

pytestmark = pytest.mark.slow

SWEEP = textwrap.dedent("""\
    name: wv
    base:
      model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 32}
      data: {batch_size: 4}
      train: {max_steps: 12, eval_every: 6, log_every: 3, checkpoint_every: 100000, gen_samples: 0}
    grid:
      model.od_depth: [1, 2]
    seeds: [0, 1]
    max_concurrent: 1
    """)


def wave(machine, done, out, *extra, timeout=600, **environ):
    (machine / "wv.yaml").write_text(SWEEP)
    return subprocess.run(["bash", str(ROOT / "scripts" / "wave.sh"), "wv.yaml", str(done), str(out), *extra],
                          cwd=machine, env=env({"PYTHON": sys.executable, **environ}), capture_output=True,
                          text=True, timeout=timeout)


def finished(export):
    runs = pd.read_parquet(export / "runs.parquet")
    return set(runs.trial_id[runs.status == "FINISHED"])


def test_waves_on_fresh_machines_add_up_to_the_grid(tmp_path):
    campaign = tmp_path / "campaign"
    campaign.mkdir()
    first, second = tmp_path / "m1", tmp_path / "m2"
    first.mkdir(), second.mkdir()

    # seed 1 first, one trial a call; the same command again on the machine (still warm: its MLflow store kept)
    # runs the next trial, as --max-trials counts the trials the store does not hold FINISHED
    for _ in range(2):
        res = wave(first, "-", campaign / "wave1", "1", "540", "--seeds", "1")
        assert res.returncode == 0, res.stderr + (campaign / "wave1" / "sweep.log").read_text()[-3000:]
    one = finished(campaign / "wave1")
    log = (campaign / "wave1" / "sweep.log").read_text()
    assert len(one) == 2 and log.count("sweep exit status 0") == 2 and "wave end" in log, log[-2000:]
    assert "2 trials, 0 already finished, 1 to run (--max-trials 1: 1 left for later)" in log, log[-3000:]
    assert "2 trials, 1 already finished, 1 to run;" in log, log[-3000:]
    assert f"overtok code {code_version()}" in log  # the code that ran, as the runs' tag overtok.code names it
    runs = pd.read_parquet(campaign / "wave1" / "runs.parquet")
    assert set(runs.seed) == {1}

    # one earlier wave: its export is the DONE; MAX_TRIALS 0: as many as the time limit lets start
    res = wave(second, campaign / "wave1", campaign / "wave2", "0", "540")
    assert res.returncode == 0, res.stderr
    two = finished(campaign / "wave2")
    assert len(two) == 2 and not two & one  # only the trials wave 1 left
    log = (campaign / "wave2" / "sweep.log").read_text()
    assert "--time-limit 540 s:" in log and "--max-trials" not in log and "not started" not in log, log[-3000:]

    # a wave whose time limit stops its sweep before any trial starts says how the sweep ended, and its export
    # says in one line that there is nothing to export (no empty tables to merge), its status the wave's
    third = tmp_path / "m3"
    (third / "carried" / "corpus").mkdir(parents=True)  # data carried in the call, linked where the sweep reads it
    res = wave(third, campaign / "wave1", campaign / "wave3", "3", "1",
               OVERTOK_LINKS="carried/corpus:shared/data/corpus")
    assert (third / "shared" / "data" / "corpus").resolve() == (third / "carried" / "corpus").resolve()
    log = (campaign / "wave3" / "sweep.log").read_text()
    nothing = "has no trial runs" in log or "no MLflow experiment" in log  # stopped before or after creating it
    assert "sweep exit status 124" in log and nothing and "Traceback" not in log, log[-2000:]
    assert res.returncode == 2 and not (campaign / "wave3" / "runs.parquet").exists()

    merged = overtok(tmp_path, "merge", campaign / "wave1", campaign / "wave2", "--out", campaign / "merged")
    assert merged.returncode == 0, merged.stderr
    assert len(finished(campaign / "merged")) == 4
    shutil.rmtree(campaign)


def test_wave_refuses_bad_arguments_in_one_line(tmp_path):
    for args, problem in ((["nope.yaml", "d", "o"], "no such sweep file"), (["wv.yaml", "-", "o", "x"], "whole numbers"),
                          (["wv.yaml", "-", "o", "2", "0"], "LIMIT_S"),
                          (["wv.yaml", "nodone", "o"], "DONE nodone: no such export (- for none)"),
                          (["wv.yaml"], "usage")):
        (tmp_path / "wv.yaml").write_text(SWEEP)
        res = subprocess.run(["bash", str(ROOT / "scripts" / "wave.sh"), *args], cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and problem in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert not (tmp_path / "o").exists()
