"""MLflow -> Parquet: the contract between training and analysis.

``runs.parquet``: one row per trial (latest child run per trial id): ids, status, the flat resolved config
(typed), parameters by group, FLOPs per token, tokens seen, final and best metrics, mean tokens/s, and the
derived ``input_vocab_size`` (V for a baseline, V + sum of OE table rows with OE) and ``variant`` label.
``curves.parquet``: long format (trial_id, run_id, metric, step, value), step = base tokens seen.
Both carry ``schema_version``.

Histories are fetched in bulk: with a SQL store, one query over MLflow's own ORM models for every run of
the sweep; with a tracking server, per-(run, key) REST calls spread over a thread pool.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from overtok.config import parse_scalar
from overtok.errors import ExportError
from overtok.tracking import ROLE_TAG, SWEEP_TAG, TRIAL_ID_TAG, client, resolve_tracking_uri

SCHEMA_VERSION = 1


def _typed(value: str):
    try:
        v = parse_scalar(value)
    except Exception:  # noqa: BLE001 - not YAML-parsable: keep the string
        return value
    return v if isinstance(v, (int, float, bool, str)) or v is None else value


def fetch_histories(uri: str, run_ids: list[str], keys_by_run: dict[str, list[str]]) -> pd.DataFrame:
    """All metric points of the given runs: columns run_id, metric, step, value, timestamp."""
    from overtok.compat import mlflow_store, sql_metric_model

    store = mlflow_store(uri)
    if hasattr(store, "ManagedSessionMaker"):  # SQL store: one query
        SqlMetric = sql_metric_model()
        rows = []
        with store.ManagedSessionMaker() as session:
            for i in range(0, len(run_ids), 500):
                q = session.query(SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step, SqlMetric.value,
                                  SqlMetric.timestamp).filter(SqlMetric.run_uuid.in_(run_ids[i : i + 500]))
                rows.extend(q.all())
        return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])
    c = client(uri)

    def one(pair):
        rid, key = pair
        return [(rid, key, m.step, m.value, m.timestamp) for m in c.get_metric_history(rid, key)]

    pairs = [(rid, k) for rid in run_ids for k in keys_by_run.get(rid, [])]
    with ThreadPoolExecutor(16) as pool:
        rows = [r for chunk in pool.map(one, pairs) for r in chunk]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])


def fmt_rows(m: int) -> str:
    """A table size as variant names write it: 12.5K, 3.2M."""
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if m >= div:
            return f"{m / div:.3g}{unit}"
    return str(m)


def variant_label(row: dict) -> str:
    """Paper-style names: Baseline, OE-12.8M, OD-2, MTP-DS-2, OT-1M (OE + MTP-DS), 3-gram tokenizer, ..."""
    parts = []
    if row.get("model.tokenizer_ngram", 1) > 1:
        parts.append(f"{row['model.tokenizer_ngram']}-gram tokenizer")
    if row.get("model.output_ngram", 1) > 1:
        parts.append(f"{row['model.output_ngram']}-gram output")
    n, depth, mode = row.get("model.oe.n", 1), row.get("model.od_depth", 1), row.get("model.od_mode", "linear")
    if n > 1:
        name = f"OE-{fmt_rows(row['model.oe.m'])} ({n}-gram)"
        if depth > 1 and mode == "mtp_ds":
            return " + ".join(parts + [name.replace("OE-", "OT-", 1)])
        parts.append(name)
    if depth > 1:
        parts.append({"linear": "OD", "mtp": "MTP", "mtp_ds": "MTP-DS"}[mode] + f"-{depth}")
    return " + ".join(parts) or "Baseline"


def build_tables(runs, hist: pd.DataFrame, sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    records = []
    for r in runs:
        rec = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial_id": r.data.tags[TRIAL_ID_TAG],
               "run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
               "error": r.data.tags.get("overtok.error", ""), "device": r.data.tags.get("overtok.device", ""),
               "code": r.data.tags.get("overtok.code", "")}
        rec.update({k: _typed(v) for k, v in r.data.params.items()})
        records.append(rec)
    df = pd.DataFrame(records)
    hist = hist[hist["run_id"].isin(df["run_id"])] if len(df) else hist
    curves = hist.merge(df[["run_id", "trial_id"]], on="run_id")[["trial_id", "run_id", "metric", "step", "value"]]
    curves = curves.sort_values(["trial_id", "metric", "step"]).reset_index(drop=True)
    curves.insert(0, "schema_version", SCHEMA_VERSION)
    if df.empty:
        return df, curves
    g = curves.groupby(["run_id", "metric"])
    last = g.apply(lambda x: x.loc[x["step"].idxmax(), "value"], include_groups=False).unstack()
    df["tokens_seen"] = df["run_id"].map(curves[curves.metric == "train/loss"].groupby("run_id")["step"].max())
    for m in last.columns:
        df[f"final.{m}"] = df["run_id"].map(last[m])
    for m, how in (("val/loss", "min"), ("train/loss", "min"), ("val/gen_acc", "max"), ("val/bpb", "min")):
        if m in last.columns:
            df[f"best.{m}"] = df["run_id"].map(getattr(curves[curves.metric == m].groupby("run_id")["value"], how)())
    tps = curves[curves.metric == "perf/tokens_per_s"].groupby("run_id")["value"].mean()
    df["tokens_per_s"] = df["run_id"].map(tps)
    v_in = df["model.vocab_size"] ** df.get("model.tokenizer_ngram", 1)
    oe_rows = df["params.oe_tables"] / (df["model.d_model"] // (df["model.oe.k"] * (df["model.oe.n"] - 1)).clip(lower=1))
    df["input_vocab_size"] = (v_in + oe_rows.where(df["model.oe.n"] > 1, 0)).astype("int64")
    df["params.body_and_head"] = df["params.body"] + df["params.head"]
    df["variant"] = [variant_label(row) for row in df.to_dict("records")]
    return df, curves


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file of this process beside ``path``, fsync, then rename over ``path``: a full
    disk or a crash leaves the previous file whole, never a truncated one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None


def export_sweep(sweep: str, tracking_uri: str = "", out: Path | None = None,
                 overrides: list[str] | None = None, loaded=None) -> list[Path]:
    """Write runs.parquet and curves.parquet for a sweep (name or YAML path; ``loaded``: the YAML's Sweep when the
    caller has loaded it already, with the same overrides)."""
    from overtok.config import ConfigError

    keep: set[str] | None = None
    if sweep.endswith((".yaml", ".yml")):
        from overtok.sweep import load_sweep

        s = loaded or load_sweep(sweep, overrides)
        name, experiment, tracking_uri = s.name, s.experiment, tracking_uri or s.tracking_uri
        keep = {t.trial_id for t in s.trials}  # a sweep file: only its current trials, not older grids' runs
    else:
        name = experiment = sweep
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri} (run the sweep first)", file=sweep, key="name")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'", max_results=50000)
    latest: dict[str, object] = {}
    for r in runs:
        if r.data.tags.get(ROLE_TAG) != "trial":
            continue
        tid = r.data.tags[TRIAL_ID_TAG]
        prev = latest.get(tid)
        if prev is None or (r.info.status == "FINISHED", r.info.start_time) > (prev.info.status == "FINISHED", prev.info.start_time):
            latest[tid] = r
    chosen = list(latest.values())
    if keep is not None:
        left_out = [r for r in chosen if r.data.tags[TRIAL_ID_TAG] not in keep]
        chosen = [r for r in chosen if r.data.tags[TRIAL_ID_TAG] in keep]
        if left_out:
            print(f"[overtok] {len(left_out)} runs of sweep {name!r} are not trials of {sweep} (an older grid or "
                  "code version) and are left out; export by name to include them", flush=True)
    if not chosen:
        raise ConfigError(f"sweep {name!r} has no trial runs in {uri} yet: nothing to export", file=sweep, key="name")
    hist = fetch_histories(uri, [r.info.run_id for r in chosen], {r.info.run_id: list(r.data.metrics) for r in chosen})
    df, curves = build_tables(chosen, hist, name)
    out = out or Path("results") / name
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "runs.parquet", lambda f: df.to_parquet(f, index=False))
    write_atomically(out / "curves.parquet", lambda f: curves.to_parquet(f, index=False))
    write_atomically(out / "export.json", lambda f: f.write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "sweep": name, "tracking_uri": uri, "experiment": experiment,
         "trials": len(df)}, indent=2)))
    return [out / "runs.parquet", out / "curves.parquet"]


def load_export(d: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) of the export in ``d``; a folder without them, or of another schema, is a ConfigError."""
    from overtok.config import ConfigError

    d = Path(d)
    for f in ("runs.parquet", "curves.parquet"):
        if not (d / f).is_file():
            raise ConfigError(f"no {f} (not an export: run `overtok export` first)", file=str(d))
    runs, curves = pd.read_parquet(d / "runs.parquet"), pd.read_parquet(d / "curves.parquet")
    for df, f in ((runs, "runs.parquet"), (curves, "curves.parquet")):
        version = set(df.get("schema_version", pd.Series([], dtype=int)).unique()) - {SCHEMA_VERSION}
        if version:
            raise ConfigError(f"schema_version {sorted(version)}, this overtok reads {SCHEMA_VERSION}",
                              file=str(d / f), key="schema_version")
    return runs, curves


