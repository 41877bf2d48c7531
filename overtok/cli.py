"""`overtok` command line. User mistakes (ConfigError, DataError, TableError) print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///results/mlflow.db in the current directory)")


def cmd_train(args) -> int:
    from overtok.config import load_config
    from overtok.data import generation_note, resolve_vocab
    from overtok.run import tracked_train
    from overtok.tracking import resolve_tracking_uri

    cfg = resolve_vocab(load_config(args.config, args.set), file=args.config)
    if not args.dry_run:
        _check_device(cfg.runtime.device, args.config)
        resolve_tracking_uri(args.tracking_uri or cfg.tracking.tracking_uri)  # checked before anything starts
    note = generation_note(cfg)
    if args.dry_run:
        from overtok.config import show_config
        from overtok.sweep import describe_config

        print(show_config(cfg) + "\n\n" + describe_config(cfg) + (f"\nnote: {note}" if note else ""))
        return 0
    if note:
        print(f"[overtok] note: {note}", flush=True)
    from overtok.data import ensure_prepared

    run_id, summary = tracked_train(ensure_prepared(cfg), args.tracking_uri)
    print(f"[overtok] finished run {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())
                                                            if k in ("train/loss", "val/loss", "val/gen_acc", "val/bpb")))
    return 0


def _check_device(device: str, file: str | None) -> None:
    """A CUDA device the machine does not have is a config error, found before any run starts."""
    from overtok.config import ConfigError, cuda_index

    index = cuda_index(device)
    if index is None:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ConfigError(f"{device} is not available on this machine ({count} CUDA devices)", file=file or "--set",
                          key="runtime.device")


def cmd_data_prepare(args) -> int:
    from overtok.data.text import prepare

    res = prepare([Path(p) for p in args.inputs], Path(args.out), args.tokenizer, args.val_fraction, args.seed,
                  args.text_field, args.max_docs, args.exclude)
    m = res.meta
    print(f"[overtok] {res.out_dir}: V={m['vocab_size']} train {m['train_tokens']:,} tokens "
          f"({m['train_documents']} docs), val {m['val_tokens']:,} tokens ({m['val_documents']} docs), "
          f"{m['train_bytes_per_token']:.2f} bytes/token")
    return 0


def cmd_plan(args) -> int:
    from overtok.sweep import load_sweep, plan_table

    sweep = load_sweep(args.sweep, args.set)
    _select(sweep, args)
    done = None
    if args.done:
        from overtok.export import finished_trials

        done = finished_trials(args.done)
    print(plan_table(sweep, done))
    return 0


def cmd_sweep(args) -> int:
    import time

    from overtok.sweep import load_sweep
    from overtok.tune import run_sweep

    started = time.time()  # the checks below (validation, disk, this machine's GPUs and CPUs): the clock's first phase
    sweep = load_sweep(args.sweep, args.set)
    _select(sweep, args, run=True)
    if args.max_concurrent:
        sweep.max_concurrent = args.max_concurrent
    if args.address:
        sweep.ray_address = args.address
    if args.tracking_uri:
        sweep.tracking_uri = args.tracking_uri
    sweep.time_limit = args.time_limit
    sweep.check_size(args.yes)
    sweep.check_disk(args.yes)
    sweep.check_local_resources()
    from overtok.tracking import check_ray_head, check_server, resolve_tracking_uri

    if sweep.ray_address:
        check_ray_head(sweep.ray_address)
    check_server(resolve_tracking_uri(sweep.tracking_uri))
    for note in sweep.notes():
        print(f"[overtok] note: {note}", flush=True)
    res = run_sweep(sweep, started)
    if res.get("timed_out"):
        return 124  # as timeout(1) reports a command it stopped
    if res.get("interrupted"):
        return 143 if res.get("terminated") else 130  # 128 + the signal, as a shell reports it
    return 0 if res["failed"] == 0 else 1


def cmd_export(args) -> int:
    from overtok.export import export_sweep

    paths = export_sweep(args.sweep, args.tracking_uri, Path(args.out) if args.out else None, args.set)
    for p in paths:
        print(f"[overtok] wrote {p}")
    return 0


def cmd_status(args) -> int:
    from overtok.status import status_table, sweep_status

    print(status_table(*sweep_status(args.sweep, args.tracking_uri, args.set)))
    return 0


def cmd_stop(args) -> int:
    from overtok.status import stop_trial

    st = stop_trial(args.sweep, args.trial, args.tracking_uri, args.set, wait_s=args.wait)
    if st.status == "RUNNING":
        print(f"[overtok] asked trial {st.trial_id} to stop; it has not stopped within {args.wait:g} s (it stops at its "
              "next logging step)")
    else:
        print(f"[overtok] trial {st.trial_id} ({st.name}) stopped: {st.status} at {st.tokens:,.0f} tokens; rerun the "
              "sweep to resume it")
    return 0


def cmd_export_model(args) -> int:
    from overtok.hf import export_model

    print(f"[overtok] wrote {export_model(args.checkpoint, args.out)} (load it with transformers' "
          "AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_generate(args) -> int:
    from overtok.hf import generate_text

    print(generate_text(args.checkpoint, args.prompt, args.tokens, args.temperature, args.seed))
    return 0


def cmd_merge(args) -> int:
    from overtok.export import merge_exports

    keep = None
    if args.sweep:
        from overtok.sweep import load_sweep

        keep = {t.trial_id for t in load_sweep(args.sweep).trials}
    s = merge_exports(Path(args.base), [Path(p) for p in args.reruns], Path(args.out), keep)
    print(f"[overtok] wrote {args.out}: {s['trials']} trials of {s['sweep']!r}, {len(s['replaced'])} replaced, "
          f"{len(s['added'])} added"
          + (f", {len(s['not_in_sweep'])} not in {args.sweep} left out" if keep is not None else "") + (f", not finished so not taken: {', '.join(s['skipped_not_finished'])}"
                                         if s["skipped_not_finished"] else ""))
    return 0


def cmd_fit(args) -> int:
    from analysis.commands import fit_sweep

    print(f"[overtok] wrote {fit_sweep(_results_dir(args.sweep), bootstrap=args.bootstrap, at_tokens=args.at_tokens)}")
    return 0


def cmd_effects(args) -> int:
    import pandas as pd

    from analysis.effects import effects_markdown, paired_effects
    from analysis.tables import load_export

    parts = [load_export(_results_dir(d)) for d in args.results]
    runs = pd.concat([r for r, _ in parts], ignore_index=True)
    curves = pd.concat([c for _, c in parts], ignore_index=True)
    done = runs[runs.status == "FINISHED"]
    if args.at_tokens is not None and len(done) and not (done.get("tokens_seen", 0) >= args.at_tokens).any():
        from overtok.config import ConfigError

        raise ConfigError(f"{args.at_tokens:,.0f}: no finished trial trained that many tokens (the longest trained "
                          f"{done['tokens_seen'].max():,.0f})", file="--at-tokens")
    print(effects_markdown(paired_effects(runs, curves, tail=args.tail, at_tokens=args.at_tokens)), end="")
    return 0


def cmd_hashstats(args) -> int:
    import numpy as np

    from analysis.hashing import hash_use, hash_use_markdown
    from overtok.config import ConfigError, to_dict
    from overtok.data import ensure_prepared
    from overtok.data.text import read_meta
    from overtok.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.set)
    _select(sweep, args)
    oe = [t.config for t in sweep.trials if t.config.model.oe.n > 1]
    if not oe:
        raise ConfigError("no trial has OE tables (model.oe.n > 1)", file=args.sweep, key="model.oe.n")
    if any(c.data.kind != "text" for c in oe):
        raise ConfigError("hashstats counts n-grams of a text corpus (data.kind: text)", file=args.sweep,
                          key="data.kind")
    by_data: dict[str, list] = {}
    for c in oe:
        by_data.setdefault(json.dumps(to_dict(c)["data"], sort_keys=True), []).append(c)
    for cfgs in by_data.values():
        cfg = ensure_prepared(cfgs[0])
        meta = read_meta(cfg.data.path)
        tokens = np.memmap(Path(cfg.data.path) / "train.bin", dtype=meta["dtype"], mode="r")
        tables = sorted({t for c in cfgs for t in c.model.oe_moduli()})
        epochs = cfg.train.max_steps * cfg.tokens_per_step / meta["train_tokens"]
        print(f"{cfg.data.corpus or cfg.data.path}: training split {meta['train_tokens']:,} tokens, V = "
              f"{cfg.model.input_vocab_size:,}; a trial reads {epochs:.2f} epochs of it\n")
        print(hash_use_markdown(hash_use(tokens, cfg.model.input_vocab_size, tables, epochs)))
    return 0


def cmd_config_show(args) -> int:
    from overtok.config import load_config, show_config

    print(show_config(load_config(args.config, args.set)))
    return 0


def cmd_config_reference(args) -> int:
    from overtok.config import config_reference

    print(config_reference(), end="")
    return 0


def cmd_plots(args) -> int:
    from analysis.commands import plot_sweep

    for p in plot_sweep(_results_dir(args.sweep)):
        print(f"[overtok] wrote {p}")
    return 0


def cmd_fit_law(args) -> int:
    import json

    from analysis.commands import fit_law_table

    def progress(done: int, total: int) -> None:
        if args.json:
            return
        if done == 0:
            print(f"[overtok] fitted; {total} bootstrap resamples for the CIs", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"[overtok] bootstrap {done}/{total}", file=sys.stderr, flush=True)

    res = fit_law_table(args.law, args.table, bootstrap=args.bootstrap, seed=args.seed, columns=args.columns,
                        progress=progress, plot=args.plot)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(res["formula"])
        for k, v in res["estimates"].items():
            lo, hi = res["ci"][k]
            ci = f"[{lo:.6g}, {hi:.6g}]" if lo is not None and hi is not None else "(no CI: --bootstrap below 2)"
            print(f"{k:>10} = {v:.6g}  {ci}")
    return 0


def cmd_report(args) -> int:
    from overtok.report import report_sweep

    page = report_sweep(args.sweep, args.tracking_uri, args.ui, overrides=args.set, at_tokens=args.at_tokens,
                        bootstrap=args.bootstrap)
    print(f"[overtok] wrote {page}")
    return 0


def cmd_ui(args) -> int:
    import os
    import subprocess

    from overtok.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if args.host not in ("127.0.0.1", "localhost") and not args.expose:
        from overtok.config import ConfigError

        raise ConfigError(f"binding {args.host} exposes every run to the network; add --expose to confirm",
                          file="--host", key="host")
    print(f"[overtok] MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # the server's own deprecation warnings (MLflow's, Starlette's) are not the user's to act on; Starlette's is a
    # UserWarning, matched by the start of its message
    quiet = ["ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:starlette.middleware.wsgi is deprecated"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PYTHONWARNINGS=",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *quiet])))
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port), "--workers", "1",
           "--backend-store-uri", uri]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def _results_dir(sweep: str) -> Path:
    """Accept a sweep name, a sweep YAML path or a results/<sweep> directory."""
    p = Path(sweep)
    if p.is_dir():
        return p
    if p.suffix in (".yaml", ".yml"):
        from overtok.sweep import load_sweep

        return Path("results") / load_sweep(p).name
    return Path("results") / sweep


def _int_at_least(text: str, low: int, what: str, whole_floats: bool = False) -> int:
    """An integer >= ``low`` read from ``text`` (with ``whole_floats``, also ``1e6``-style text of a whole number);
    otherwise argparse's one-line error naming ``what``."""
    try:
        value = float(text) if whole_floats else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (whole_floats and not float(value).is_integer()):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return int(value)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    value = _int_at_least(text, 1, "a port number")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (``1e6``-style text allowed when it is a whole number)."""
    return _int_at_least(text, 1, "an integer >= 1", whole_floats=True)


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _out_dir(text: str) -> str:
    """An argparse type: a directory to write into; refused when it exists and is not a directory."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


