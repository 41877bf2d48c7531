"""Fits recover known parameters, speedups known ratios; bad tables exit 2; analysis never imports torch."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import fits
from tests.conftest import ROOT


def test_loglinear_recovers_known_law_within_ci():
    rng = np.random.default_rng(1)
    vocab = np.repeat([5e4, 2e5, 8e5, 3.2e6, 1.28e7], 3)
    loss = 2.6754 - 0.0256 * np.log10(vocab) + rng.normal(0, 0.003, vocab.size)
    r = fits.fit_loglinear(vocab, loss, bootstrap=500)
    for k, true in (("intercept", 2.6754), ("slope", -0.0256)):
        lo, hi = r.ci[k]
        assert lo <= true <= hi, (k, r.estimates[k], r.ci[k])
        assert hi - lo < 0.05
    assert abs(r.estimates["slope"] + 0.0256) < 0.005


def test_loglinear_at_two_sizes_has_an_interval_only_across_seeds():
    # one seed at two sizes: the line goes through both points, so resampling points would give a zero-width
    # interval; there is none. Two seeds: the t interval over their two exact slopes.
    one = fits.fit_loglinear(np.array([5e4, 1e6]), np.array([3.0, 2.9]), bootstrap=100, groups=np.array([0, 0]))
    assert one.estimates["slope"] == pytest.approx(-0.1 / np.log10(20))
    assert all(np.isnan(v) for v in one.ci["slope"]) and one.notes["interval"].startswith("none")
    two = fits.fit_loglinear(np.array([5e4, 1e6, 5e4, 1e6]), np.array([3.0, 2.9, 3.0, 2.8]), bootstrap=100,
                             groups=np.array([0, 0, 1, 1]))
    lo, hi = two.ci["slope"]
    assert lo < two.estimates["slope"] < hi and hi - lo > 0.1


def test_loglinear_intervals_come_from_complete_seeds():
    # two seeds whose offsets differ but whose slopes agree: the seed is the unit, so the slope's interval is exact
    # (t over per-seed fits and the seed bootstrap alike), while resampling points mixes the seeds and it wanders
    vocab = np.tile([1e4, 1e5, 1e6, 1e7], 2)
    loss = 3.0 - 0.03 * np.log10(vocab) + np.repeat([0.0, 0.2], 4)
    by_seed = fits.fit_loglinear(vocab, loss, bootstrap=200, groups=np.repeat([0, 1], 4))
    by_point = fits.fit_loglinear(vocab, loss, bootstrap=200)
    assert by_seed.notes["seeds"] == 2 and by_point.notes["seeds"] == 1
    assert by_seed.ci["slope"] == pytest.approx((-0.03, -0.03))
    assert by_seed.notes["seed_bootstrap"]["slope"] == pytest.approx([-0.03, -0.03])
    assert by_point.ci["slope"][1] - by_point.ci["slope"][0] > 0.01

    # slopes -0.02 and -0.04: the t interval (1 degree of freedom) is 12.7 times the standard error of the mean
    loss = np.concatenate([3.0 - 0.02 * np.log10(vocab[:4]), 3.0 - 0.04 * np.log10(vocab[:4])])
    r = fits.fit_loglinear(vocab, loss, bootstrap=200, groups=np.repeat([0, 1], 4))
    assert r.estimates["slope"] == pytest.approx(-0.03)
    assert r.ci["slope"] == pytest.approx((-0.03 - 12.706 * 0.01, -0.03 + 12.706 * 0.01), rel=1e-3)
    assert r.notes["per_seed"]["1"]["slope"] == pytest.approx(-0.04)

    # a third seed run at two of the four sizes only, far off: left out, the fit is the two complete seeds'
    vocab3 = np.concatenate([vocab, [1e4, 1e5]])
    loss3 = np.concatenate([loss, [9.0, 1.0]])
    r3 = fits.fit_loglinear(vocab3, loss3, bootstrap=200, groups=np.array([0] * 4 + [1] * 4 + [2] * 2))
    assert r3.notes["left_out"] == ["seed 2 (2 of 4 sizes)"] and r3.n_points == 8
    assert r3.estimates == pytest.approx(r.estimates) and r3.ci["slope"] == pytest.approx(r.ci["slope"])
    # one complete seed and a partial one: no seed-to-seed interval, so no verdict
    r1 = fits.fit_loglinear(vocab3[4:], loss3[4:], bootstrap=200, groups=np.array([1] * 4 + [2] * 2))
    assert r1.notes["seeds"] == 1 and fits.loglinear_verdict(r1.ci["slope"], r1.notes["seeds"]).startswith("no verdict")
    # no seed with every size: every point is fitted, the seeds are named, no verdict
    r0 = fits.fit_loglinear(np.array([1e4, 1e5, 1e6, 1e7]), np.array([3.0, 2.9, 2.8, 2.7]), bootstrap=50,
                            groups=np.array([0, 0, 2, 2]))
    assert r0.n_points == 4 and r0.notes["seeds"] == 1 and "left_out" not in r0.notes
    assert r0.notes["no_complete_seed"] == ["seed 0 (2 of 4 sizes)", "seed 2 (2 of 4 sizes)"]
    assert r0.estimates["slope"] == pytest.approx(-0.1)


@pytest.mark.parametrize("ci,seeds,start", [((-0.04, -0.02), 3, "reproduced: the slope's interval lies below 0 and holds"),
                                            ((-0.09, -0.05), 3, "sign reproduced, magnitude not: the slope's interval "
                                                                "lies below 0 and is steeper than"),
                                            ((-0.015, -0.01), 3, "sign reproduced, magnitude not: the slope's interval "
                                                                 "lies below 0 and is shallower than"),
                                            ((0.01, 0.03), 3, "not reproduced: the slope's interval lies above 0"),
                                            ((-0.01, 0.02), 2, "not reproduced: the slope's interval holds 0 and excl"),
                                            ((-0.05, 0.02), 2, "not testable"), ((-0.04, -0.02), 1, "no verdict")])
def test_loglinear_verdicts(ci, seeds, start):
    assert fits.loglinear_verdict(ci, seeds).startswith(start)


def test_local_slopes_find_where_the_curve_stops_falling():
    """Adjacent-m slopes per decade, seed by seed, with Student t intervals over seeds: the loss falls 0.02 per
    decade up to m = 1e5 and then only by seed noise, so it falls no more measurably from 1e5; a seed without both
    points of a step does not count there."""
    xs = [1e3, 1e4, 1e5, 1e6, 1e7]
    noise = {0: [0.0, 0.001, -0.001, 0.003, -0.002], 1: [0.0, -0.001, 0.001, -0.002, 0.003], 2: [0.0, 0.0, 0.0, 0.0, 0.0]}
    x, y, g = [], [], []
    for seed, eps in noise.items():
        for i, (m, e) in enumerate(zip(xs, eps)):
            x.append(m), g.append(seed)
            y.append(2.0 - 0.02 * min(i, 2) + e)
    r = fits.local_slopes(x, y, g)
    assert [st["from"] for st in r["steps"]] == xs[:-1] and [st["seeds"] for st in r["steps"]] == [3] * 4
    assert r["steps"][0]["per_seed"] == pytest.approx({"0": -0.019, "1": -0.021, "2": -0.02})
    assert r["steps"][0]["ci"][1] < 0 and r["steps"][1]["ci"][1] < 0
    assert r["flat_from"] == 1e5
    # still falling at the top: no flat point
    steep = fits.local_slopes(x, [v - 0.05 * np.log10(m) for v, m in zip(y, x)], g)
    assert steep["flat_from"] is None
    # seed 2 lacks m = 1e7: the last step has two seeds
    keep = [not (s == 2 and m == 1e7) for s, m in zip(g, x)]
    part = fits.local_slopes(np.array(x)[keep], np.array(y)[keep], np.array(g)[keep])
    assert part["steps"][-1]["seeds"] == 2 and set(part["steps"][-1]["per_seed"]) == {"0", "1"}


def test_loglinear_fits_on_both_vocabulary_axes():
    """fits.json's loglinear: against V + m (baselines at V); loglinear_m: against the table rows m, OE runs only."""
    from analysis.commands import _loglinear_fits

    V, ms = 50_280, [0, 12_503, 50_021, 200_003, 3_200_003]
    df = pd.DataFrame({"model.oe.m": ms, "model.oe.n": [1, 2, 2, 2, 2], "model.od_depth": 1,
                       "model.tokenizer_ngram": 1, "model.output_ngram": 1, "size": "d512-L8", "tokens": 10**8,
                       "N_body": 25_305_600, "input_vocab_size": [V + m for m in ms], "seed": 0})
    df["final_train_loss"] = [3.0] + [2.6754 - 0.0256 * math.log10(m) for m in ms[1:]]
    df["final_val_loss"] = df["final_train_loss"] + 0.1
    by_m = _loglinear_fits(df, bootstrap=50, axis="m")["final_train_loss"]["d512-L8"]
    assert by_m["n_points"] == 4 and by_m["estimates"]["slope"] == pytest.approx(-0.0256)
    by_vocab = _loglinear_fits(df, bootstrap=50)["final_val_loss"]["d512-L8"]
    assert by_vocab["n_points"] == 5 and by_vocab["notes"]["vocab_axis"].startswith("V + OE")
    assert by_m["notes"]["verdict"].startswith("no verdict")  # one seed


