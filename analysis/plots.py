"""Paper-style figures. Each takes DataFrames and an Axes and returns the Axes; only commands write files."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.derive import loglinear_points, loss_curve, variant_order
from analysis.fits import complete_groups, ema

PAPER_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
               "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 120}


def _legend(ax) -> None:
    """A legend where something is labelled (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend()


def _over_seeds(what: str, counts: set[int]) -> str:
    """A title's note on lines drawn over seeds (``counts``: how many seeds each line took), none for one seed."""
    n = "/".join(map(str, sorted(counts)))
    return f" ({what} of {n} seeds)" if n not in ("", "1") else ""


def loss_vs_size(summary: pd.DataFrame, ax, metric: str = "final_train_loss"):
    """Paper Fig. 1: loss against model size (non-embedding parameters, log axis), one line per input vocabulary."""
    for name in variant_order(summary):
        g = summary[summary.variant == name].groupby("N_body")[metric].mean()
        ax.plot(g.index, g.values, marker="o", label=name, lw=2 if name == "Baseline" else 1.3,
                color="k" if name == "Baseline" else None)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("training loss" if "train" in metric else "validation loss")
    ax.set_title("Loss vs model size")
    _legend(ax)
    return ax


def cfg_accuracy_curve(curves: dict, ax):
    """Generation accuracy over training with its 95% Wilson band, per size and variant (``fits.json``'s
    ``cfg_accuracy_curve``), the band a budget should reach and each curve's suggested budget (a star)."""
    band = None
    for size, per_variant in curves.items():
        for variant, c in per_variant.items():
            x = np.array([p["tokens"] for p in c["points"]], float)
            y = np.array([p["accuracy"] for p in c["points"]])
            lo, hi = (np.array([p["ci95"][i] for p in c["points"]]) for i in (0, 1))
            cut = " (not finished)" if c.get("unfinished") else ""
            line = ax.plot(x, y, "o-", ms=3, label=f"{size} {variant}{cut}")[0]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            if c.get("budget"):
                ax.plot([c["budget"]["tokens"]], [c["budget"]["accuracy"]], "*", ms=14, color=line.get_color(),
                        label=f"{size} {variant}: budget {c['budget']['tokens']:,.0f} tokens")
            band = c.get("band", band)
    if band:
        for level in band:
            ax.axhline(level, color="0.5", ls="--", lw=1)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("tokens")
    ax.set_ylabel("generation accuracy")
    ax.set_title("CFG generation accuracy during training")
    _legend(ax)
    return ax


def cfg_accuracy(summary: pd.DataFrame, ax):
    """Paper Fig. 2: generation accuracy on the CFG by model size and variant (grouped bars)."""
    sizes = list(dict.fromkeys(summary.sort_values("N_body")["size"]))
    names = variant_order(summary)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        acc = [summary[(summary["size"] == s) & (summary.variant == name)]["gen_acc"].mean() for s in sizes]
        x = np.arange(len(sizes)) + (i - (len(names) - 1) / 2) * width
        ax.bar(x, np.nan_to_num(acc), width, label=name)
    ax.set_xticks(np.arange(len(sizes)), sizes)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("generation accuracy")
    ax.set_title("CFG generation accuracy")
    _legend(ax)
    return ax


def curves_with_speedup(summary: pd.DataFrame, curves: pd.DataFrame, ax, size: str, speedups: dict,
                        metric: str = "train/loss"):
    """Paper Fig. 4: training curves at one model size (each variant's EMA-smoothed curve, the mean over its seeds),
    each variant annotated with its tokens-to-target speedup (the mean over seeds)."""
    sub = summary[summary["size"] == size]
    seeds_drawn = set()
    for name in variant_order(sub):
        runs = sub[sub.variant == name].sort_values("seed").drop_duplicates("seed")
        x, ys = None, []
        for tid in runs.trial_id:
            tx, ty = loss_curve(curves, sub, tid, metric)
            if len(tx) == 0:
                continue
            x = tx if x is None else x
            ys.append(np.interp(x, tx, ema(ty, 0.1)))
        if not ys:
            continue
        label = name
        sp = speedups.get(size, {}).get(name)
        if sp and sp.get("mean") is not None:
            label += f" ({sp['mean']:.2f}x)"
        ax.plot(x, np.mean(ys, axis=0), label=label, color="k" if name == "Baseline" else None)
        seeds_drawn.add(len(ys))
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss per base token (EMA)")
    ax.set_title(f"Training curves, {size}" + _over_seeds("mean", seeds_drawn))
    _legend(ax)
    return ax


def loss_vs_vocab(summary: pd.DataFrame, ax, fits: dict, metric: str = "final_train_loss", axis: str = "vocab"):
    """Paper Fig. 5: loss against the input vocabulary (log axis) per model size, every trial the fit takes
    (``analysis.derive.loglinear_points``) a point, with the fitted line and its equation. ``axis`` 'vocab': V + m,
    baselines at V; 'm': the table rows m of the OE runs, as the paper writes its law. Seeds without a run at every
    size are drawn hollow: the fit leaves them out."""
    points, x_col = loglinear_points(summary, axis)
    x_label = "V+m" if axis == "vocab" else "m"
    for size, g in points.groupby("size", sort=False):
        every = set(g[x_col])
        complete = g.seed.isin(complete_groups(g[x_col].to_numpy(), g.seed.to_numpy())).to_numpy()
        line = ax.plot(g[x_col][complete], g[metric][complete], "o", label=size)[0]
        if (~complete).any():
            ax.plot(g[x_col][~complete], g[metric][~complete], "o", mfc="none", color=line.get_color(),
                    label=f"{size}: seeds without every size (not in the fit)")
        fit = fits.get(size)
        if fit:
            xs = np.logspace(np.log10(min(every)), np.log10(max(every)), 50)
            a, b = fit["estimates"]["intercept"], fit["estimates"]["slope"]
            lo, hi = fit["ci"]["slope"]
            interval = "no CI" if lo is None or hi is None or np.isnan([lo, hi]).any() else f"slope CI {lo:.4f}, {hi:.4f}"
            ax.plot(xs, a + b * np.log10(xs), "--", color=line.get_color(),
                    label=f"L = {a:.4f} {'-' if b < 0 else '+'} {abs(b):.4f} log10({x_label})  [{interval}]")
    ax.set_xscale("log")
    ax.set_xlabel("input vocabulary size (V + m)" if axis == "vocab" else "OE table rows per slice (m)")
    ax.set_ylabel("training loss" if "train" in metric else "held-out loss")
    loss = "Training loss" if "train" in metric else "Held-out loss"
    ax.set_title(f"{loss} vs input vocabulary" if axis == "vocab" else f"{loss} vs OE table size (OE runs)")
    ax.legend(fontsize=8)
    return ax


def loss_diff_vs_tokens(summary: pd.DataFrame, curves: pd.DataFrame, ax, size: str, metric: str = "train/loss"):
    """Paper Fig. 9: loss difference to the baseline along training at one size (negative = better). Each seed's
    variant is compared with the baseline of the same seed (EMA-smoothed curves, the variant's steps); the line is
    the mean over the seeds both have, the band their range."""
    sub = summary[summary["size"] == size]
    base = sub[sub.is_baseline].drop_duplicates("seed").set_index("seed")
    if base.empty:
        ax.set_title(f"{size}: no baseline")
        return ax
    seeds_drawn = set()
    for name in variant_order(sub):
        if name == "Baseline":
            continue
        var = sub[sub.variant == name].drop_duplicates("seed").set_index("seed")
        seeds = sorted(set(var.index) & set(base.index))
        if not seeds:
            continue
        diffs, x = [], None
        for seed in seeds:
            bx, by = loss_curve(curves, sub, base.loc[seed, "trial_id"], metric)
            vx, vy = loss_curve(curves, sub, var.loc[seed, "trial_id"], metric)
            if x is None:
                x = vx
            diffs.append(np.interp(x, vx, ema(vy, 0.1)) - np.interp(x, bx, ema(by, 0.1)))
        diffs = np.asarray(diffs)
        line = ax.plot(x, diffs.mean(axis=0), label=name)[0]
        if len(seeds) > 1:
            ax.fill_between(x, diffs.min(axis=0), diffs.max(axis=0), color=line.get_color(), alpha=0.15, lw=0)
        seeds_drawn.add(len(seeds))
    ax.axhline(0, color="k", lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss - baseline loss (same seed)")
    ax.set_title(f"Loss difference to baseline, {size}" + _over_seeds("mean and range", seeds_drawn))
    _legend(ax)
    return ax


def table2(summary: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 2 style: per size and variant, final train/val loss (per base token) and the difference to the
    baseline."""
    rows = []
    for size, g in summary.groupby("size", sort=False):
        base = g[g.is_baseline]
        b_train = base.final_train_loss.mean() if len(base) else np.nan
        b_val = base.final_val_loss.mean() if len(base) else np.nan
        for name in variant_order(g):
            v = g[g.variant == name]
            rows.append({"size": size, "variant": name, "N_body": int(v.N_body.iloc[0]),
                         "input_vocab_size": int(v.input_vocab_size.iloc[0]), "seeds": len(v),
                         "train_loss": v.final_train_loss.mean(), "val_loss": v.final_val_loss.mean(),
                         "delta_train": v.final_train_loss.mean() - b_train, "delta_val": v.final_val_loss.mean() - b_val,
                         "gen_acc": v.gen_acc.mean()})
    return pd.DataFrame(rows)


def law_axes(law: str, table: pd.DataFrame, est: dict[str, float], ax):
    """The data and the fitted law: loss against D, one colour per N (rounded to 0.1 in log10), with the law's
    curves (chinchilla); loss against log10(vocab) with the fitted line (loglinear)."""
    import matplotlib.pyplot as plt

    from analysis.fits import chinchilla_predict, formula

    if law == "chinchilla":
        logn = np.round(np.log10(table.N.to_numpy(float)), 1)
        groups = np.unique(logn)
        cmap = plt.get_cmap("viridis", max(len(groups), 2))
        grid = np.geomspace(table.D.min(), table.D.max(), 100)
        for i, g in enumerate(groups):
            d = table[np.isclose(logn, g)]
            ax.scatter(d.D, d.loss, s=12, color=cmap(i), label=f"N ~ 1e{g:g}")
            ax.plot(grid, chinchilla_predict(est, 10**g, grid), color=cmap(i), lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("tokens D")
        if len(groups) <= 12:
            ax.legend(fontsize=6)
    else:
        x = np.log10(table.vocab.to_numpy(float))
        ax.scatter(x, table.loss, s=14)
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(grid, est["intercept"] + est["slope"] * grid, color="C1")
        ax.set_xlabel("log10(vocab)")
    ax.set_ylabel("loss")
    ax.set_title(formula(law, est), fontsize=8)
    return ax
