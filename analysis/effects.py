"""Paired effects of each variant against its baseline, seed by seed.

A *cell* is a set of finished runs that share every experiment setting outside the variant's own (the OE section,
OD/MTP heads, n-gram tokenizer or output): model size and body, data, schedule. Its baseline is the plain model
(the export's ``variant`` "Baseline", else ``model.oe.n == 1``); its variants are the other settings. Each
variant is paired with the baseline of the same seed; the effect is the mean of the paired differences, with a
95% interval from Student's t on the pooled within-cell spread of the differences (every cell's seeds contribute
to one estimate of seed noise, so two seeds per cell still give a usable interval).

Training loss here is the paper's measure as the reference implementation reads it: the mean of the last
``tail`` logged training losses (one batch each), so the number does not hinge on one batch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from analysis.derive import TRAIN_TAIL, read_losses

TRAIN_LOSS = (f"train loss = the mean of a run's last {TRAIN_TAIL} logged training losses (one batch each, next-token "
              "loss per base token)")

# settings that say how a run ran or where its files are, not what it trained (the runtime section is left out as a
# whole; exports of runs made before it existed carry its fields under train.)
NOT_EXPERIMENT = ("data.path", "data.corpus", "data.tokenizer", "train.checkpoint_dir", "train.checkpoint_every",
                  "train.checkpoint_final", "train.table_weight_decay",
                  *(f"train.{f}" for f in ("compile", "compile_eval", "loss_kernel", "mlp_kernel", "rope_kernel",
                                           "cuda_graphs", "cuda_graph_scope", "ddp_bucket_mb", "device", "fail_at_step")))


VARIANT_KEYS = ("model.oe.", "model.od_", "model.tokenizer_ngram", "model.output_ngram", "train.table_weight_decay")


def _cell_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c.split(".")[0] in ("model", "data", "train")
            and not c.startswith(VARIANT_KEYS) and c not in NOT_EXPERIMENT]


def _variant_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c.startswith(VARIANT_KEYS)]


def _is_baseline(df: pd.DataFrame) -> pd.Series:
    if "variant" in df.columns:
        return df["variant"] == "Baseline"
    return df["model.oe.n"] == 1


def _order(value) -> tuple:
    """A sort key for a setting's values: numbers by value, before anything else by its text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _describe(row: pd.Series, columns: list[str]) -> str:
    return ", ".join(f"{c.split('.', 1)[1]}={row[c]}" for c in columns) or "-"


