"""`overtok report SWEEP`: one self-contained HTML page per sweep (dashboards/<sweep>/index.html).

The page makes no network requests: figures are inlined as base64 PNG, the sort script is inline. It is
rebuilt from MLflow each time (export -> fit -> figures), so it works while a sweep is still running: a
rerun shows new trials. Every string from configs, run names or errors goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import time
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from overtok.config import NAME_RE, NAME_RULE, ConfigError
from overtok.export import fmt_rows

DEFAULT_UI = "http://127.0.0.1:5000"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} .muted{color:#666} table{border-collapse:collapse;margin:12px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right} th{background:#f4f4f4;cursor:pointer;user-select:none}
td.l,th.l{text-align:left} .FINISHED{color:#17702b} .FAILED{color:#b00020} .RUNNING{color:#8a6d00} .KILLED{color:#666}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px} img{max-width:100%;border:1px solid #eee;margin:6px 0}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:12px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('data-dir') !== 'asc';
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', asc ? 'asc' : 'desc');
  });
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e5 else f"{v:.{digits}f}"
    return str(v)


def _cell(v, left=False) -> str:
    text = _num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    sort_v = v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else text
    return f'<td{" class=l" if left else ""} data-v="{_e(sort_v)}">{_e(text)}</td>'


ML_MODE = "workflowType=machine_learning"  # MLflow 3 opens links in its GenAI mode without it


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}?{ML_MODE}"


def compare_url(ui: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = quote(json.dumps(list(run_ids)), safe="")
    exps = quote(json.dumps([str(experiment_id)]), safe="")
    return f"{ui}/#/compare-runs?runs={runs}&experiments={exps}&{ML_MODE}"


def metric_url(ui: str, experiment_id: str, run_ids: list[str], metric: str = "train/loss") -> str:
    """MLflow's metric page: ``metric`` against step (base tokens, overtok's step) for the given runs."""
    def q(value) -> str:
        return quote(json.dumps(value), safe="")

    return (f"{ui}/#/metric?runs={q(list(run_ids))}&metric={q(metric)}&experiments={q([str(experiment_id)])}"
            f"&plot_metric_keys={q([metric])}&plot_layout={q({})}&x_axis=step&y_axis_scale=linear"
            f"&line_smoothness=1&show_point=false&deselected_curves={q([])}&last_linear_y_axis_range={q([])}&{ML_MODE}")


def build_report(runs: pd.DataFrame, fits: dict, figures_dir: Path, out: Path, experiment_id: str | None,
                 ui: str = DEFAULT_UI, varied: list[str] | None = None, curves: pd.DataFrame | None = None,
                 pending: list[str] | None = None) -> Path:
    """Write the page from an export (runs.parquet rows and curves.parquet), fits.json and the figures directory.

    ``experiment_id`` None: built from a copied results directory (MLflow store elsewhere), no MLflow links."""
    from analysis.derive import tail_means

    curves = curves if curves is not None else pd.DataFrame(columns=["trial_id", "metric", "step", "value"])
    runs = runs.copy()
    runs["train_loss"] = tail_means(curves).reindex(runs.trial_id).to_numpy(float) if len(runs) else []
    sweep = str(runs.sweep.iloc[0]) if len(runs) else out.parent.name
    varied = varied or sorted(c for c in runs.columns if c.startswith("varied."))
    status = runs.status.value_counts().to_dict() if len(runs) else {}
    tokens = float(runs.get("tokens_seen", pd.Series(dtype=float)).fillna(0).sum())
    gpu_h = 0.0  # trial wall time (tokens / mean tokens/s) x the GPU fraction it held
    if {"tokens_seen", "tokens_per_s", "resources.gpu"} <= set(runs.columns):
        secs = _trial_seconds(runs)
        gpu_h = float((secs * pd.to_numeric(runs["resources.gpu"], errors="coerce").fillna(0)).sum() / 3600)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>overtok: {_e(sweep)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Sweep {_e(sweep)}</h1><p class=muted>built {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} from "
             + ("MLflow; rebuild with <code>overtok report " + _e(sweep) + "</code> to see new trials</p>" if experiment_id
                else f"the exported results in <code>{_e(str(figures_dir.parent))}</code> (no MLflow store here)</p>"),
             "<div class=cards>"]
    for label, val in [("trials", len(runs)), ("finished", status.get("FINISHED", 0)), ("running", status.get("RUNNING", 0)),
                       ("failed", status.get("FAILED", 0)), ("killed", status.get("KILLED", 0)),
                       ("tokens", f"{tokens:,.0f}"), ("GPU-hours", f"{gpu_h:.2f}")]:
        parts.append(f"<div class=card>{_e(label)}<b>{_e(val)}</b></div>")
    parts.append("</div>")

    parts.append(headline_html(runs, curves, fits))
    parts.append(data_html(runs, pending or []))

    # run table
    cols = [("run", "run_name", True), ("status", "status", True), ("variant", "variant", True)]
    if "export" in runs.columns and runs["export"].nunique() > 1:  # a merged export (overtok merge): whose row
        cols.append(("from export", "export", True))
    cols += [(v.removeprefix("varied."), v, False) for v in varied]
    cols += [("train loss", "train_loss", False), ("val loss", "final.val/loss", False),
             ("gen acc", "final.val/gen_acc", False), ("tokens", "tokens_seen", False), ("tokens/s", "tokens_per_s", False)]
    cols = [c for c in cols if c[1] in runs.columns or c[1] in ("run_name", "status")]
    parts.append("<h2>Runs</h2><table class=sortable id=runs><thead><tr>")
    parts += [f"<th class={'l' if left else 'r'}>{_e(name)}</th>" for name, _, left in cols]
    parts.append(("<th class=l>MLflow</th>" if experiment_id else "") + "<th class=l>error</th></tr></thead><tbody>")
    for row in runs.to_dict("records"):
        parts.append("<tr>")
        for name, key, left in cols:
            v = row.get(key, "")
            if name == "status":
                parts.append(f'<td class="l {_e(v)}" data-v="{_e(v)}">{_e(v)}</td>')
            else:
                parts.append(_cell(v if v is not None else "", left))
        if experiment_id:
            parts.append(f'<td class=l><a href="{_e(run_url(ui, experiment_id, row["run_id"]))}">open</a></td>')
        parts.append(f"<td class=l>{_e(str(row.get('error', '') or '')[:300])}</td></tr>")
    parts.append("</tbody></table>")

    # comparisons the paper makes: all variants at one model size
    if "model.d_model" in runs.columns and len(runs) and experiment_id:
        parts.append("<h2>Compare in MLflow</h2><ul>")
        for (d, L), g in runs.groupby(["model.d_model", "model.n_layers"]):
            url = compare_url(ui, experiment_id, list(g.run_id))
            curves_link = metric_url(ui, experiment_id, list(g.run_id))
            parts.append(f'<li><a href="{_e(url)}">d{_e(d)}-L{_e(L)}: all {len(g)} input vocabularies / OD depths</a>'
                         f' &middot; <a class=curves href="{_e(curves_link)}">their train/loss against tokens</a></li>')
        parts.append(f"</ul><p class=muted>Links point at the MLflow UI at {_e(ui)} (start it with <code>overtok ui</code>).</p>")

    # fits
    parts.append("<h2>Fitted laws</h2>")
    parts.append(_fits_html(fits))

    # figures, inlined
    pngs = sorted(Path(figures_dir).glob("*.png")) if Path(figures_dir).exists() else []
    if pngs:
        parts.append("<h2>Figures</h2><div class=figs>")
        for p in pngs:
            data = base64.b64encode(p.read_bytes()).decode()
            parts.append(f'<figure><img alt="{_e(p.stem)}" src="data:image/png;base64,{data}"><figcaption>{_e(p.stem)}'
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts), encoding="utf-8")
    return out


def _trial_seconds(runs: pd.DataFrame) -> pd.Series:
    """Each trial's training time: tokens over its mean tokens/s (0 where no rate was logged)."""
    return (runs.tokens_seen / runs.tokens_per_s).where(runs.tokens_per_s > 0, 0).fillna(0)


