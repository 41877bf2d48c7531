"""`overtok fit`, `overtok plots` and `overtok fit-law`: the only code here that writes files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import fits, plots
from analysis.derive import loglinear_points, loss_curve, losses_at, summarize, variant_order
from analysis.effects import TRAIN_LOSS
from analysis.tables import TableError, load_export, read_table, require

MIN_POINTS = {"chinchilla": 6, "loglinear": 3}


def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def parse_columns(spec: str) -> dict[str, str]:
    """'params=N,tokens=D' -> {'params': 'N', 'tokens': 'D'}: the table's column names mapped to the law's."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise TableError(f"--columns: expected TABLE_COLUMN=LAW_COLUMN items separated by commas, got {item!r}")
        out[src.strip()] = dst.strip()
    return out


def _check_spread(t: pd.DataFrame, columns: list[str], table: str) -> None:
    """A law cannot be fitted along a column that does not vary, or whose values overflow on the log scale."""
    for c in columns:
        if t[c].nunique() < 2:
            raise TableError(f"{table}: column {c!r} needs at least 2 distinct values (it is constant)")
        if not np.isfinite(np.log(t[c].to_numpy(float))).all() or (t[c] > 1e300).any():
            raise TableError(f"{table}: column {c!r} has values too large to fit")


def fit_law_table(law: str, table: str, bootstrap: int = 100, seed: int = 0, columns: str = "",
                  progress=None, plot: str = "") -> dict:
    df = read_table(table).rename(columns=parse_columns(columns))
    if law == "chinchilla":
        t = require(df, ["N", "D", "loss"], positive=["N", "D", "loss"], min_rows=MIN_POINTS[law], name=table)
        _check_spread(t, ["N", "D"], table)
        res = fits.fit_chinchilla(t.N, t.D, t.loss, bootstrap=bootstrap, seed=seed, progress=progress)
    else:
        t = require(df, ["vocab", "loss"], positive=["vocab", "loss"], min_rows=MIN_POINTS[law], name=table)
        _check_spread(t, ["vocab"], table)
        res = fits.fit_loglinear(t.vocab, t.loss, bootstrap=bootstrap, seed=seed)
    out = _clean(res.to_dict())
    out["formula"] = fits.formula(law, res.estimates)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        plots.law_axes(law, t, res.estimates, ax)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        out["plot"] = plot
    return out


# ----------------------------------------------------------------------------------------------
# fits.json of a sweep


def _loglinear_fits(s: pd.DataFrame, bootstrap: int, axis: str = "vocab") -> dict:
    """Per model size, OD depth 1 and 1-gram tokenizer/output runs: loss vs log10 of the input vocabulary
    (``axis`` 'vocab': V + the OE table rows, V for baselines) or of the table rows m alone ('m': OE runs only, as
    the paper writes its law)."""
    out = {}
    base, x_col = loglinear_points(s, axis)
    label = ("V + OE table rows for OE runs, V for baselines" if axis == "vocab"
             else "OE table rows m of a slice, OE runs only")
    for metric in ("final_train_loss", "final_val_loss"):
        per_size = {}
        for size, g in base.groupby("size", sort=False):
            g = g[np.isfinite(g[metric])]
            if g[x_col].nunique() >= 2 and len(g) >= 2:
                r = fits.fit_loglinear(g[x_col], g[metric], bootstrap=bootstrap, groups=g["seed"].to_numpy())
                r.notes.update({"tokens": int(g.tokens.max()), "N_body": int(g.N_body.iloc[0]), "vocab_axis": label,
                                "verdict": fits.loglinear_verdict(r.ci["slope"], r.notes["seeds"]),
                                "local_slopes": fits.local_slopes(g[x_col], g[metric], g["seed"])})
                per_size[size] = r.to_dict()
        out[metric] = per_size
    return out


