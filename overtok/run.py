"""A tracked single run (`overtok train`): one MLflow run around :func:`overtok.train.train`."""

from __future__ import annotations

import json
import traceback

from overtok import accounting
from overtok.config import RunConfig, flatten, to_dict
from overtok.tracking import ConsoleSink, FanOut, MlflowSink, client, experiment_id, log_params, resolve_tracking_uri


def run_params(cfg: RunConfig) -> dict:
    """Flat config plus the accounting every analysis needs (one name per concept, as in the Parquet export)."""
    params = flatten(to_dict(cfg))
    params = {k: v for k, v in params.items() if not k.startswith("tracking.")}
    params.update({f"params.{k}": v for k, v in accounting.param_groups(cfg.model).items()})
    params["flops_per_token"] = accounting.flops_per_token(cfg.model)
    params["tokens_per_step"] = cfg.tokens_per_step
    params["optimizer"] = optimizer_label(cfg)
    return params


def optimizer_label(cfg: RunConfig) -> str:
    """How the OE tables are optimised: dense AdamW, or row-sparse Adam in its exact or lazy mode."""
    oe = cfg.model.oe
    if not (oe.sparse_update and oe.n > 1):
        return "adamw"
    return "adamw+oe_row_adam_exact" if oe.sparse_mode == "exact" else "adamw+oe_lazy_row_adam"


def tracked_train(cfg: RunConfig, tracking_uri: str = "") -> tuple[str, dict]:
    """Train with an MLflow run; returns (run_id, summary). Status FINISHED, FAILED (error recorded) or KILLED."""
    from overtok.train import train

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    c = client(uri)
    exp = experiment_id(c, cfg.tracking.experiment, uri)
    run = c.create_run(exp, run_name=cfg.tracking.run_name or cfg.name)
    rid = run.info.run_id
    log_params(c, rid, run_params(cfg))
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