def data_html(runs: pd.DataFrame, pending: list[str]) -> str:
    """The data (corpus or grammar, tokenizer, tokens per source when the prepared corpus is at hand), the training
    budget, the trials' summed training time, and the sweep's trials that have no run yet."""
    out = ["<h2>Data and budget</h2><ul>"]
    first = runs.iloc[0] if len(runs) else {}
    kind = first.get("data.kind", "?") if len(runs) else "?"
    if kind == "text":
        out.append(f"<li>text: <code>{_e(first.get('data.corpus') or first.get('data.path', '?'))}</code>, tokenizer "
                   f"<code>{_e(first.get('data.tokenizer', '?'))}</code>, V = {_e(first.get('model.vocab_size', '?'))}"
                   "</li>")
        meta = Path(str(first.get("data.path", ""))) / "meta.json"
        sources = json.loads(meta.read_text()).get("sources") if meta.is_file() else None
        if isinstance(sources, dict):
            out.append("<li>tokens per source (train / held-out): " + ", ".join(
                f"{_e(name)} {r['train_tokens']:,} / {r['val_tokens']:,}" for name, r in sources.items()) + "</li>")
    elif len(runs):
        out.append(f"<li>CFG grammar <code>{_e(first.get('data.grammar', '?'))}</code></li>")
    if {"train.max_steps", "tokens_per_step"} <= set(runs.columns) and len(runs):
        budget = runs[["train.max_steps", "tokens_per_step"]].astype(float).prod(axis=1)
        out.append(f"<li>budget per trial: {int(budget.min()):,}"
                   + (f"-{int(budget.max()):,}" if budget.max() != budget.min() else "")
                   + " base tokens (optimizer steps x tokens per step)</li>")
    if {"tokens_seen", "tokens_per_s"} <= set(runs.columns) and len(runs):
        secs = _trial_seconds(runs)
        devices = sorted({str(d) for d in runs.get("device", pd.Series(dtype=str)).dropna() if str(d)})
        out.append(f"<li>training time, summed over trials: {float(secs.sum()) / 3600:.2f} h (tokens / tokens per s; "
                   "start-up and evaluation not included); hardware: "
                   + (_e(", ".join(devices)) if devices else "not recorded in this export") + "</li>")
    if pending:
        out.append(f"<li>pending (no run yet): {len(pending)} trial(s): " + ", ".join(_e(p) for p in pending) + "</li>")
    out.append("</ul>")
    return "".join(out)


