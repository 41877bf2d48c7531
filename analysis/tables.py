"""Loading tables (the Parquet export, or any CSV/Parquet) with checks that name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class TableError(ValueError):
    """A table that cannot be fitted: missing column, non-positive values, too few points."""


def read_table(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise TableError(f"{p}: file not found")
    try:
        if p.suffix == ".parquet":
            return pd.read_parquet(p)
        return pd.read_csv(p)
    except Exception as e:  # noqa: BLE001 - unreadable table: one clear line
        raise TableError(f"{p}: cannot read table ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def require(df: pd.DataFrame, columns: list[str], *, positive: list[str] = (), min_rows: int = 1,
            name: str = "table") -> pd.DataFrame:
    """Select ``columns`` as floats; raise TableError naming the column and problem."""
    for c in columns:
        if c not in df.columns:
            raise TableError(f"{name}: missing column {c!r} (has {', '.join(map(str, df.columns))})")
    out = df[columns].copy()
    for c in columns:
        out[c] = pd.to_numeric(out[c], errors="coerce")
        bad = ~np.isfinite(out[c])
        if bad.any():
            raise TableError(f"{name}: column {c!r} has {int(bad.sum())} non-numeric or missing values")
    for c in positive:
        if (out[c] <= 0).any():
            raise TableError(f"{name}: column {c!r} must be > 0 (found {out[c].min():g})")
    if len(out) < min_rows:
        raise TableError(f"{name}: {len(out)} rows, need at least {min_rows}")
    return out


def load_export(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    d = Path(results_dir)
    runs, curves = d / "runs.parquet", d / "curves.parquet"
    if not runs.is_file() or not curves.is_file():
        raise TableError(f"{d}: no runs.parquet/curves.parquet (run `overtok export` first)")
    return pd.read_parquet(runs), pd.read_parquet(curves)