def _chinchilla_data(seed=0, n=250):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    true = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    L = fits.chinchilla_predict(true, N, D) * np.exp(rng.normal(0, 0.005, n))
    return N, D, L, true


def test_chinchilla_recovers_known_parameters_within_ci():
    N, D, L, true = _chinchilla_data()
    r = fits.fit_chinchilla(N, D, L, bootstrap=30)
    for k, v in true.items():
        lo, hi = r.ci[k]
        assert lo <= v <= hi, (k, r.estimates[k], r.ci[k])
    assert r.notes["starts"] == 4500


def test_chinchilla_same_optimum_from_different_start_grids():
    N, D, L, _ = _chinchilla_data(seed=3)
    a = fits.fit_chinchilla(N, D, L, bootstrap=0)
    rng = np.random.default_rng(7)
    other = np.column_stack([rng.uniform(0, 25, 3000), rng.uniform(0, 25, 3000), rng.uniform(-1, 1, 3000),
                             rng.uniform(0, 2, 3000), rng.uniform(0, 2, 3000)])
    b = fits.fit_chinchilla(N, D, L, bootstrap=0, starts=other)
    for k in a.estimates:
        assert a.estimates[k] == pytest.approx(b.estimates[k], rel=2e-3), k


def test_speedup_on_constructed_curves_equals_known_ratio():
    tokens = np.linspace(1e6, 1e8, 400)
    base = 2.0 + 5.0 / np.sqrt(tokens / 1e6)
    variant = 2.0 + 5.0 / np.sqrt(2.5 * tokens / 1e6)  # reaches any loss with 2.5x fewer tokens
    r = fits.speedup(tokens, base, tokens, variant, smooth=None)
    assert r["speedup"] == pytest.approx(2.5, rel=1e-3)
    acc_b, acc_v = 1 - np.exp(-tokens / 3e7), 1 - np.exp(-tokens * 1.7 / 3e7)
    r = fits.speedup(tokens, acc_b, tokens, acc_v, smooth=None, higher_is_better=True)
    assert r["speedup"] == pytest.approx(1.7, rel=1e-3)
    never = fits.speedup(tokens, base, tokens, base + 1.0, smooth=None)
    assert np.isnan(never["speedup"])


