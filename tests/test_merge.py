"""`overtok merge`: a rerun's trials (same ids) replace the base export's rows and curves, on the shipped cfg_paper
export and its rerun of the two 3-gram tokenizer cells (results/cfg_paper, results/cfg_paper_tok3)."""

import json
import shutil

import pandas as pd

from overtok.sweep import load_sweep
from tests.conftest import ROOT

BASE, RERUN = ROOT / "results" / "cfg_paper", ROOT / "results" / "cfg_paper_tok3"


def test_rerun_replaces_rows_and_curves_and_the_report_shows_it(cli, tmp_path):
    res = cli("merge", BASE, RERUN, "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    assert "8 trials of 'cfg_paper', 2 replaced, 0 added" in res.stdout
    base, rerun = pd.read_parquet(BASE / "runs.parquet"), pd.read_parquet(RERUN / "runs.parquet")
    merged = pd.read_parquet(tmp_path / "merged" / "runs.parquet")
    assert sorted(merged.trial_id) == sorted(base.trial_id)
    assert set(merged.sweep) == {"cfg_paper"}
    ids = set(rerun.trial_id)
    for _, row in merged.iterrows():
        src = rerun if row.trial_id in ids else base
        want = src[src.trial_id == row.trial_id].iloc[0]
        assert row.run_id == want.run_id and row["final.val/gen_acc"] == want["final.val/gen_acc"]
        assert row.export == ("cfg_paper_tok3" if row.trial_id in ids else "cfg_paper")
    # the shipped first run measured the prompt, not the model: 0 there, the rerun's accuracies here
    assert (base[base.trial_id.isin(ids)]["final.val/gen_acc"] == 0).all()
    assert (merged[merged.trial_id.isin(ids)]["final.val/gen_acc"] > 0).all()
    curves = pd.read_parquet(tmp_path / "merged" / "curves.parquet")
    base_c, rerun_c = pd.read_parquet(BASE / "curves.parquet"), pd.read_parquet(RERUN / "curves.parquet")
    assert set(curves[curves.trial_id.isin(ids)].run_id) == set(rerun_c.run_id)
    assert len(curves) == len(base_c[~base_c.trial_id.isin(ids)]) + len(rerun_c)
    meta = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert sorted(meta["replaced"]) == sorted(ids) and meta["added"] == []

    rep = cli("report", tmp_path / "merged")
    assert rep.returncode == 0, rep.stderr
    page = (tmp_path / "dashboards" / "cfg_paper" / "index.html").read_text()
    assert "from export" in page and "cfg_paper_tok3" in page
    fits = json.loads((tmp_path / "merged" / "fits.json").read_text())
    assert fits["cfg_generation_accuracy_ci"]["3-gram tokenizer"]["d768-L12"]["accepted"] == 2


def test_unfinished_rerun_trials_leave_the_base_row(cli, tmp_path):
    rerun = tmp_path / "rerun"
    shutil.copytree(RERUN, rerun)
    runs = pd.read_parquet(rerun / "runs.parquet")
    failed = runs.trial_id.iloc[0]
    runs.loc[0, "status"] = "FAILED"
    runs.to_parquet(rerun / "runs.parquet", index=False)
    res = cli("merge", BASE, rerun, "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    assert "1 replaced" in res.stdout and f"not finished so not taken: {failed} (rerun: FAILED)" in res.stdout
    merged = pd.read_parquet(tmp_path / "merged" / "runs.parquet")
    base = pd.read_parquet(BASE / "runs.parquet")
    assert merged[merged.trial_id == failed].run_id.item() == base[base.trial_id == failed].run_id.item()


def test_bad_merges_exit_2_and_write_nothing(cli, tmp_path):
    res = cli("merge", tmp_path / "nope", RERUN, "--out", tmp_path / "merged")
    assert res.returncode == 2 and "nope: no runs.parquet" in res.stderr and len(res.stderr.splitlines()) == 1
    res = cli("merge", BASE, RERUN, "--out", BASE)
    assert res.returncode == 2 and "--out: the merged export must go to a directory of its own" in res.stderr
    assert not (tmp_path / "merged").exists()



def test_sweep_keeps_only_its_trials(tmp_path, monkeypatch, capsys):
    # part 3 of the campaign (speedup_code) takes its baselines out of part 1's export (loglinear_code), which also
    # holds 15 trials of its own; sweep files name the corpus relative to the project root, so run from there
    from overtok.cli import main

    monkeypatch.chdir(ROOT)
    part1, part3 = ROOT / "results" / "loglinear_code" / "merged", ROOT / "results" / "speedup_code" / "wave1"
    sweep = "sweeps/speedup_code.yaml"
    assert main(["merge", str(part3), str(part1), "--sweep", sweep, "--out", str(tmp_path / "merged")]) == 0
    baselines = {t.trial_id for t in load_sweep(sweep).trials if t.config.model.oe.n == 1}
    assert f"3 trials of 'speedup_code', 1 replaced, 2 added, 15 not in {sweep} left out" in capsys.readouterr().out
    merged = pd.read_parquet(tmp_path / "merged" / "runs.parquet")
    assert set(merged.trial_id) == baselines and set(merged.sweep) == {"speedup_code"}
    assert set(pd.read_parquet(tmp_path / "merged" / "curves.parquet").trial_id) == baselines
    meta = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert len(meta["not_in_sweep"]) == 15 and not set(meta["not_in_sweep"]) & baselines

    assert main(["merge", str(part1), str(part3), "--sweep", "sweeps/cfg_curve.yaml", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--sweep: no trial of the inputs is in the sweep" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists()