def finished_trials(exports: list[str | Path]) -> dict[str, str]:
    """Trial id -> where it finished, over the given exports: the wave a merged export names for the row
    (its ``export`` column), else the export's folder name; a later export wins."""
    done = {}
    for d in map(Path, exports):
        runs, _ = load_export(d)
        runs = runs[runs.status == "FINISHED"]
        where = runs["export"] if "export" in runs else pd.Series(d.name, index=runs.index)
        done.update(zip(runs.trial_id, where))
    return done


def merge_exports(base: Path, reruns: list[Path], out: Path, keep: set[str] | None = None) -> dict:
    """An export of ``base`` in which the trials of each ``rerun`` export (same trial ids: the same configs run
    again, e.g. after a fix) replace base's rows and curves; trials new to base are added; a later rerun wins over
    an earlier one. Only FINISHED rerun trials are taken (a rerun that failed leaves the base's row). Every row
    keeps base's sweep name (reports go to dashboards/<base sweep>) and gains ``export``: the directory its row
    came from. ``keep``: only these trial ids are kept, from every input (e.g. a sweep's grid, when another sweep's
    export holds trials it shares). Writes runs.parquet, curves.parquet and export.json (which lists what was
    replaced and what ``keep`` left out) to ``out``."""
    from overtok.config import ConfigError

    inputs = [Path(base), *map(Path, reruns)]
    if Path(out).resolve() in {p.resolve() for p in inputs}:
        raise ConfigError("the merged export must go to a directory of its own (the inputs stay as they are)",
                          file=str(out), key="--out")
    runs, curves = load_export(inputs[0])
    if runs.empty:
        raise ConfigError("the base export has no trials", file=str(inputs[0]))
    name = str(runs.sweep.iloc[0])
    runs = runs.assign(export=inputs[0].name)
    replaced, added, skipped = [], [], []
    for d in inputs[1:]:
        r_runs, r_curves = load_export(d)
        done = r_runs[r_runs.status == "FINISHED"]
        skipped += [f"{t} ({d.name}: {s})" for t, s in zip(r_runs.trial_id, r_runs.status) if s != "FINISHED"]
        ids = set(done.trial_id)
        replaced += sorted(ids & set(runs.trial_id))
        added += sorted(ids - set(runs.trial_id))
        runs = pd.concat([runs[~runs.trial_id.isin(ids)], done.assign(sweep=name, export=d.name)], ignore_index=True)
        curves = pd.concat([curves[~curves.trial_id.isin(ids)], r_curves[r_curves.trial_id.isin(ids)]],
                           ignore_index=True)
    left_out = []
    if keep is not None:
        left_out = sorted(set(runs.trial_id) - keep)
        runs, curves = runs[runs.trial_id.isin(keep)], curves[curves.trial_id.isin(keep)]
        if runs.empty:
            raise ConfigError("no trial of the inputs is in the sweep given to keep", file=str(inputs[0]),
                              key="--sweep")
        replaced, added = [t for t in replaced if t in keep], [t for t in added if t in keep]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "runs.parquet", lambda f: runs.to_parquet(f, index=False))
    write_atomically(out / "curves.parquet", lambda f: curves.to_parquet(f, index=False))
    summary = {"schema_version": SCHEMA_VERSION, "sweep": name, "merged_from": [str(p) for p in inputs],
               "trials": len(runs), "replaced": replaced, "added": added, "skipped_not_finished": skipped}
    if keep is not None:
        summary["not_in_sweep"] = left_out
    write_atomically(out / "export.json", lambda f: f.write_text(json.dumps(summary, indent=2)))
    return summary