def test_mean_ci_over_seeds_and_speedup_verdicts():
    r = fits.mean_ci([2.0, 2.2, 2.4, 2.6])  # sd 0.2582, t(3) = 3.1824: half-width 0.4108
    assert r["mean"] == pytest.approx(2.3) and r["ci"] == pytest.approx([1.8892, 2.7108], abs=1e-4) and r["n"] == 4
    assert np.isnan(fits.mean_ci([1.5])["ci"]).all() and fits.mean_ci([float("nan")])["n"] == 0
    assert fits.speedup_verdict(r, 4).startswith("reproduced")
    assert fits.speedup_verdict(fits.mean_ci([1.2, 0.8]), 2).startswith("not testable")
    assert fits.speedup_verdict(fits.mean_ci([0.80, 0.82, 0.84]), 3).startswith("not reproduced: the speedup")
    assert fits.speedup_verdict(fits.mean_ci([2.0, 2.1]), 3).startswith("not reproduced: 1 of 3 seeds never")
    assert fits.speedup_verdict(fits.mean_ci([2.0]), 1).startswith("no verdict")
    assert fits.speedup_verdict(fits.mean_ci([float("nan")]), 1).endswith("never reaches the baseline's final loss")


def test_wilson_interval_known_values():
    """Reference values of the 95% Wilson interval (Newcombe 1998, table I: 0/10 -> [0, 0.2775], 1/29 -> ...)."""
    assert fits.wilson_ci(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert fits.wilson_ci(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)
    lo, hi = fits.wilson_ci(7, 2000)
    assert lo < 7 / 2000 < hi and np.isnan(fits.wilson_ci(5, 0)).all()  # nan without trials


def test_difference_interval_known_values_and_direction_verdicts():
    # Newcombe (1998), table II, example (a): 56/70 - 48/80, hybrid score interval 0.0524 to 0.3339
    assert fits.difference_ci(56, 70, 48, 80) == pytest.approx([0.0524, 0.3339], abs=1e-4)
    assert fits.direction_verdict([0.01, 0.03], +1, 2).startswith("reproduced: helps")
    assert fits.direction_verdict([-0.03, -0.01], -1, 2).startswith("reproduced: hurts")
    assert fits.direction_verdict([0.01, 0.03], -1, 2).startswith("not reproduced")
    assert fits.direction_verdict([-0.01, 0.03], +1, 3).startswith("not testable")
    assert fits.direction_verdict([0.01, 0.03], +1, 1).startswith("no verdict")


def test_cfg_directions_follow_the_paper_per_size():
    """An n-gram input is expected to help both sizes; an n-gram output or tokenizer to help the largest and hurt
    the smallest. Samples are pooled over seeds; MTP and other variants get no direction."""
    from analysis.commands import _cfg_directions

    rows = []
    acc = {("d128", "Baseline"): 0.30, ("d128", "in"): 0.40, ("d128", "out"): 0.20, ("d768", "Baseline"): 0.50,
           ("d768", "in"): 0.51, ("d768", "out"): 0.60, ("d768", "mtp"): 0.70}
    cols = {"Baseline": (1, 1, 1, 1), "in": (1, 3, 1, 1), "out": (1, 1, 3, 1), "mtp": (1, 1, 1, 2)}
    for (size, variant), a in acc.items():
        tok, oe_n, out_n, depth = cols[variant]
        for seed in (0, 1):
            rows.append({"size": size, "N_body": 85_000_000 if size == "d768" else 2_400_000, "variant": variant,
                         "is_baseline": variant == "Baseline", "seed": seed, "gen_acc": a, "train.gen_samples": 1000,
                         "model.tokenizer_ngram": tok, "model.oe.n": oe_n, "model.output_ngram": out_n,
                         "model.od_depth": depth})
    d = _cfg_directions(pd.DataFrame(rows))
    assert d["d128"]["in"]["paper"] == "helps" and d["d128"]["in"]["verdict"].startswith("reproduced")
    assert d["d128"]["out"]["paper"] == "hurts" and d["d128"]["out"]["verdict"].startswith("reproduced")
    assert d["d768"]["out"]["paper"] == "helps" and d["d768"]["out"]["verdict"].startswith("reproduced")
    assert d["d768"]["in"]["verdict"].startswith("not testable")  # 0.51 vs 0.50 over 2,000 samples each
    assert d["d768"]["in"]["ci95"] == pytest.approx(fits.difference_ci(1020, 2000, 1000, 2000))
    assert "mtp" not in d["d768"] and d["d768"]["in"]["seeds"] == 2
    one_size = _cfg_directions(pd.DataFrame([r for r in rows if r["size"] == "d768"]))
    assert set(one_size["d768"]) == {"in"}  # an output's direction depends on the size: none from one size


def test_equivalent_size_from_power_law():
    N = np.array([1e7, 3e7, 1e8, 3e8, 1e9])
    L = 1.8 + 50 * N**-0.3
    r = fits.equivalent_size(N, L, 1.8 + 50 * 4e8**-0.3)
    assert r["N_equivalent"] == pytest.approx(4e8, rel=1e-3) and not r["extrapolated"]


@pytest.mark.parametrize("law,cols", [("chinchilla", ["N", "D", "loss"]), ("loglinear", ["vocab", "loss"])])
def test_fit_law_command(cli, tmp_path, law, cols):
    if law == "chinchilla":
        N, D, L, _ = _chinchilla_data(n=60)
        pd.DataFrame({"N": N, "D": D, "loss": L}).to_parquet(tmp_path / "t.parquet")
    else:
        v = np.array([5e4, 2e5, 8e5, 3.2e6])
        pd.DataFrame({"vocab": v, "loss": 2.6754 - 0.0256 * np.log10(v)}).to_parquet(tmp_path / "t.parquet")
    res = cli("fit-law", law, "t.parquet", "--json", "--bootstrap", "10")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    keys = {"E", "A", "B", "alpha", "beta"} if law == "chinchilla" else {"intercept", "slope"}
    assert set(out["estimates"]) == keys and set(out["ci"]) == keys
    if law == "loglinear":
        assert out["estimates"]["slope"] == pytest.approx(-0.0256, abs=1e-9)


BAD_TABLES = {
    "missing.csv": ("N,D\n1,2\n", "chinchilla", "missing column 'loss'"),
    "nonpos.csv": ("vocab,loss\n0,2.1\n10,2.0\n100,1.9\n", "loglinear", "must be > 0"),
    "few.csv": ("vocab,loss\n10,2.0\n100,1.9\n", "loglinear", "need at least 3"),
    "text.csv": ("vocab,loss\n10,abc\n100,1.9\n1000,1.8\n", "loglinear", "non-numeric"),
    "same.csv": ("vocab,loss\n10,2.0\n10,1.9\n10,1.8\n", "loglinear", "2 distinct"),
}


@pytest.mark.parametrize("name", BAD_TABLES)
def test_bad_tables_exit_2(cli, tmp_path, name):
    text, law, problem = BAD_TABLES[name]
    (tmp_path / name).write_text(text)
    res = cli("fit-law", law, name, "--json")
    assert res.returncode == 2 and problem in res.stderr and name in res.stderr and "Traceback" not in res.stderr


def test_analysis_never_imports_torch(tmp_path):
    code = ("import sys, numpy as np, pandas as pd\n"
            "import analysis.commands, analysis.plots, analysis.fits, analysis.derive, analysis.tables\n"
            "from overtok.export import build_tables\n"
            "analysis.fits.fit_loglinear(np.array([10., 100., 1000.]), np.array([2., 1.9, 1.8]), bootstrap=5)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ngram_variants_losses_are_per_base_token():
    """A 3-gram tokenizer's or 3-gram output's loss covers 3 base tokens; summaries divide it out."""
    import pandas as pd

    from analysis.derive import summarize

    rows, curves = [], []
    for i, (tok, out, loss) in enumerate([(1, 1, 0.8), (3, 1, 2.4), (1, 3, 2.1)]):
        rows.append({"trial_id": f"t{i}", "status": "FINISHED", "model.d_model": 64, "model.n_layers": 2,
                     "model.tokenizer_ngram": tok, "model.output_ngram": out, "model.od_depth": 1, "params.body": 1,
                     "final.val/loss": loss, "tokens_seen": 100, "variant": "Baseline" if i == 0 else f"v{i}",
                     "input_vocab_size": 7})
        curves += [{"trial_id": f"t{i}", "metric": "train/loss", "step": s, "value": loss} for s in (10, 20)]
    s = summarize(pd.DataFrame(rows), pd.DataFrame(curves)).set_index("trial_id")
    assert s.final_val_loss.round(6).to_dict() == {"t0": 0.8, "t1": 0.8, "t2": 0.7}
    assert s.final_train_loss.round(6).to_dict() == {"t0": 0.8, "t1": 0.8, "t2": 0.7}


def test_speedups_are_keyed_by_seed_and_count_seeds_that_miss():
    """A variant listed seed 1 first, reaching the baseline's final loss in seed 1 only: per_seed is keyed by seed and
    the mean covers 1 of 2 seeds, so a seed that never gets there is not silently dropped."""
    from analysis.commands import _speedups

    tokens = np.arange(1, 21) * 1000.0
    base = 5.0 - 0.1 * np.arange(20)  # final 3.1
    rows = [("b0", "Baseline", 0, base), ("b1", "Baseline", 1, base),
            ("v1", "OE", 1, base - 0.2), ("v0", "OE", 0, base + 0.5)]
    s = pd.DataFrame([{"trial_id": t, "variant": v, "seed": sd, "size": "d8", "is_baseline": v == "Baseline", "loss_scale": 1.0}
                      for t, v, sd, _ in rows])
    curves = pd.DataFrame([{"trial_id": t, "metric": "train/loss", "step": x, "value": y}
                           for t, _, _, ys in rows for x, y in zip(tokens, ys)])
    r = _speedups(s, curves)["d8"]["OE"]["train/loss"]
    assert set(r["per_seed"]) == {"0", "1"} and np.isnan(r["per_seed"]["0"]) and r["per_seed"]["1"] > 1
    assert r["n"] == 1 and r["seeds"] == 2 and r["mean"] == pytest.approx(r["per_seed"]["1"])
    # seed 1's baseline missing: seed 1 is not paired with seed 0's baseline, it is left out
    r = _speedups(s[s.trial_id != "b1"], curves)["d8"]["OE"]["train/loss"]
    assert set(r["per_seed"]) == {"0"} and r["seeds"] == 1


def test_speedups_compare_ngram_variants_per_base_token():
    """A 3-gram output head logs a loss over 3 tokens: its curve is divided by 3 before it is compared with the
    baseline's, so a variant at the same loss per base token is at 1x, not "never reached"."""
    from analysis.commands import _speedups

    tokens = np.arange(1, 21) * 1000.0
    base = 2.0 - 0.05 * np.arange(20)
    s = pd.DataFrame([{"trial_id": "b", "variant": "Baseline", "seed": 0, "size": "d8", "is_baseline": True, "loss_scale": 1.0},
                      {"trial_id": "v", "variant": "3-gram output", "seed": 0, "size": "d8", "is_baseline": False,
                       "loss_scale": 3.0}])
    curves = pd.DataFrame([{"trial_id": t, "metric": "train/loss", "step": x, "value": y * k}
                           for t, k in (("b", 1.0), ("v", 3.0)) for x, y in zip(tokens, base)])
    r = _speedups(s, curves)["d8"]["3-gram output"]["train/loss"]
    assert r["mean"] == pytest.approx(1.0)


def test_paired_effects_pairs_seeds_within_cells():
    """Two bodies x {baseline, OE} x 2 seeds: OE's effect per body is the mean of the seed-paired differences of the
    tail-mean train loss and the final held-out loss; the interval pools the seed spread over both bodies."""
    from analysis.effects import effects_markdown, paired_effects, verdict

    runs, curves = [], []
    for body, (d0, d1) in {"rope": (0.10, 0.12), "learned": (-0.30, -0.26)}.items():
        for n in (1, 3):
            for seed in (0, 1):
                tid = f"{body}{n}{seed}"
                shift = (d0 if seed == 0 else d1) if n == 3 else 0.0
                runs.append({"trial_id": tid, "status": "FINISHED", "seed": seed, "model.pos_encoding": body,
                             "model.d_model": 64, "model.oe.n": n, "model.oe.m": 0 if n == 1 else 101,
                             "train.lr": 1e-3, "data.path": f"/x/{seed}", "final.val/loss": 4.0 + seed * 0.01 + shift})
                for step in range(20):  # the last 10 points average to 3.0 + shift (+ seed offset)
                    curves.append({"trial_id": tid, "metric": "train/loss", "step": step,
                                   "value": 9.0 if step < 10 else 3.0 + seed * 0.01 + shift + (0.05 if step % 2 else -0.05)})
    eff = paired_effects(pd.DataFrame(runs), pd.DataFrame(curves)).set_index("cell")
    assert set(eff.index) == {"pos_encoding=rope", "pos_encoding=learned"}
    rope, learned = eff.loc["pos_encoding=rope"], eff.loc["pos_encoding=learned"]
    assert rope.d_train == pytest.approx(0.11) and learned.d_val == pytest.approx(-0.28)
    assert rope.base_train == pytest.approx(3.005)
    assert rope.train_dof == 2  # one degree of freedom per body
    # pooled SD of paired differences: deviations +-0.01 and +-0.02 -> sqrt((2*1e-4 + 2*4e-4) / 2)
    assert rope.train_seed_sd == pytest.approx(math.sqrt(5e-4))
    assert verdict(learned.d_train_lo, learned.d_train_hi) == "helps"
    assert verdict(rope.d_val_lo, rope.d_val_hi) == "hurts"
    assert verdict(-0.1, 0.1) == "no clear effect"
    assert "| pos_encoding=learned | OE n=3 m=101 | 2 |" in effects_markdown(eff.reset_index())


def test_loss_diff_figure_pairs_each_seed_with_its_own_baseline():
    """Fig. 9: the line is the mean over seeds of variant minus the same seed's baseline, the band their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import loss_diff_vs_tokens

    rows, curves = [], []
    for seed, base, oe in ((0, 5.0, 4.9), (1, 6.0, 5.7)):  # differences -0.1 and -0.3; the baselines differ by 1
        for name, loss in (("Baseline", base), ("OE-1K", oe)):
            tid = f"{name}{seed}"
            rows.append({"trial_id": tid, "size": "d64-L2", "is_baseline": name == "Baseline", "variant": name,
                         "seed": seed, "loss_scale": 1.0, "input_vocab_size": 100 if name == "Baseline" else 1100})
            curves += [{"trial_id": tid, "metric": "train/loss", "step": step, "value": loss} for step in (1, 2, 3)]
    fig, ax = plt.subplots()
    loss_diff_vs_tokens(pd.DataFrame(rows), pd.DataFrame(curves), ax, "d64-L2")
    line = ax.get_lines()[0]
    assert line.get_label() == "OE-1K" and line.get_ydata() == pytest.approx([-0.2] * 3)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(-0.3) and band.max() == pytest.approx(-0.1)
    assert "mean and range of 2 seeds" in ax.get_title()
    plt.close(fig)


def test_training_curves_figure_draws_the_mean_over_seeds():
    """Fig. 4: one line per variant, the mean of its seeds' smoothed curves (not the first seed's alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import curves_with_speedup

    rows, curves = [], []
    for seed, loss in ((0, 3.0), (1, 4.0)):
        rows.append({"trial_id": f"b{seed}", "size": "d64-L2", "variant": "Baseline", "seed": seed, "loss_scale": 1.0,
                     "input_vocab_size": 100})
        curves += [{"trial_id": f"b{seed}", "metric": "train/loss", "step": step, "value": loss} for step in (1, 2)]
    fig, ax = plt.subplots()
    curves_with_speedup(pd.DataFrame(rows), pd.DataFrame(curves), ax, "d64-L2", {})
    assert ax.get_lines()[0].get_ydata() == pytest.approx([3.5, 3.5]) and "mean of 2 seeds" in ax.get_title()
    plt.close(fig)


def test_paired_effects_lists_variants_by_their_settings_numerically():
    """Variants in order of their settings' values (m = 9, 80, 700), not in the order the runs arrived or as text."""
    from analysis.effects import paired_effects

    runs, curves = [], []
    for m in (700, 0, 9, 80):
        for seed in (0, 1):
            tid = f"m{m}s{seed}"
            runs.append({"trial_id": tid, "status": "FINISHED", "seed": seed, "model.d_model": 64,
                         "model.oe.n": 2 if m else 1, "model.oe.m": m, "final.val/loss": 4.0 - m / 1e4})
            curves.append({"trial_id": tid, "metric": "train/loss", "step": 1, "value": 5.0 - m / 1e4 + seed / 100})
    eff = paired_effects(pd.DataFrame(runs), pd.DataFrame(curves))
    assert list(eff.variant) == ["OE n=2 m=9", "OE n=2 m=80", "OE n=2 m=700"]
    assert eff.d_train.tolist() == pytest.approx([-0.0009, -0.008, -0.07])


def test_paired_effects_at_tokens_reads_both_losses_at_that_point():
    """--at-tokens T: train loss from the points logged at step <= T, held-out loss from the last evaluation at
    step <= T (OE better early, worse at the end)."""
    from analysis.effects import paired_effects

    runs, curves = [], []
    for n in (1, 3):
        for seed in (0, 1):
            tid = f"t{n}{seed}"
            runs.append({"trial_id": tid, "status": "FINISHED", "seed": seed, "model.d_model": 64, "model.oe.n": n,
                         "model.oe.m": 0 if n == 1 else 101, "final.val/loss": 4.0 + (0.2 if n == 3 else 0)})
            for step in range(1, 21):
                early = step <= 10
                d = (-0.3 if early else 0.1) if n == 3 else 0.0
                curves.append({"trial_id": tid, "metric": "train/loss", "step": step, "value": 5.0 + d + 0.01 * seed})
                if step % 5 == 0:
                    curves.append({"trial_id": tid, "metric": "val/loss", "step": step, "value": 5.5 + d})
    runs, curves = pd.DataFrame(runs), pd.DataFrame(curves)
    end, early = paired_effects(runs, curves).iloc[0], paired_effects(runs, curves, at_tokens=12).iloc[0]
    assert end.d_train == pytest.approx(0.1) and end.d_val == pytest.approx(0.2)
    assert early.d_train == pytest.approx(-0.3 * 0.8 + 0.1 * 0.2) and early.d_val == pytest.approx(-0.3)
    assert early.base_val == pytest.approx(5.5)
    # a trial that stopped before T has no loss at T (as in the fits' losses_at): its seed is not paired there
    cut = runs.assign(tokens_seen=[20, 20, 10, 20])  # t30 (OE, seed 0) trained 10 tokens
    assert paired_effects(cut, curves, at_tokens=12).iloc[0].seeds == 1
    assert paired_effects(cut, curves, at_tokens=8).iloc[0].seeds == 2


def test_fit_law_without_bootstrap_prints_estimates_and_refuses_negative_counts(tmp_path):
    table = tmp_path / "ll.csv"
    table.write_text("vocab,loss\n1000,3.0\n10000,2.9\n100000,2.8\n1000000,2.71\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "overtok", "fit-law", "loglinear", str(table), *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, timeout=120)
    ok = run("--bootstrap", "0")
    assert ok.returncode == 0 and "slope = -0.097" in ok.stdout and "no CI" in ok.stdout, ok.stderr
    bad = run("--bootstrap", "-5")
    assert bad.returncode == 2 and "expected an integer >= 0" in bad.stderr and "Traceback" not in bad.stderr


def test_fit_law_maps_columns_prints_the_formula_and_draws_the_fit(tmp_path):
    rng = np.random.default_rng(0)
    n, d = np.exp(rng.uniform(13, 18, 40)), np.exp(rng.uniform(16, 21, 40))
    loss = 1.8 + 400 / n**0.34 + 400 / d**0.28
    pd.DataFrame({"params": n, "tokens": d, "loss": loss}).to_csv(tmp_path / "t.csv", index=False)
    run = lambda *a: subprocess.run([sys.executable, "-m", "overtok", "fit-law", "chinchilla", str(tmp_path / "t.csv"),  # noqa: E731
                                     *a], capture_output=True, text=True, cwd=ROOT, timeout=600)
    res = run("--columns", "params=N,tokens=D", "--bootstrap", "4", "--plot", str(tmp_path / "fit.png"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("L(N, D) = 1.8") and "bootstrap 4/4" in res.stderr
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    missing = run("--bootstrap", "0")  # without the mapping the law's columns are missing
    assert missing.returncode == 2 and "missing column 'N'" in missing.stderr
    pd.DataFrame({"N": 1e8, "D": d, "loss": loss}).to_csv(tmp_path / "flat.csv", index=False)
    flat = subprocess.run([sys.executable, "-m", "overtok", "fit-law", "chinchilla", str(tmp_path / "flat.csv")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert flat.returncode == 2 and "column 'N' needs at least 2 distinct values" in flat.stderr


def test_loglinear_at_tokens_reads_the_losses_at_that_point():
    """`fit --at-tokens T`: the law again with train loss from the points logged at step <= T and held-out loss from
    the last evaluation at step <= T; a trial that trained on fewer tokens is left out."""
    from analysis.derive import losses_at

    ms = [0, 1_000, 10_000, 100_000]
    rows, curves = [], []
    for i, m in enumerate(ms):
        tid = f"t{i}"
        rows.append({"trial_id": tid, "model.oe.m": m, "model.oe.n": 1 if m == 0 else 2, "model.od_depth": 1,
                     "model.tokenizer_ngram": 1, "model.output_ngram": 1, "size": "d8-L1", "N_body": 1000,
                     "input_vocab_size": 100 + m, "seed": 0, "loss_scale": 1.0, "tokens": 200,
                     "final_train_loss": 9.0, "final_val_loss": 9.0})
        early = 3.0 - (0.01 * math.log10(m) if m else 0)  # slope -0.01 per decade of m up to step 100
        for step in range(10, 201, 10):
            curves.append({"trial_id": tid, "metric": "train/loss", "step": step, "value": early if step <= 100 else 1.0})
        for step in (100, 200):
            curves.append({"trial_id": tid, "metric": "val/loss", "step": step, "value": early + 0.5 if step == 100 else 2.0})
    s, curves = pd.DataFrame(rows), pd.DataFrame(curves)
    at = losses_at(s, curves, 100)
    assert at.final_train_loss.tolist() == pytest.approx([3.0] + [3.0 - 0.01 * math.log10(m) for m in ms[1:]])
    assert at.final_val_loss.tolist() == pytest.approx((at.final_train_loss + 0.5).tolist())
    assert losses_at(s.assign(tokens=[200, 200, 50, 200]), curves, 100).final_train_loss.isna().tolist() == [
        False, False, True, False]
    from analysis.commands import _loglinear_fits

    fit = _loglinear_fits(at, bootstrap=20, axis="m")["final_train_loss"]["d8-L1"]
    assert fit["estimates"]["slope"] == pytest.approx(-0.01) and fit["n_points"] == 3


def test_fit_at_tokens_on_a_committed_export(cli, tmp_path):
    """`overtok fit DIR --at-tokens T T2` writes both points' fits; a T that is not a positive integer is one line."""
    import shutil

    shutil.copytree(ROOT / "results" / "loglinear_code" / "merged", tmp_path / "exp",
                    ignore=shutil.ignore_patterns("figures", "fits.json"))
    res = cli("fit", "exp", "--bootstrap", "10", "--at-tokens", "55836672", "111673344")
    assert res.returncode == 0, res.stderr
    at = json.loads((tmp_path / "exp" / "fits.json").read_text())["loglinear_at_tokens"]
    assert set(at) == {"55836672", "111673344"}
    assert at["55836672"]["loglinear_m"]["final_train_loss"]["d512-L8"]["n_points"] >= 5
    bad = cli("fit", "exp", "--at-tokens", "-3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--at-tokens" in bad.stderr, bad.stderr


def test_report_takes_the_fits_bootstrap_and_points(cli, tmp_path):
    """`overtok report DIR --bootstrap N --at-tokens T`: the page and a fits.json that `overtok fit` with the same
    options would write, in one command."""
    import shutil

    shutil.copytree(ROOT / "results" / "loglinear_code" / "merged", tmp_path / "exp",
                    ignore=shutil.ignore_patterns("figures", "fits.json"))
    res = cli("report", "exp", "--bootstrap", "7", "--at-tokens", "55836672", timeout=600)
    assert res.returncode == 0, res.stderr
    fitted = json.loads((tmp_path / "exp" / "fits.json").read_text())
    assert list(fitted["loglinear_at_tokens"]) == ["55836672"]
    assert fitted["loglinear_m"]["final_train_loss"]["d512-L8"]["bootstrap"] == 7
    page = (tmp_path / "dashboards" / "loglinear_code" / "index.html").read_text()
    assert "at 55,836,672 tokens" in page


def test_effects_command_on_a_committed_export():
    """`overtok effects` of the committed epoch-sampler diagnosis: the paired table at the end and at a token count
    every trial reached; a count past every trial's end is one line (exit 2), not a table of end-of-run values."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "overtok", "effects", "results/oe_diagnosis/run_epoch",  # noqa: E731
                                     *a], capture_output=True, text=True, cwd=ROOT, timeout=120)
    end, early, past = run(), run("--at-tokens", "5000000"), run("--at-tokens", "55836672")
    assert end.returncode == 0 and "| OE-1M (3-gram) | 2 |" in end.stdout, end.stderr
    assert early.returncode == 0 and early.stdout != end.stdout and "| OE-1M (3-gram) | 2 |" in early.stdout
    assert past.returncode == 2 and past.stdout == "" and "Traceback" not in past.stderr
    assert past.stderr.strip() == ("overtok: error: --at-tokens: 55,836,672: no finished trial trained that many "
                                   "tokens (the longest trained 19,660,800)")


def test_accuracy_curve_pools_seeds_and_suggests_the_first_budget_inside_the_band():
    """fits.json's cfg_accuracy_curve: at each evaluation the accepted samples of both seeds pooled, a Wilson
    interval, and the budget = the first evaluation whose interval lies inside [0.2, 0.8]; a curve that never
    leaves 0 gets no budget and says to train longer. Drawn and listed on the page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis import plots
    from analysis.commands import _accuracy_curves
    from overtok.report import _fits_html

    rows, curves = [], []
    rising = {1000: (0.02, 0.04), 2000: (0.15, 0.25), 3000: (0.40, 0.50), 4000: (0.85, 0.95)}
    for variant, size, accs in (("Baseline", "d768-L12", rising), ("Baseline", "d128-L12", None)):
        for seed in (0, 1):
            tid = f"{size}{seed}"
            rows.append({"trial_id": tid, "size": size, "variant": variant, "seed": seed, "train.gen_samples": 1000})
            for step in (1000, 2000, 3000, 4000):
                value = accs[step][seed] if accs else 0.0
                curves.append({"trial_id": tid, "metric": "val/gen_acc", "step": step, "value": value})
    curve = _accuracy_curves(pd.DataFrame(rows), pd.DataFrame(curves))
    big, small = curve["d768-L12"]["Baseline"], curve["d128-L12"]["Baseline"]
    second = big["points"][1]
    assert (second["accepted"], second["samples"]) == (400, 2000) and second["accuracy"] == pytest.approx(0.2)
    assert second["ci95"] == pytest.approx(fits.wilson_ci(400, 2000))
    assert second["ci95"][0] < 0.2  # 0.2 itself is not clearly inside the band: the next evaluation is the budget
    assert big["budget"]["tokens"] == 3000 and big["budget"]["accuracy"] == pytest.approx(0.45)
    assert small["budget"] is None and "train longer" in small["why"]
    fig, ax = plt.subplots()
    plots.cfg_accuracy_curve(curve, ax)
    assert len(ax.lines) >= 3 and any("budget 3,000 tokens" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
    page = _fits_html({"cfg_accuracy_curve": curve})
    assert "3,000 tokens: 0.4500" in page and "below 0.2 at every evaluation up to 4,000 tokens" in page