def _chinchilla_fits(s: pd.DataFrame, curves: pd.DataFrame, bootstrap: int) -> dict:
    """Per variant with >= 3 sizes: L(N, D) over the validation curve points, under each N convention."""
    out = {}
    for name, g in s.groupby("variant"):
        if g.N_body.nunique() < 3:  # A and alpha are not identifiable from two sizes
            continue
        pts = []
        for row in g.itertuples():
            x, y = loss_curve(curves, s, row.trial_id, "val/loss")
            pts += [(row.trial_id, d, v) for d, v in zip(x, y) if d > 0]
        if len(pts) < MIN_POINTS["chinchilla"]:
            continue
        p = pd.DataFrame(pts, columns=["trial_id", "D", "loss"]).merge(
            g[["trial_id", "N_body", "N_body+embedding", "N_all"]], on="trial_id")
        out[name] = {conv: fits.fit_chinchilla(p[f"N_{conv}"], p.D, p.loss, bootstrap=bootstrap).to_dict()
                     | {"N_convention": conv, "points": "validation-loss curve points (D = tokens seen)"}
                     for conv in ("body", "body+embedding", "all")}
    return out


def _speedups(s: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """Per size and variant: tokens-to-target speedup vs the same-seed baseline, mean and CI over seeds (a seed
    without its baseline is left out)."""
    out: dict[str, dict] = {}
    for size, g in s.groupby("size", sort=False):
        base = g[g.is_baseline]
        if base.empty:
            continue
        for name in variant_order(g[~g.is_baseline]):
            v = g[g.variant == name]
            per_metric = {}
            for metric, higher in (("train/loss", False), ("val/gen_acc", True)):
                per_seed: dict[str, float] = {}
                for row in v.sort_values("seed").itertuples():
                    b = base[base.seed == row.seed]
                    if b.empty:  # no baseline of this seed: no pair (another seed's would mix seed noise in)
                        continue
                    bx, by = loss_curve(curves, s, b.trial_id.iloc[0], metric)
                    vx, vy = loss_curve(curves, s, row.trial_id, metric)
                    if len(bx) < 2 or len(vx) < 2 or (higher and by[-1] <= 0):
                        continue
                    per_seed[str(row.seed)] = fits.speedup(bx, by, vx, vy, smooth=0.1 if not higher else None,
                                                           higher_is_better=higher)["speedup"]
                # mean and CI over the seeds that reach the target; how many do not is kept next to them
                summary = fits.mean_ci(list(per_seed.values()))
                verdict = fits.speedup_verdict(summary, len(per_seed))
                if summary["n"]:
                    per_metric[metric] = summary | {"seeds": len(per_seed), "per_seed": per_seed, "verdict": verdict}
                elif per_seed:  # variants that never reach the baseline's final value are listed as such
                    per_metric[metric] = {"not_reached": True, "seeds": len(per_seed), "per_seed": per_seed,
                                          "verdict": verdict}
            if per_metric:
                out.setdefault(size, {})[name] = per_metric
    return out


def _equivalent_sizes(s: pd.DataFrame) -> dict:
    base = s[s.is_baseline].groupby("N_body")["final_train_loss"].mean()
    out = {}
    if len(base) < 2:
        return out
    for row in s[~s.is_baseline].groupby(["size", "variant"], sort=False).agg(
            N=("N_body", "first"), loss=("final_train_loss", "mean")).reset_index().itertuples():
        eq = fits.equivalent_size(base.index, base.values, row.loss)
        eq["ratio"] = eq["N_equivalent"] / row.N if eq.get("N_equivalent") else float("nan")
        out.setdefault(row.size, {})[row.variant] = eq | {"N_body": int(row.N), "loss": row.loss}
    return out


def _accepted(accuracy, samples) -> tuple[int, int]:
    """(accepted, sampled) sentences of some evaluations, pooled over them: each one's accuracy and sample count."""
    accuracy, samples = np.asarray(accuracy, float), np.asarray(samples, float)
    return int(round(float((accuracy * samples).sum()))), int(samples.sum())


def _generation_cis(s: pd.DataFrame) -> dict:
    """Accepted samples pooled over seeds, with a 95% Wilson interval: {variant: {size: {...}}}."""
    if not s["gen_acc"].notna().any() or "train.gen_samples" not in s.columns:
        return {}
    out: dict = {}
    for (size, variant), g in s[s.gen_acc.notna()].groupby(["size", "variant"]):
        k, n = _accepted(g.gen_acc, g["train.gen_samples"])
        out.setdefault(variant, {})[size] = {"accuracy": k / n, "accepted": k, "samples": n,
                                             "ci95": fits.wilson_ci(k, n), "seeds": int(len(g))}
    return out


ACCURACY_BAND = (0.2, 0.8)
"""Where a CFG budget should put the baseline's generation accuracy (issue: clearly above 0, below saturation): a
variant can then be seen to help or to hurt."""


CURVE_NOTE = ("generation accuracy at each evaluation during training, samples pooled over seeds, 95% Wilson "
              f"interval; budget = the fewest tokens whose interval lies inside {list(ACCURACY_BAND)}; trials that did "
              "not finish (e.g. stopped by a time limit) count with the evaluations they logged (unfinished)")


def _accuracy_curves(s: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """Generation accuracy over training, per size and variant, for trials that evaluated it at two or more points
    (``train.gen_every``): at each evaluation the accepted samples pooled over seeds with a 95% Wilson interval, and
    the budget the curve suggests, the fewest tokens at which that interval lies inside ``ACCURACY_BAND`` (none,
    with the reason, where no evaluation does). ``s`` may hold trials that did not finish (a ``status`` other than
    FINISHED): their evaluations count, and ``unfinished`` names them.
    {size: {variant: {"points": [...], "budget": {...} | None, "why": ..., "unfinished": [...]}}}."""
    if "train.gen_samples" not in s.columns:
        return {}
    acc = curves[(curves.metric == "val/gen_acc") & curves.trial_id.isin(s.trial_id)]
    samples = s.set_index("trial_id")["train.gen_samples"].astype(float)
    lo_band, hi_band = ACCURACY_BAND
    out: dict = {}
    for (size, variant), g in s.groupby(["size", "variant"], sort=False):
        pts = acc[acc.trial_id.isin(g.trial_id)]
        if pts.step.nunique() < 2:
            continue
        points = []
        for step, at in pts.groupby("step"):
            k, n = _accepted(at.value, samples.loc[at.trial_id])
            points.append({"tokens": int(step), "accuracy": k / n, "accepted": k, "samples": n,
                           "ci95": fits.wilson_ci(k, n), "seeds": int(len(at))})
        inside = [p for p in points if lo_band <= p["ci95"][0] and p["ci95"][1] <= hi_band]
        if inside:
            budget, why = inside[0], f"the first evaluation whose 95% interval lies inside {list(ACCURACY_BAND)}"
        elif all(p["ci95"][1] < lo_band for p in points):
            budget, why = None, f"below {lo_band} at every evaluation up to {points[-1]['tokens']:,} tokens: train longer"
        elif points[0]["ci95"][0] > hi_band:
            budget, why = None, f"above {hi_band} from the first evaluation ({points[0]['tokens']:,} tokens): fewer"
        else:
            budget, why = None, f"no evaluation's interval lies inside {list(ACCURACY_BAND)}: evaluate more often"
        unfinished = sorted(g.trial_id[g.status != "FINISHED"]) if "status" in g else []
        out.setdefault(size, {})[variant] = {"points": points, "budget": budget, "why": why,
                                             "band": list(ACCURACY_BAND), "unfinished": unfinished}
    return out


def _every_trial(runs: pd.DataFrame) -> pd.DataFrame:
    """Every trial of an export, finished or not, with its size label: what the accuracy curve reads (a trial that
    a time limit stopped still shows how far its accuracy got)."""
    from analysis.derive import size_label

    if runs.empty:
        return runs
    return runs.assign(size=[size_label(r) for r in runs.to_dict("records")])


def _cfg_directions(s: pd.DataFrame) -> dict:
    """The paper's Fig. 2 directions on generation accuracy, per size: an n-gram input (OE alone) helps every size;
    an n-gram output and an n-gram tokenizer help the largest model and hurt the smallest (a sweep of one size
    gets no verdict for those). Accepted samples pooled over seeds for the variant and the baseline of the same
    size; the difference's 95% interval (Newcombe, from Wilson intervals) decides. {size: {variant: {...}}}."""
    if not s["gen_acc"].notna().any() or "train.gen_samples" not in s.columns:
        return {}
    g = s[s.gen_acc.notna()]
    sizes = g.groupby("size")["N_body"].first().sort_values()
    out: dict = {}
    for size, at in g.groupby("size", sort=False):
        base = at[at.is_baseline]
        if base.empty:
            continue
        kb, nb = _accepted(base.gen_acc, base["train.gen_samples"])
        for variant, v in at[~at.is_baseline].groupby("variant"):
            row = v.iloc[0]
            ngram_io = row.get("model.tokenizer_ngram", 1) > 1 or row.get("model.output_ngram", 1) > 1
            if ngram_io and len(sizes) >= 2 and size in (sizes.index[0], sizes.index[-1]):
                expected = 1 if size == sizes.index[-1] else -1
            elif not ngram_io and row.get("model.oe.n", 1) > 1 and row.get("model.od_depth", 1) == 1:
                expected = 1
            else:
                continue
            kv, nv = _accepted(v.gen_acc, v["train.gen_samples"])
            ci = fits.difference_ci(kv, nv, kb, nb)
            seeds = int(min(v.seed.nunique(), base.seed.nunique()))
            out.setdefault(size, {})[variant] = {
                "accuracy": kv / nv, "baseline_accuracy": kb / nb, "difference": kv / nv - kb / nb, "ci95": ci,
                "paper": "helps" if expected > 0 else "hurts", "seeds": seeds,
                "verdict": fits.direction_verdict(ci, expected, seeds)}
    return out


def fit_sweep(results_dir: Path, bootstrap: int = 200, at_tokens: list[float] | tuple = ()) -> Path:
    """fits.json of an export; with ``at_tokens``, the log-linear fits again with the losses read at each of those
    points of training (``loglinear_at_tokens``), e.g. the end of the first epoch, before the training loss counts
    repeated text."""
    runs, curves = load_export(results_dir)
    s = summarize(runs, curves)
    accuracy_curve = _accuracy_curves(_every_trial(runs), curves)
    if s.empty and not accuracy_curve:
        raise TableError(f"{results_dir}: no FINISHED trials to fit")
    if s.empty:  # only unfinished trials, with an accuracy curve: that curve alone
        result = {"sweep": str(runs.sweep.iloc[0]), "trials_finished": 0, "trials_total": int(len(runs)),
                  "cfg_accuracy_curve": accuracy_curve, "notes": {"cfg accuracy curve": CURVE_NOTE}}
    else:
        result = _fits_of_finished(s, curves, runs, accuracy_curve, bootstrap, at_tokens)
    path = Path(results_dir) / "fits.json"
    path.write_text(json.dumps(_clean(result), indent=2))
    return path


def _fits_of_finished(s: pd.DataFrame, curves: pd.DataFrame, runs: pd.DataFrame, accuracy_curve: dict,
                      bootstrap: int, at_tokens) -> dict:
    """fits.json's content when some trials finished: every law fitted to them, with the accuracy curve."""
    return {
        "sweep": str(runs.sweep.iloc[0]), "trials_finished": int(len(s)), "trials_total": int(len(runs)),
        "loglinear": _loglinear_fits(s, bootstrap),
        "loglinear_m": _loglinear_fits(s, bootstrap, axis="m"),
        "chinchilla": _chinchilla_fits(s, curves, max(bootstrap // 4, 10)),
        "speedup": _speedups(s, curves),
        "equivalent_baseline_size": _equivalent_sizes(s),
        "cfg_generation_accuracy": (s.groupby(["size", "variant"])["gen_acc"].mean().unstack().to_dict()
                                    if s["gen_acc"].notna().any() else {}),
        "cfg_generation_accuracy_ci": _generation_cis(s),
        "cfg_directions": _cfg_directions(s),
        "cfg_accuracy_curve": accuracy_curve,
        "loglinear_at_tokens": {str(int(t)): {"loglinear": _loglinear_fits(at, bootstrap),
                                              "loglinear_m": _loglinear_fits(at, bootstrap, "m")}
                                for t, at in ((t, losses_at(s, curves, t)) for t in at_tokens)},
        "notes": {"train loss": TRAIN_LOSS + " (n-gram tokenizer or output: divided by tokenizer_ngram x output_ngram)",
                  "generation accuracy": "accepted / sampled sentences (prompt: a sentence end), pooled over "
                                         "seeds; 95% Wilson interval",
                  "cfg directions": "variant minus baseline accuracy of the same size, samples pooled over seeds, "
                                    "95% Newcombe interval; verdict against the paper's direction (Fig. 2)",
                  "cfg accuracy curve": CURVE_NOTE,
                  "speedup": "tokens the baseline needs to reach its final EMA loss / tokens the variant needs "
                             "(linear interpolation), same seed; per_seed keyed by seed (NaN/null: never reached); "
                             "mean and Student t 95% interval over the seeds that reach it (n of seeds); verdict against "
                             "the paper's speedup (a seed that never reaches it counts against)"},
    }


# ----------------------------------------------------------------------------------------------
# figures


def save_png(fig, path: Path) -> None:
    """A figure as a PNG of at most 256 colours: line plots on white lose nothing visible and the file is about a
    third of matplotlib's RGBA one (the report page embeds every figure; results travel with the checkout)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    img = Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, optimize=True)


def plot_sweep(results_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, curves = load_export(results_dir)
    s = summarize(runs, curves)
    fit_path = Path(results_dir) / "fits.json"
    fitted = json.loads(fit_path.read_text()) if fit_path.exists() else {}
    if s.empty and not fitted.get("cfg_accuracy_curve"):
        raise TableError(f"{results_dir}: no FINISHED trials to plot")
    out = Path(results_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name):
        save_png(fig, out / f"{name}.png")
        fig.savefig(out / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})  # same figure, same bytes
        written.extend([out / f"{name}.png", out / f"{name}.pdf"])
        plt.close(fig)

    with plt.rc_context(plots.PAPER_STYLE):
        if fitted.get("cfg_accuracy_curve"):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            save(plots.cfg_accuracy_curve(fitted["cfg_accuracy_curve"], ax).figure, "fig2_cfg_accuracy_curve")
    if not s.empty:
        _plot_finished(s, curves, fitted, save, plt)
        t2 = plots.table2(s)
        t2.to_csv(out / "table2.csv", index=False)
        (out / "table2.md").write_text(_markdown(t2))
        written += [out / "table2.csv", out / "table2.md"]
    for stale in out.iterdir():  # figures an earlier export made that this one does not: gone, not shown stale
        if stale.suffix in (".png", ".pdf") and stale not in written and not stale.is_symlink():
            stale.unlink()
    return written


def _plot_finished(s: pd.DataFrame, curves: pd.DataFrame, fitted: dict, save, plt) -> None:
    """The figures of the finished trials (all but the accuracy curve)."""
    with plt.rc_context(plots.PAPER_STYLE):
        if s.N_body.nunique() >= 2:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            save(plots.loss_vs_size(s, ax).figure, "fig1_loss_vs_size")
        if s.gen_acc.notna().any():
            fig, ax = plt.subplots(figsize=(7, 4.5))
            save(plots.cfg_accuracy(s, ax).figure, "fig2_cfg_accuracy")
        sizes = list(dict.fromkeys(s.sort_values("N_body")["size"]))
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            plots.curves_with_speedup(s, curves, ax, size, {k: {n: m.get("train/loss", {}) for n, m in v.items()}
                                                            for k, v in fitted.get("speedup", {}).items()})
        save(fig, "fig4_curves_speedup")
        if loglinear_points(s, "vocab")[0].input_vocab_size.nunique() >= 2:
            # one row per loss (training, as the paper; held-out where the trials evaluated): against V + m, and
            # against m over the OE runs (the paper's own axis) where those were fitted
            metrics = [m for m in ("final_train_loss", "final_val_loss") if m == "final_train_loss" or s[m].notna().any()]
            by_m = bool(fitted.get("loglinear_m", {}).get("final_train_loss"))
            fig, axes = plt.subplots(len(metrics), 2 if by_m else 1, figsize=(14 if by_m else 7, 4.5 * len(metrics)),
                                     squeeze=False)
            for row, metric in zip(axes, metrics):
                plots.loss_vs_vocab(s, row[0], fitted.get("loglinear", {}).get(metric, {}), metric)
                if by_m:
                    plots.loss_vs_vocab(s, row[1], fitted.get("loglinear_m", {}).get(metric, {}), metric, axis="m")
            fig.tight_layout()
            save(fig, "fig5_loss_vs_vocab")
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            plots.loss_diff_vs_tokens(s, curves, ax, size)
        save(fig, "fig9_loss_diff")


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