def headline_html(runs: pd.DataFrame, curves: pd.DataFrame, fits: dict) -> str:
    """Per model size and body, each variant's change in train and held-out loss against its baseline, seed-paired
    with 95% CIs ("n/a, 1 seed" otherwise), and its speedup from fits.json; the definition of train loss."""
    from analysis.effects import TRAIN_LOSS, paired_effects, verdict

    eff = paired_effects(runs, curves) if len(runs) and len(curves) else pd.DataFrame()
    out = ["<h2>Headline</h2>", f"<p class=muted>{_e(TRAIN_LOSS)}; held-out loss = the last evaluation. Differences "
           "are variant minus baseline of the same seed (negative = better), with 95% CIs from the seed-to-seed "
           "spread pooled over the page's cells.</p>"]
    if eff.empty:
        out.append("<p class=muted>no variant with a finished baseline of the same configuration yet</p>")
        return "".join(out)
    speed = fits.get("speedup") or {}
    out.append("<table class=sortable id=headline><thead><tr><th class=l>cell</th><th class=l>variant</th>"
               "<th class=r>seeds</th><th class=r>train diff</th><th class=l>train 95% CI</th><th class=r>held-out diff"
               "</th><th class=l>held-out 95% CI</th><th class=l>speedup</th></tr></thead><tbody>")
    for r in eff.itertuples():
        def ci(lo: float, hi: float) -> str:
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return "n/a, 1 seed"
            return f"[{lo:+.4f}, {hi:+.4f}] {verdict(lo, hi)}"

        per_metric = (speed.get(r.size) or {}).get(r.variant, {})
        sp = [f"{metric}: " + ("never reaches the baseline's final value" if s.get("not_reached") else
                               f"{_num(s.get('mean'))}x") for metric, s in per_metric.items()]
        out.append("<tr>" + _cell(r.cell, True) + _cell(r.variant, True) + _cell(r.seeds) + _cell(round(r.d_train, 4))
                   + _cell(ci(r.d_train_lo, r.d_train_hi), True) + _cell(round(r.d_val, 4))
                   + _cell(ci(r.d_val_lo, r.d_val_hi), True) + _cell("; ".join(sp) or "-", True) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def fit_flags(n_points: int, ci) -> str:
    """Warnings a fit's reader needs: few points (under 4) or an interval that includes zero (or none at all)."""
    flags = []
    if n_points and n_points < 4:
        flags.append(f"only {n_points} points")
    lo, hi = (ci or [None, None])[:2]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        flags.append("no CI")
    elif lo <= 0 <= hi:
        flags.append("CI includes 0")
    return ", ".join(flags)


def _local_slopes_cells(local: dict) -> tuple[str, str]:
    """A fit's ``local_slopes`` as the law table's estimate and interval cells: each step's slope with its
    interval, and where the loss stops falling measurably."""
    steps = "; ".join(f"{fmt_rows(int(st['from']))} to {fmt_rows(int(st['to']))}: {_num(st['slope'])} "
                      f"[{_num(st['ci'][0])}, {_num(st['ci'][1])}]" for st in local["steps"])
    if local["flat_from"] is not None:
        return steps, f"falls no more measurably from m = {fmt_rows(int(local['flat_from']))}"
    return steps, "still falling at the grid's top" if local["steps"][-1]["seeds"] >= 2 else "one seed: no interval"


def _fits_html(fits: dict) -> str:
    rows = []
    families = [("", fits)] + [(f" at {int(t):,} tokens", at) for t, at in (fits.get("loglinear_at_tokens") or {}).items()]
    for (when, source), (family, axis) in itertools.product(families, (("loglinear", "log10(V+m)"),
                                                                       ("loglinear_m", "log10(m)"))):
        for metric, per_size in (source.get(family) or {}).items():
            for size, f in per_size.items():
                est, ci = f["estimates"], f["ci"]
                flags = fit_flags(f.get("n_points", 0), ci["slope"])
                verdict = (f.get("notes") or {}).get("verdict")
                rows.append(("log-linear " + metric + when, size, f"L = {_num(est['intercept'])} + {_num(est['slope'])} {axis}",
                             f"slope CI [{_num(ci['slope'][0])}, {_num(ci['slope'][1])}]" + (f" ({flags})" if flags else "")
                             + (f"; {verdict}" if verdict else "")))
                local = (f.get("notes") or {}).get("local_slopes")
                if family == "loglinear_m" and local and local["steps"]:  # where the curve bends, on the paper's axis
                    rows.append((f"  {metric}: local slopes per decade of m{when}", size, *_local_slopes_cells(local)))
    for variant, per_conv in (fits.get("chinchilla") or {}).items():
        for conv, f in per_conv.items():
            est = f["estimates"]
            rows.append((f"Chinchilla ({conv})", variant, ", ".join(f"{k}={_num(v)}" for k, v in est.items()),
                         ", ".join(f"{k} [{_num(a)}, {_num(b)}]" for k, (a, b) in f["ci"].items())))
    for size, per_variant in (fits.get("speedup") or {}).items():
        for variant, per_metric in per_variant.items():
            for metric, s in per_metric.items():
                if s.get("not_reached"):
                    rows.append(("speedup " + metric, f"{size} {variant}", "never reaches the baseline's final value", ""))
                    continue
                missed = (s.get("seeds") or s.get("n") or 0) - (s.get("n") or 0)
                rows.append(("speedup " + metric, f"{size} {variant}", f"{_num(s.get('mean'))}x over {s.get('n')} seed(s)"
                             + (f"; {missed} seed(s) never reach it" if missed else ""),
                             f"CI [{_num(s['ci'][0])}, {_num(s['ci'][1])}]"
                             + (f"; {s['verdict']}" if s.get("verdict") else "")))
    for variant, per_size in (fits.get("cfg_generation_accuracy_ci") or {}).items():
        for size, a in per_size.items():
            rows.append(("CFG generation accuracy", f"{size} {variant}",
                         f"{_num(a['accuracy'])} ({a['accepted']} of {a['samples']} samples)",
                         f"[{_num(a['ci95'][0])}, {_num(a['ci95'][1])}]"))
    for size, per_variant in (fits.get("cfg_directions") or {}).items():
        for variant, d in per_variant.items():
            rows.append(("CFG accuracy vs baseline", f"{size} {variant}",
                         f"{_num(d['difference'])} ({_num(d['accuracy'])} vs {_num(d['baseline_accuracy'])})",
                         f"[{_num(d['ci95'][0])}, {_num(d['ci95'][1])}]; {d['verdict']}"))
    for size, per_variant in (fits.get("cfg_accuracy_curve") or {}).items():
        for variant, c in per_variant.items():
            b = c.get("budget")
            cut = c.get("unfinished") or []
            rows.append(("CFG accuracy curve: budget", f"{size} {variant}",
                         f"{b['tokens']:,} tokens: {_num(b['accuracy'])}" if b else "none",
                         (f"[{_num(b['ci95'][0])}, {_num(b['ci95'][1])}]; " if b else "") + c["why"]
                         + (f"; {len(cut)} trial(s) did not finish: their evaluations up to where they stopped"
                            if cut else "")))
    if not rows:
        return "<p class=muted>no fits yet (need finished trials)</p>"
    out = ["<table class=sortable id=fits><thead><tr><th class=l>law</th><th class=l>group</th><th class=l>estimate</th>"
           "<th class=l>95% CI</th></tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(_cell(x, True) for x in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def check_ui_url(ui: str) -> str:
    """The MLflow UI's base URL: http(s) only, so that run links can never become script links."""
    from urllib.parse import urlparse

    u = urlparse(ui)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(f"--ui must be an http(s) URL of the MLflow UI, got {ui[:100]!r}", file="--ui")
    return ui


def report_sweep(sweep: str, tracking_uri: str = "", ui: str = DEFAULT_UI, root: Path = Path("."),
                 overrides: list[str] | None = None, at_tokens: list[float] | tuple = (), bootstrap: int = 100) -> Path:
    """export -> fit -> figures -> dashboards/<sweep>/index.html. ``sweep`` may also be a results directory with an
    export (runs.parquet, curves.parquet) made elsewhere, e.g. copied back from a GPU machine: then no export and
    no MLflow links."""
    from analysis.commands import fit_sweep, plot_sweep
    from analysis.tables import TableError
    from overtok.export import export_sweep

    check_ui_url(ui)
    from overtok.tracking import client, resolve_tracking_uri

    offline = Path(sweep).is_dir() and (Path(sweep) / "runs.parquet").exists()
    pending: list[str] = []
    declared = None
    if sweep.endswith((".yaml", ".yml")):
        from overtok.sweep import load_sweep

        declared = load_sweep(sweep, overrides)  # loaded once: the export takes it too
    paths = ([Path(sweep) / "runs.parquet"] if offline
             else export_sweep(sweep, tracking_uri, overrides=overrides, loaded=declared))
    results = paths[0].parent
    runs = pd.read_parquet(paths[0])
    curves_file = results / "curves.parquet"
    curves = pd.read_parquet(curves_file) if curves_file.exists() else None
    name = str(runs.sweep.iloc[0]) if len(runs) else results.name
    if NAME_RE.fullmatch(name) is None:  # the page's path comes from the export's data: never a path of its own
        raise ConfigError(f"{paths[0]}: its sweep name {name[:80]!r} is not a sweep name ({NAME_RULE})",
                          file=str(paths[0]), key="sweep")
    fits: dict = {}
    try:
        fits = json.loads(fit_sweep(results, bootstrap=bootstrap, at_tokens=at_tokens).read_text())
        plot_sweep(results)
    except TableError:
        pass  # nothing finished yet: the page shows the run table alone
    if offline:
        return build_report(runs, fits, results / "figures", root / "dashboards" / name / "index.html", None, ui,
                            curves=curves)
    exp_meta = json.loads((results / "export.json").read_text())
    c = client(resolve_tracking_uri(tracking_uri or exp_meta["tracking_uri"]))
    exp_id = c.get_experiment_by_name(exp_meta["experiment"]).experiment_id
    if declared is not None:
        have = set(runs.trial_id)
        pending = [t.run_name for t in declared.trials if t.trial_id not in have]
    return build_report(runs, fits, results / "figures", root / "dashboards" / name / "index.html", exp_id, ui,
                        curves=curves, pending=pending)