def _ids(text: str) -> list[str]:
    """An argparse type: comma-separated trial ids (or their first characters)."""
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids or not all(re.fullmatch(r"[0-9a-f]+", t) for t in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated trial ids (hex), got {text!r}")
    return ids


def _seeds(text: str) -> list[int]:
    """An argparse type: comma-separated seeds."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_subset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", type=_ids, default=None, metavar="ID[,ID...]",
                   help="only these trials (ids or their first characters, as `overtok plan` lists them); ids stay "
                        "those of the whole grid")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="S[,S...]", help="only the trials of these seeds")
    p.add_argument("--skip-done", nargs="+", default=None, metavar="EXPORT",
                   help="leave out the trials FINISHED in these exports (`overtok export`/`merge` folders)")
    p.add_argument("--max-trials", type=_positive, default=None, metavar="N",
                   help="at most the first N of the chosen trials, in the order `overtok plan` lists them "
                        "(sweep: of those its MLflow store does not hold FINISHED)")


def _select(sweep, args, run: bool = False) -> None:
    """Apply the subset options of _add_subset to a loaded sweep. For a ``run`` (`overtok sweep`), --max-trials
    counts the trials its MLflow store does not hold FINISHED (the same command on the same machine runs the next
    ones); elsewhere, the first N of the selection."""
    skip = None
    if args.skip_done:
        from overtok.export import finished_trials

        skip = set(finished_trials(args.skip_done))
    sweep.select(args.only, args.seeds, skip, None if run else args.max_trials)
    if run:
        sweep.run_limit = args.max_trials


def _add_at_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--at-tokens", type=_positive, nargs="+", default=[], metavar="T",
                   help="also fit the log-linear law with the losses read at these token counts (e.g. each epoch's "
                        "end): fits.json's loglinear_at_tokens")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage stays behind --help)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="overtok", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (one MLflow run)")
    p.add_argument("config", nargs="?", help="training config YAML (omit for the built-in defaults)")
    _add_set(p, "override a config key (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved model; train nothing")
    _add_tracking(p)
    p.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="data commands").add_subparsers(dest="data_command", required=True)
    p = d.add_parser("prepare", help="tokenize local text/JSONL/Parquet files into memmapped shards")
    p.add_argument("inputs", nargs="+", help="files or directories (.txt, .txt.xz, .jsonl, .parquet, HF save_to_disk dirs)")
    p.add_argument("--out", type=_out_dir, required=True, help="output directory")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer.json path, or bpe:<V> to train a BPE here")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (by hash)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    p.add_argument("--max-docs", type=int, default=0, help="use N documents drawn across all sources, seeded by --seed (0 = all)")
    p.add_argument("--exclude", default="", help="comma-separated file-name patterns of input files to leave out")
    p.set_defaults(fn=cmd_data_prepare)

    c = sub.add_parser("config", help="configuration: show a resolved config, or the reference of every field")
    c = c.add_subparsers(dest="config_command", required=True)
    p = c.add_parser("show", help="print the resolved config (defaults < CONFIG < --set) with each field's note")
    p.add_argument("config", nargs="?", default=None)
    _add_set(p, "override a config key")
    p.set_defaults(fn=cmd_config_show)
    p = c.add_parser("reference", help="print docs/config.md: every field, its type, default and meaning")
    p.set_defaults(fn=cmd_config_reference)

    p = sub.add_parser("plan", help="validate and expand a sweep; print one row per trial; run nothing")
    p.add_argument("sweep")
    _add_set(p, "override a sweep key (e.g. base.data.path=...)")
    _add_subset(p)
    p.add_argument("--done", nargs="+", default=None, metavar="EXPORT",
                   help="exports (`overtok export`/`merge` folders) whose finished trials are marked, with the "
                        "--only list of the trials still to run")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("sweep", help="run a sweep with Ray Tune, tracked in MLflow (resumable)")
    p.add_argument("sweep")
    p.add_argument("--address", default="", help="join an existing Ray cluster (ray start --head); default: local Ray")
    p.add_argument("--max-concurrent", type=int, default=0, help="override the sweep's max_concurrent")
    _add_set(p, "override a sweep key")
    p.add_argument("--yes", action="store_true", help="allow grids larger than the size limit and checkpoints larger than the free disk")
    _add_subset(p)
    p.add_argument("--time-limit", type=_seconds, default=None, metavar="S",
                   help="end within S seconds of this command's start: start a trial only if the last trial's time, "
                        "scaled to its size, says it ends in time (the first always starts); stop one still running "
                        "at the limit (KILLED, resumable); exit 124 if that happened")
    _add_tracking(p)
    p.set_defaults(fn=cmd_sweep, exit_now=True)  # (see main)

    p = sub.add_parser("status", help="finished / running / pending / failed trials of a sweep, last loss, ETA")
    p.add_argument("sweep", help="sweep YAML (its trials, pending ones too) or name (its logged runs)")
    _add_set(p, "with a YAML: the same overrides the sweep ran with")
    _add_tracking(p)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("stop", help="ask one running trial to checkpoint and stop (KILLED, resumable); the sweep goes on")
    p.add_argument("sweep", help="sweep YAML or name")
    p.add_argument("--trial", required=True, help="the trial id, or its first characters")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the trial to stop")
    _add_set(p, "with a YAML: the same overrides the sweep ran with")
    _add_tracking(p)
    p.set_defaults(fn=cmd_stop)

    p = sub.add_parser("export", help="write results/<sweep>/runs.parquet and curves.parquet from MLflow")
    p.add_argument("sweep", help="sweep name (every run logged under it) or YAML (only its current trials)")
    _add_set(p, "with a YAML: the same overrides the sweep ran with")
    p.add_argument("--out", type=_out_dir, default="", help="output directory (default results/<sweep>)")
    _add_tracking(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("export-model", help="a trained model as a Hugging Face transformers directory (Llama)")
    p.add_argument("checkpoint", help="a checkpoint file (ckpt_*.pt) or a directory of them (the newest is used)")
    p.add_argument("--out", type=_out_dir, required=True, help="output directory")
    p.set_defaults(fn=cmd_export_model)

    p = sub.add_parser("generate", help="continue a text prompt with a trained model")
    p.add_argument("checkpoint", help="a checkpoint file (ckpt_*.pt) or a directory of them (the newest is used)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=_count, default=64, help="tokens to sample (fewer if the model ends the text)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=_count, default=0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("merge", help="an export whose trials are replaced by those of later reruns (same trial ids)")
    p.add_argument("base", help="results directory holding the sweep's export")
    p.add_argument("reruns", nargs="+", help="results directories of reruns; their FINISHED trials replace base's")
    p.add_argument("--out", type=_out_dir, required=True, help="directory for the merged export (then `overtok report` it)")
    p.add_argument("--sweep", default=None, metavar="SWEEP.yaml",
                   help="keep only this sweep's trials (e.g. its baselines from another sweep's export)")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("fit", help="fit scaling laws and speedups of an exported sweep -> results/<sweep>/fits.json")
    p.add_argument("sweep", help="sweep name, YAML or results directory")
    p.add_argument("--bootstrap", type=_count, default=200, help="bootstrap resamples for the CIs")
    _add_at_tokens(p)
    p.set_defaults(fn=cmd_fit)

    p = sub.add_parser("effects", help="each OE variant against its baseline, seed by seed, with 95%% CIs (Markdown)")
    p.add_argument("results", nargs="+", help="results directories holding exports (runs of several are pooled)")
    p.add_argument("--tail", type=_positive, default=10, help="train loss = mean of this many last logged points")
    p.add_argument("--at-tokens", type=_positive, default=None, metavar="T",
                   help="read both losses at T base tokens (points logged at step <= T) instead of at the end")
    p.set_defaults(fn=cmd_effects)

    p = sub.add_parser("hashstats", help="how a sweep's OE tables are used by its corpus: rows hit, updates per "
                                         "row, collisions (Markdown)")
    p.add_argument("sweep", help="sweep YAML (its text corpus is tokenized first if need be)")
    _add_set(p, "override a sweep key")
    _add_subset(p)
    p.set_defaults(fn=cmd_hashstats)

    p = sub.add_parser("plots", help="paper-style figures of an exported sweep -> results/<sweep>/figures/")
    p.add_argument("sweep", help="sweep name, YAML or results directory")
    p.set_defaults(fn=cmd_plots)

    p = sub.add_parser("fit-law", help="fit a law to any CSV/Parquet table")
    p.add_argument("law", choices=["chinchilla", "loglinear"], help="chinchilla: columns N, D, loss; loglinear: vocab, loss")
    p.add_argument("table")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--bootstrap", type=_count, default=100, help="bootstrap resamples for the CIs (0 = none)")
    p.add_argument("--columns", default="", help="map the table's columns to the law's, e.g. params=N,tokens=D")
    p.add_argument("--plot", default="", help="also draw the data and the fitted law into this image file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_fit_law)
    p = sub.add_parser("report", help="export, fit, plot and write dashboards/<sweep>/index.html (self-contained)")
    p.add_argument("sweep", help="sweep name or YAML (only its current trials), or a results directory holding an export")
    _add_set(p, "with a YAML: the same overrides the sweep ran with")
    p.add_argument("--ui", default="http://127.0.0.1:5000", help="MLflow UI base URL for the run and compare links")
    p.add_argument("--bootstrap", type=_count, default=100, help="bootstrap resamples for the fits' CIs")
    _add_at_tokens(p)
    _add_tracking(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("ui", help="start the MLflow UI on the project's store, bound to 127.0.0.1")
    p.add_argument("--port", type=_port, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --expose")
    p.add_argument("--expose", action="store_true", help="allow binding a non-loopback address (no authentication!)")
    _add_tracking(p)
    p.set_defaults(fn=cmd_ui)
    return ap


def _exit_now(rc: int) -> None:
    """End the process without the interpreter's teardown: after a sweep, freeing the modules of Ray, Tune and MLflow
    costs every sweep a noticeable share of its wall time (benchmarks/probe_driver_exit.py), and a signal that lands
    in the teardown would turn a chosen exit status into a death by that signal. The exit handlers still run first
    (logging, temporary files, Ray's), and the standard streams are flushed; every write the command made returned
    before this."""
    import os

    from overtok.compat import run_exit_handlers

    if not run_exit_handlers():  # (no such hook in this Python: the normal exit)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    from overtok.errors import sigterm_received, terminate_as_interrupt

    if argv is None:  # as a program (not main() called by other code): SIGTERM is handled as Ctrl-C, exit 143
        terminate_as_interrupt()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while modules are still being imported
        rc = 143 if sigterm_received() else 130
        print("overtok: terminated" if rc == 143 else "overtok: interrupted", file=sys.stderr)
        if argv is None:  # as a program: exit now, not after a teardown that could still be interrupted
            _exit_now(rc)
        return rc


def _main(argv: list[str] | None) -> int:
    from overtok.config import ConfigError
    from overtok.data.text import DataError
    from overtok.errors import CheckpointError, ExportError

    user_errors: tuple[type[Exception], ...] = (ConfigError, DataError)
    try:
        from analysis.tables import TableError

        user_errors += (TableError,)
    except ImportError:
        pass
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
        if argv is None and getattr(args, "exit_now", False):  # as a program, not main() called by other code
            _exit_now(rc)
        return rc
    except user_errors as e:
        print(f"overtok: error: {e}", file=sys.stderr)
        return 2
    except (ExportError, CheckpointError) as e:  # the environment (disk, links), not the input: one line, exit 1
        print(f"overtok: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
