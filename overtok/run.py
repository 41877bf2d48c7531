"""A tracked single run (`overtok train`): one MLflow run around :func:`overtok.train.train`."""

from __future__ import annotations

import json
import traceback

from overtok import accounting
from overtok.config import RunConfig, to_dict
from overtok.identity import code_version
from overtok.tracking import ConsoleSink, FanOut, MlflowSink, client, experiment_id, log_params, resolve_tracking_uri


def tracked_train(cfg: RunConfig, tracking_uri: str = "") -> tuple[str, dict]:
    """Train with an MLflow run; returns (run_id, summary). Status FINISHED, FAILED (error recorded) or KILLED."""
    from overtok.train import train

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    c = client(uri)
    exp = experiment_id(c, cfg.tracking.experiment, uri)
    run = c.create_run(exp, run_name=cfg.tracking.run_name or cfg.name, tags={"overtok.code": code_version()})
    rid = run.info.run_id
    log_params(c, rid, accounting.run_params(cfg))
    c.log_text(rid, json.dumps(to_dict(cfg), indent=2), "config.json")
    print(f"[overtok] MLflow run {rid} in experiment {cfg.tracking.experiment!r} at {uri}")
    mlflow_sink = MlflowSink(c, rid)
    sink = FanOut(mlflow_sink, ConsoleSink(cfg.train.max_steps, cfg.tokens_per_step))
    try:
        summary = train(cfg, sink)
    except KeyboardInterrupt:
        mlflow_sink.close()
        c.set_terminated(rid, "KILLED")
        raise
    except Exception as e:
        mlflow_sink.close()
        c.set_tag(rid, "overtok.error", f"{type(e).__name__}: {e}"[:5000])
        c.log_text(rid, traceback.format_exc(), "error.txt")
        c.set_terminated(rid, "FAILED")
        raise
    mlflow_sink.close()
    c.set_terminated(rid, "FINISHED")
    return rid, summary
