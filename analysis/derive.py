"""Derived columns, computed once: one summary row per finished trial from the export."""

from __future__ import annotations

import numpy as np
import pandas as pd

TRAIN_TAIL = 10  # a run's train loss = the mean of its last TRAIN_TAIL logged training losses (analysis.effects)


def tail_means(curves: pd.DataFrame, metric: str = "train/loss", tail: int = TRAIN_TAIL,
               until: float | None = None) -> pd.Series:
    """Per trial id, the mean of the last ``tail`` logged values of ``metric`` (by step; with ``until``, among the
    points at step <= until): one pass over the curves for every trial (a trial that logged none is absent, i.e.
    NaN after a reindex)."""
    c = curves[curves.metric == metric]
    if until is not None:
        c = c[c.step <= until]
    c = c.sort_values(["trial_id", "step"])
    return c.groupby("trial_id", sort=False)["value"].apply(lambda v: float(v.iloc[-tail:].mean()))


# Parameter-count conventions side by side: OE tables can be 10-100x the transformer body.
N_CONVENTIONS = {
    "body": ["params.body"],
    "body+embedding": ["params.body", "params.embedding", "params.head", "params.oe_proj", "params.extra_heads"],
    "all": ["params.body", "params.embedding", "params.head", "params.oe_proj", "params.extra_heads", "params.oe_tables"],
}


def size_label(row) -> str:
    return f"d{int(row['model.d_model'])}-L{int(row['model.n_layers'])}"


def curve(curves: pd.DataFrame, trial_id: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    c = curves[(curves.trial_id == trial_id) & (curves.metric == metric)].sort_values("step")
    return c["step"].to_numpy(float), c["value"].to_numpy(float)


def loss_curve(curves: pd.DataFrame, summary: pd.DataFrame, trial_id: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """A trial's curve; loss metrics per base token (divided by the trial's ``loss_scale``, see ``summarize``), so
    n-gram tokenizer / n-gram output variants are on the baseline's scale."""
    x, y = curve(curves, trial_id, metric)
    if "loss" in metric:
        y = y / float(summary.loc[summary.trial_id == trial_id, "loss_scale"].iloc[0])
    return x, y


def base_tokens_per_loss(runs: pd.DataFrame) -> np.ndarray:
    """How many base tokens one unit of a run's logged loss covers (1 for plain next-token models)."""
    n_tok = runs["model.tokenizer_ngram"] if "model.tokenizer_ngram" in runs.columns else 1
    n_out = runs["model.output_ngram"] if "model.output_ngram" in runs.columns else 1
    return (pd.Series(n_tok, index=runs.index).fillna(1) * pd.Series(n_out, index=runs.index).fillna(1)).to_numpy(float)


def variant_order(summary: pd.DataFrame) -> list[str]:
    """``summary``'s variants as tables and figures list them: the baseline first, then by input vocabulary (by
    name where that is not known)."""
    vocab = summary["input_vocab_size"] if "input_vocab_size" in summary else pd.Series(0, index=summary.index)
    order = vocab.groupby(summary["variant"]).first().sort_values(kind="stable")
    names = list(order.index)
    if "Baseline" in names:
        names.remove("Baseline")
        names.insert(0, "Baseline")
    return names


def summarize(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Finished trials with: size, N under each convention, tokens, final train loss (``analysis.effects.TRAIN_LOSS``),
    final val loss, generation accuracy, input vocabulary (V + OE rows, V for baselines) and the variant label."""
    df = runs[runs.status == "FINISHED"].copy()
    if df.empty:
        return df
    df["size"] = [size_label(r) for r in df.to_dict("records")]
    for name, cols in N_CONVENTIONS.items():
        df[f"N_{name}"] = sum(df[c] for c in cols if c in df.columns)
    # per base token: an n-gram tokenizer's position holds n base tokens, an n-gram output head predicts the joint
    # of the next n tokens (a sum of n next-token losses); dividing by both makes every variant comparable
    df["loss_scale"] = base_tokens_per_loss(df)
    df["final_train_loss"], df["final_val_loss"] = read_losses(df, curves)
    df["gen_acc"] = df.get("final.val/gen_acc", np.nan)
    df["tokens"] = df["tokens_seen"]
    df["seed"] = df.get("seed", 0)
    df["is_baseline"] = df["variant"] == "Baseline"
    return df.sort_values(["N_body", "input_vocab_size", "model.od_depth"]).reset_index(drop=True)


def read_losses(runs: pd.DataFrame, curves: pd.DataFrame, tokens: float | None = None, tail: int = TRAIN_TAIL,
                trained=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's train and held-out loss per base token, the one reading that the fits, the figures and the effects
    table share. At the end (``tokens`` None): the mean of the last ``tail`` logged training losses and the final
    ``val/loss``. At ``tokens``: the same from the points logged at step <= tokens (the held-out loss of the last
    evaluation there); rows whose trial trained on fewer tokens (``trained``, per row) get NaN."""
    ids = runs.trial_id
    per = base_tokens_per_loss(runs)
    train = tail_means(curves, tail=tail, until=tokens).reindex(ids).to_numpy(float) / per
    if tokens is None:
        val = runs["final.val/loss"].to_numpy(float) / per if "final.val/loss" in runs else np.full(len(runs), np.nan)
    else:
        val = tail_means(curves, "val/loss", 1, tokens).reindex(ids).to_numpy(float) / per
        if trained is not None:
            short = np.asarray(trained, float) < tokens
            train[short], val[short] = np.nan, np.nan
    return train, val


def losses_at(summary: pd.DataFrame, curves: pd.DataFrame, tokens: float) -> pd.DataFrame:
    """``summary`` with its final losses read at ``tokens`` instead of at the end (:func:`read_losses`); trials that
    trained on fewer tokens get NaN."""
    s = summary.copy()
    s["final_train_loss"], s["final_val_loss"] = read_losses(s, curves, tokens, trained=s.tokens)
    s["tokens"] = s.tokens.clip(upper=tokens)  # where the losses were read (the fits' notes name it)
    return s


def loglinear_points(summary: pd.DataFrame, axis: str = "vocab") -> tuple[pd.DataFrame, str]:
    """The trials the log-linear law is fitted to and drawn from, and their x column: OD depth 1 with 1-gram
    tokenizer and output; ``axis`` 'vocab': against input_vocab_size (V + OE table rows, V for baselines), 'm':
    against model.oe.m over the OE runs alone, as the paper writes its law."""
    s = summary[(summary["model.od_depth"] == 1) & (summary["model.tokenizer_ngram"] == 1)
                & (summary["model.output_ngram"] == 1)]
    if axis == "vocab":
        return s, "input_vocab_size"
    return s[(s.get("model.oe.n", 1) > 1) & (s.get("model.oe.m", 0) > 0)], "model.oe.m"

