"""`overtok status` and `overtok stop`: where a sweep stands, from its MLflow runs (while it runs and after), and
a request to one running trial to checkpoint and stop (``overtok.train.STOP_FILE``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from overtok.config import ConfigError
from overtok.tracking import ROLE_TAG, SWEEP_TAG, TRIAL_ID_TAG, client, resolve_tracking_uri


@dataclass
class TrialState:
    trial_id: str
    name: str
    status: str  # FINISHED, RUNNING, FAILED, KILLED, or PENDING (no run yet)
    tokens: float = math.nan  # base tokens of the last logged training loss
    target: float = math.nan  # base tokens at max_steps
    loss: float = math.nan  # the last logged training loss
    tokens_per_s: float = math.nan
    checkpoint_dir: str = ""
    packed: bool = False
    run_id: str = ""

    @property
    def eta_s(self) -> float:
        if self.status != "RUNNING" or not self.tokens_per_s > 0:
            return math.nan
        return max(self.target - self.tokens, 0.0) / self.tokens_per_s


def _sweep_runs(sweep: str, tracking_uri: str, overrides: list[str] | None):
    """(sweep name, {trial id: Trial} from the YAML or {}, ids of packed trials, MLflow client, latest run per id)."""
    trials = {}
    if sweep.endswith((".yaml", ".yml")):
        from overtok.sweep import load_sweep

        s = load_sweep(sweep, overrides)
        name, experiment, tracking_uri = s.name, s.experiment, tracking_uri or s.tracking_uri
        trials = {t.trial_id: t for t in s.trials}
        packed = {t.trial_id for group in s.packs() if len(group) > 1 for t in group}
    else:
        name = experiment = sweep
        packed = set()
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    latest: dict[str, object] = {}
    if exp is not None:
        for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'", max_results=50000):
            if r.data.tags.get(ROLE_TAG) != "trial":
                continue
            tid = r.data.tags[TRIAL_ID_TAG]
            prev = latest.get(tid)
            if prev is None or r.info.start_time > prev.info.start_time:
                latest[tid] = r
    if not trials and not latest:
        raise ConfigError(f"no runs of sweep {name!r} at {uri} (run it first, or give its YAML)", file=sweep)
    return name, trials, packed, c, latest


def sweep_status(sweep: str, tracking_uri: str = "", overrides: list[str] | None = None) -> tuple[str, list[TrialState]]:
    """Every trial of the sweep (the YAML's, or every run logged under the name) with its state."""
    name, states, _ = _status(sweep, tracking_uri, overrides)
    return name, states


def _status(sweep: str, tracking_uri: str, overrides: list[str] | None):
    name, trials, packed, c, latest = _sweep_runs(sweep, tracking_uri, overrides)
    out = []
    for tid in list(trials) + [t for t in latest if t not in trials]:
        r = latest.get(tid)
        trial = trials.get(tid)
        st = TrialState(tid, trial.run_name if trial else (r.info.run_name if r else tid),
                        r.info.status if r else "PENDING", packed=tid in packed)
        params = r.data.params if r else {}
        try:
            cfg = trial.config if trial else None
            steps = cfg.train.max_steps if cfg else int(params["train.max_steps"])
            per_step = cfg.tokens_per_step if cfg else int(params["tokens_per_step"])
            st.target = float(steps * per_step)
        except (KeyError, ValueError):
            pass
        st.checkpoint_dir = trial.config.train.checkpoint_dir if trial else params.get("train.checkpoint_dir", "")
        if r is not None:
            st.run_id = r.info.run_id
            hist = c.get_metric_history(r.info.run_id, "train/loss")
            if hist:
                last = max(hist, key=lambda m: m.step)
                st.tokens, st.loss = float(last.step), float(last.value)
            st.tokens_per_s = float(r.data.metrics.get("perf/tokens_per_s", math.nan))
        out.append(st)
    return name, out, c


def status_table(name: str, states: list[TrialState]) -> str:
    """The status as text: one line per trial, then the counts and the sweep's ETA (the tokens left of running and
    pending trials over the running trials' combined rate)."""
    def fmt_tokens(x: float) -> str:
        return "-" if not math.isfinite(x) else f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}K"

    def fmt_s(x: float) -> str:
        return "-" if not math.isfinite(x) else f"{x / 60:.0f}m{x % 60:02.0f}s"

    width = max([len(s.name) for s in states] + [5])
    lines = [f"{'trial':<12}  {'name':<{width}}  {'status':<8}  {'loss':>7}  {'tokens':>15}  {'ETA':>8}"]
    for s in states:
        loss = f"{s.loss:.4f}" if math.isfinite(s.loss) else "-"
        lines.append(f"{s.trial_id:<12}  {s.name:<{width}}  {s.status:<8}  {loss:>7}  "
                     f"{fmt_tokens(s.tokens) + '/' + fmt_tokens(s.target):>15}  {fmt_s(s.eta_s):>8}")
    counts = {k: sum(s.status == k for s in states) for k in ("FINISHED", "RUNNING", "PENDING", "FAILED", "KILLED")}
    rate = sum(s.tokens_per_s for s in states if s.status == "RUNNING" and s.tokens_per_s > 0)
    left = sum(max(s.target - (s.tokens if math.isfinite(s.tokens) else 0.0), 0.0) for s in states
               if s.status in ("RUNNING", "PENDING") and math.isfinite(s.target))
    eta = left / rate if rate > 0 else math.nan
    lines.append(f"sweep {name}: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
                 + (f"; ETA {fmt_s(eta)} at the running trials' {rate:,.0f} tokens/s" if math.isfinite(eta) else ""))
    return "\n".join(lines)


def stop_trial(sweep: str, trial: str, tracking_uri: str = "", overrides: list[str] | None = None,
               wait_s: float = 120.0) -> TrialState:
    """Ask the running trial whose id starts with ``trial`` to checkpoint and stop (its run ends KILLED; rerunning
    the sweep resumes it); wait up to ``wait_s`` seconds for its run to end."""
    from overtok.train import STOP_FILE

    name, states, c = _status(sweep, tracking_uri, overrides)
    match = [s for s in states if s.trial_id.startswith(trial)]
    if len(match) != 1:
        raise ConfigError(f"{'no' if not match else 'more than one'} trial of sweep {name!r} has an id starting with "
                          f"{trial!r}", file="--trial")
    st = match[0]
    if st.status != "RUNNING":
        raise ConfigError(f"trial {st.trial_id} is {st.status}, not RUNNING: nothing to stop", file="--trial")
    if st.packed:
        raise ConfigError(f"trial {st.trial_id} trains in a pack with other trials (pack > 1): it cannot stop alone",
                          file="--trial")
    ckpt = Path(st.checkpoint_dir) if st.checkpoint_dir else None
    if ckpt is not None and not ckpt.is_dir() and ckpt.parent.parent.is_dir():  # no checkpoint written yet
        ckpt.mkdir(parents=True, exist_ok=True)
    if ckpt is None or not ckpt.is_dir():
        raise ConfigError(f"trial {st.trial_id}: its checkpoint directory {st.checkpoint_dir or '?'} is not on this "
                          "machine (run overtok stop where the trial runs)", file="--trial")
    (Path(st.checkpoint_dir) / STOP_FILE).write_text("stop requested by overtok stop\n")
    deadline = time.time() + wait_s
    while time.time() < deadline:  # only the run's status, once a second; the whole state once it has changed
        time.sleep(1.0)
        if c.get_run(st.run_id).info.status != "RUNNING":
            return {s.trial_id: s for s in sweep_status(sweep, tracking_uri, overrides)[1]}[st.trial_id]
    return st