def paired_effects(runs: pd.DataFrame, curves: pd.DataFrame, tail: int = TRAIN_TAIL,
                   at_tokens: float | None = None) -> pd.DataFrame:
    """One row per (cell, variant): cell and variant described by the settings that vary, seeds paired, baseline
    and variant means of train (``tail_means``) and held-out loss (final ``val/loss``), their paired differences
    (mean, per seed, 95% interval) and the interval's degrees of freedom.

    With ``at_tokens``, both losses are read at that point of training instead of at the end: train loss from the
    points logged at step <= at_tokens, held-out loss from the last evaluation at step <= at_tokens (for example,
    the end of the first epoch, before the training loss starts to count repeated data)."""
    df = runs[runs.status == "FINISHED"].drop_duplicates("trial_id").copy()
    if df.empty:
        return pd.DataFrame()
    cell_cols, var_cols = _cell_columns(df), _variant_columns(df)
    # per base token (n-gram tokenizer / output variants on the baseline's scale), as the fits read them
    df["_train"], df["_val"] = read_losses(df, curves, at_tokens, tail, trained=df.get("tokens_seen"))
    df = df[df["_train"].notna()].copy()  # a trial that stopped before at_tokens has no loss there: no pair
    if df.empty:
        return pd.DataFrame()
    df["_cell"] = df[cell_cols].map(repr).agg("|".join, axis=1)  # repr: NaN and None become text too
    df["_variant"] = df[var_cols].map(repr).agg("|".join, axis=1)
    vary_cell = [c for c in cell_cols if df[c].map(repr).nunique() > 1]
    df["_base"] = _is_baseline(df)
    var_rows = df[~df["_base"]]
    vary_var = [c for c in var_cols if var_rows[c].map(repr).nunique() > 1 and c not in ("model.oe.n", "model.oe.m")
                and "variant" not in df.columns]
    rows = []
    for _, cell in df.groupby("_cell", sort=False):
        base = cell[cell["_base"]].set_index("seed")
        if base.empty:
            continue
        variants = [v for _, v in cell[~cell["_base"]].groupby("_variant", sort=False)]
        for var in sorted(variants, key=lambda v: tuple(map(_order, v.iloc[0][var_cols]))):  # e.g. by m, numerically
            var = var.set_index("seed")
            seeds = sorted(set(var.index) & set(base.index))
            if not seeds:
                continue
            first = var.iloc[0]
            label = first["variant"] if "variant" in var.columns else f"OE n={first['model.oe.n']} m={first['model.oe.m']}"
            differs = [c for c in var_cols if "variant" in df.columns and var_rows[c].map(repr).nunique() > 1
                       and c.startswith(("model.oe.sparse", "model.oe.table", "model.oe.combine", "train.table"))]
            rows.append({
                "size": f"d{first.get('model.d_model', '?')}-L{first.get('model.n_layers', '?')}",
                "cell": _describe(first, vary_cell), "variant": label
                + (f" ({_describe(first, vary_var or differs)})" if vary_var or differs else ""), "seeds": len(seeds),
                "trial_ids": list(var.loc[seeds, "trial_id"]), "base_trial_ids": list(base.loc[seeds, "trial_id"]),
                "base_train": base.loc[seeds, "_train"].mean(), "oe_train": var.loc[seeds, "_train"].mean(),
                "base_val": base.loc[seeds, "_val"].mean(), "oe_val": var.loc[seeds, "_val"].mean(),
                "d_train_seeds": [float(var.loc[s, "_train"] - base.loc[s, "_train"]) for s in seeds],
                "d_val_seeds": [float(var.loc[s, "_val"] - base.loc[s, "_val"]) for s in seeds],
            })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    for metric in ("train", "val"):
        diffs = out[f"d_{metric}_seeds"]
        out[f"d_{metric}"] = [float(np.mean(d)) for d in diffs]
        # pooled within-cell variance of the paired differences: sum of squared deviations over sum of (n - 1)
        ss = sum(float(np.sum((np.asarray(d) - np.mean(d)) ** 2)) for d in diffs)
        dof = sum(len(d) - 1 for d in diffs)
        sd = math.sqrt(ss / dof) if dof > 0 else math.nan
        half = [stats.t.ppf(0.975, dof) * sd / math.sqrt(len(d)) if dof > 0 else math.nan for d in diffs]
        out[f"d_{metric}_lo"] = out[f"d_{metric}"] - half
        out[f"d_{metric}_hi"] = out[f"d_{metric}"] + half
        out[f"{metric}_dof"] = dof
        out[f"{metric}_seed_sd"] = sd
    return out


def verdict(lo: float, hi: float) -> str:
    """'helps' / 'hurts' where the interval excludes 0, else 'no clear effect' (losses: lower is better)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a (1 seed)"
    return "helps" if hi < 0 else "hurts" if lo > 0 else "no clear effect"


def effects_markdown(eff: pd.DataFrame) -> str:
    """The paired-effects table as Markdown (losses to 3 decimals, differences with their 95% intervals)."""
    if eff.empty:
        return "(no cell with both a baseline and an OE variant)\n"
    lines = ["| cell | variant | seeds | train: base -> OE | train diff [95% CI] | held-out: base -> OE | "
             "held-out diff [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in eff.itertuples():
        lines.append(
            f"| {r.cell} | {r.variant} | {r.seeds} | {r.base_train:.3f} -> {r.oe_train:.3f} | "
            f"{r.d_train:+.3f} [{r.d_train_lo:+.3f}, {r.d_train_hi:+.3f}] {verdict(r.d_train_lo, r.d_train_hi)} | "
            f"{r.base_val:.3f} -> {r.oe_val:.3f} | {r.d_val:+.3f} [{r.d_val_lo:+.3f}, {r.d_val_hi:+.3f}] "
            f"{verdict(r.d_val_lo, r.d_val_hi)} |")
    first = eff.iloc[0]
    lines.append("")
    lines.append(f"Seed noise of a paired difference (pooled SD): train {first.train_seed_sd:.4f}, held-out "
                 f"{first.val_seed_sd:.4f}, each with {first.train_dof} degrees of freedom.")
    return "\n".join(lines) + "\n"
