"""The driver side of a sweep: Ray Tune orchestration and the sweep's MLflow bookkeeping (the worker side, what
runs inside a trial process, is overtok.trial; the two are the modules that import ray).

Design (see docs/sweeps.md):
- The trial function (overtok.trial) is a few lines around the same ``train()`` as `overtok train`; its sink
  buffers metric points and sends them to the driver with ``tune.report`` (never one request per point).
- The driver is the single MLflow writer (a Tune callback): no "database is locked" with SQLite and
  several trials, and one place that buffers and retries when a tracking server is down.
- Trials checkpoint into ``<storage_path>/<sweep>/trials/<trial_id>/`` and resume from there, whether
  retried by Tune (FailureConfig) or rerun by a new `overtok sweep` after the driver died. We do not rely on
  ``Tuner.restore`` (its saved state lags a SIGKILL, see ../shared/STACK.md).
- MLflow: one experiment per sweep, a parent run, one child run per trial id (tag mlflow.parentRunId).
  Rerunning reuses the child run of an unfinished trial (no duplicates) and skips FINISHED ones.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from overtok.config import ConfigError
from overtok.errors import sigterm_received
from overtok.sweep import Sweep, Trial, flat_params, trial_demand, trial_workers
from overtok.tracking import (
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    MetricBuffer,
    RetryingClient,
    client,
    experiment_id,
    last_steps,
    log_params,
    resolve_tracking_uri,
    sqlite_path,
)
from overtok.trial import ERROR_KEY, MEMBER_KEY, POINTS_KEY, STOPPED_KEY, trial_main

# ----------------------------------------------------------------------------------------------
# Driver side: MLflow bookkeeping


class SweepTracker:
    """Parent run, child run per trial id, and the status of each; all MLflow writes of a sweep go through here."""

    def __init__(self, sweep: Sweep, uri: str):
        self.sweep, self.uri = sweep, uri
        self.c = RetryingClient(client(uri))
        self.exp = experiment_id(self.c, sweep.experiment, uri)
        runs = self.c.search_runs([self.exp], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep.name}'", max_results=50000)
        parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "parent"]
        if parents:
            self.parent = parents[0].info.run_id
            self.c.update_run(self.parent, "RUNNING")
        else:
            run = self.c.create_run(self.exp, run_name=sweep.name, tags={SWEEP_TAG: sweep.name, ROLE_TAG: "parent"})
            self.parent = run.info.run_id
            self.c.log_text(self.parent, open(sweep.file, encoding="utf-8").read(), "sweep.yaml")
        self.children: dict[str, Any] = {}
        for r in runs:
            tid = r.data.tags.get(TRIAL_ID_TAG)
            if tid and r.data.tags.get(ROLE_TAG) == "trial":
                prev = self.children.get(tid)
                if prev is None or (r.info.status == "FINISHED" and prev.info.status != "FINISHED"):
                    self.children[tid] = r
        self.buffers: dict[str, MetricBuffer] = {}
        self.errors: dict[str, str] = {}

    def finished(self) -> set[str]:
        return {tid for tid, r in self.children.items() if r.info.status == "FINISHED"}

    def close_stale(self, keep: set[str]) -> None:
        """RUNNING children not about to be resumed were left by a dead driver: close them as KILLED."""
        for tid, r in self.children.items():
            if r.info.status == "RUNNING" and tid not in keep:
                self.c.set_terminated(r.info.run_id, "KILLED")

    def start(self, trial: Trial) -> None:
        prev = self.children.get(trial.trial_id)
        if prev is not None:  # resume: same run, drop re-sent points at already logged steps
            rid = prev.info.run_id
            self.c.update_run(rid, "RUNNING")
            self.buffers[trial.trial_id] = MetricBuffer(self.c, rid, last_steps(self.c, rid))
            return
        run = self.c.create_run(self.exp, run_name=trial.run_name, tags={
            "mlflow.parentRunId": self.parent, TRIAL_ID_TAG: trial.trial_id, SWEEP_TAG: self.sweep.name,
            ROLE_TAG: "trial"})
        rid = run.info.run_id
        params = flat_params(trial)
        params.update({f"varied.{k}": v for k, v in trial.varied.items()})
        params.update({f"resources.{k}": v for k, v in self.sweep.resources.items()})
        log_params(self.c, rid, params)
        self.c.log_text(rid, trial.to_json(), "trial.json")
        self.children[trial.trial_id] = self.c.get_run(rid)
        self.buffers[trial.trial_id] = MetricBuffer(self.c, rid)

    def add_points(self, tid: str, payload: str) -> None:
        buf = self.buffers[tid]
        for key, value, step, ts in json.loads(payload):
            buf.add(key, value, step, ts)
        buf.flush()  # on failure the points stay buffered and go with the next flush

    def end(self, tid: str, status: str, error: str | None = None) -> None:
        buf = self.buffers.get(tid)
        if buf is None:
            return
        buf.flush_with_retry()
        rid = buf.run_id
        if error:
            self.c.set_tag(rid, "overtok.error", error[:5000])
        self.c.set_terminated(rid, status)
        self.children[tid] = self.c.get_run(rid)

    def end_parent(self, status: str, summary: dict) -> None:
        for k, v in summary.items():
            self.c.log_metric(self.parent, f"sweep/{k}", v)
        self.c.set_terminated(self.parent, status)


class TimeBox:
    """`overtok sweep --time-limit`: the sweep ends within ``limit_s`` seconds of ``started``.

    A trial starts only if it is expected to end by then: the trial that ended last took ``s`` seconds, so one of
    estimated cost ``c`` (``costs``, relative: the plan's GPU seconds) needs ``s * c / c_last``, plus
    ``MARGIN`` of that and ``RESERVE_S`` for Ray's stop. Before any trial has ended there is nothing to scale: a
    trial then starts unless even ``FLOOR`` of its estimated GPU seconds (``estimates``, by the plan's calibration
    on its fastest GPU, without compilation or start-up; none where the calibration is not at hand) would end
    after the limit. The trials held back are never started (no MLflow run): a rerun runs them. A trial still
    running at the limit is stopped (its run KILLED, resumable, as after Ctrl-C).
    """

    MARGIN = 0.05
    RESERVE_S = 5.0
    # the loglinear_code trials took 1.1-1.45x their estimate on an H100 (results/REPRODUCTION.md); 0.8 leaves room
    # for a faster machine than the calibration's and for its error
    FLOOR = 0.8

    def __init__(self, started: float, limit_s: float, costs: dict[str, float], clock=time.time,
                 estimates: dict[str, float] | None = None):
        self.deadline = started + limit_s
        self.costs = costs  # Tune trial (a trial id, or a pack's id) -> estimated cost, any unit
        self.estimates = estimates or {}  # Tune trial -> estimated GPU seconds, where calibrated
        self.clock = clock
        self.begun: dict[str, float] = {}
        self.last: tuple[str, float] | None = None  # (Tune trial, seconds) of the trial that ended last
        self.held_back: str | None = None  # the first trial not started, with the seconds it would need
        self.needed_s = 0.0
        self.by_estimate = False  # held back by the estimate's floor (nothing measured yet), not by a measure
        self.timed_out = False  # the limit passed with a trial still running (or before any started)

    def started(self, key: str) -> None:
        self.begun[key] = self.clock()

    def ended(self, key: str) -> None:
        """A trial ran to its end: its time scales the next ones."""
        t0 = self.begun.pop(key, None)
        if t0 is not None:
            self.last = (key, self.clock() - t0)

    def needs(self, key: str) -> float | None:
        """Seconds ``key`` is expected to take, or None before any trial has ended."""
        if self.last is None:
            return None
        prev, seconds = self.last
        return seconds * self.costs[key] / self.costs[prev]

    def admits(self, key: str) -> bool:
        need = self.needs(key)
        if need is None:
            floor = self.estimates.get(key, 0.0) * self.FLOOR
            if floor and self.clock() + floor > self.deadline:
                self.held_back, self.needed_s, self.by_estimate = key, floor, True
                return False
            return self.clock() < self.deadline
        if self.clock() + need * (1 + self.MARGIN) + self.RESERVE_S <= self.deadline:
            return True
        self.held_back, self.needed_s, self.by_estimate = key, need, False
        return False

    def expired(self) -> bool:
        if self.clock() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def left_s(self) -> float:
        return self.deadline - self.clock()


def trial_costs(sweep: Sweep, groups: list[list[Trial]]) -> tuple[dict[str, float], dict[str, float] | None]:
    """Each Tune trial's estimated cost, for TimeBox: seconds by the committed GPU calibration (compute and dense
    table updates), or training FLOPs where the calibration is not at hand (their ratios scale measured times);
    and the same seconds as TimeBox's estimates, None without the calibration."""
    from overtok.estimate import load_calibration, trial_seconds
    from overtok.sweep import trial_plan

    cal = load_calibration()
    workers = trial_workers(sweep.resources)

    def cost(t: Trial) -> float:
        plan = trial_plan(t, workers=workers)
        return trial_seconds(t.config, plan["total_flops"], cal, workers)[0] if cal else plan["total_flops"]

    costs = {_spec_id(g): sum(cost(t) for t in g) for g in groups}
    return costs, (costs if cal else None)


def _time_boxed_grid(box: TimeBox, max_concurrent: int):
    """Tune's grid generator (trials in the grid's order, at most ``max_concurrent`` at once), asking ``box``
    before each trial it hands to Tune; once one does not fit, it hands out none (the running ones end)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    class TimeBoxedGrid(BasicVariantGenerator):
        def next_trial(self):
            trial = super().next_trial()
            if trial is None or box.admits(json.loads(trial.config["trial"])["trial_id"]):
                return trial
            self.set_finished()
            return None

    return TimeBoxedGrid(max_concurrent=max_concurrent)


def _time_limit_stopper(box: TimeBox):
    from ray.tune import Stopper

    class TimeLimit(Stopper):
        """Stops the whole sweep (running trials included) once the limit has passed."""

        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return box.expired()

    return TimeLimit()


def _make_callback(tracker: SweepTracker, by_id: dict[str, Trial], total: int, skipped: int, to_run: int,
                   box: TimeBox | None = None):
    from ray.tune import Callback

    class TrackingCallback(Callback):
        """Driver-side MLflow writer and progress line."""

        def __init__(self):
            self.t0 = time.time()
            self.done = self.failed = 0
            self.running: set[str] = set()
            self.started: set[str] = set()
            self.stopped: set[str] = set()
            self.last_line = ""
            self.last_print = 0.0

        def _tids(self, trial) -> list[str]:
            """The sweep trials a Tune trial runs: one, or the members of a pack."""
            spec = json.loads(trial.config["trial"])
            return [m["trial_id"] for m in spec["pack"]] if "pack" in spec else [spec["trial_id"]]

        def on_trial_start(self, iteration, trials, trial, **info):
            for tid in self._tids(trial):
                if tid not in tracker.buffers:
                    tracker.start(by_id[tid])
                self.running.add(tid)
                self.started.add(tid)
            if box is not None:
                box.started(json.loads(trial.config["trial"])["trial_id"])
            self._progress()

        def on_trial_recover(self, iteration, trials, trial, **info):
            for tid in self._tids(trial):
                tracker.c.set_tag(tracker.buffers[tid].run_id, "overtok.retried", "true")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tid = result.get(MEMBER_KEY) or self._tids(trial)[0]  # a pack's results name their member
            if result.get(STOPPED_KEY):
                self.stopped.add(tid)
            if POINTS_KEY in result:
                tracker.add_points(tid, result[POINTS_KEY])
            if result.get("node_id"):
                from mlflow.entities import RunTag

                tracker.c.log_batch(tracker.buffers[tid].run_id, tags=[  # one write, not one per tag
                    RunTag(f"overtok.{k}", str(result.get(k, "")))
                    for k in ("node_id", "pid", "process_trial", "device", "code")])
            if result.get(ERROR_KEY):
                tracker.errors[tid] = result[ERROR_KEY]
            self._progress()

        def on_trial_complete(self, iteration, trials, trial, **info):
            tids = self._tids(trial)
            if box is not None and not any(t in tracker.errors or t in self.stopped for t in tids):
                box.ended(json.loads(trial.config["trial"])["trial_id"])  # trained to its end: scales the next
            for tid in tids:
                if tid in tracker.errors:  # a pack member that diverged while the others finished
                    self._fail(tid, tracker.errors[tid])
                    continue
                if tid in self.stopped:  # overtok stop: checkpointed, resumable by rerunning the sweep
                    tracker.end(tid, "KILLED")
                    self.running.discard(tid)
                    print(f"[overtok] trial {by_id[tid].run_name} stopped on request (rerun the sweep to resume)",
                          flush=True)
                    continue
                tracker.end(tid, "FINISHED")
                self.running.discard(tid)
                self.done += 1
            self._progress(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            for tid in self._tids(trial):
                self._fail(tid, tracker.errors.get(tid) or _error_text(trial))
            self._progress(force=True)

        def _fail(self, tid: str, err: str) -> None:
            tracker.end(tid, "FAILED", err)
            self.running.discard(tid)
            self.failed += 1
            print(f"[overtok] trial {by_id[tid].run_name} FAILED: {err.splitlines()[-1] if err else '?'}", flush=True)

        def _progress(self, force: bool = False):
            finished = self.done + self.failed + len(self.stopped)
            left = to_run - finished
            elapsed = time.time() - self.t0
            counts = (f"[overtok] sweep {tracker.sweep.name}: done {self.done + skipped}/{total} "
                      f"(skipped {skipped}) | running {len(self.running)} | failed {self.failed} | "
                      f"pending {max(left - len(self.running), 0)}")
            eta = f" | ETA {elapsed / finished * left:.0f}s" if finished and left else ""
            # a line when the counts change, else once a minute
            if force or (counts != self.last_line and time.time() - self.last_print > 2) or \
                    time.time() - self.last_print > 60:
                print(f"{counts} | elapsed {elapsed:.0f}s{eta}", flush=True)
                self.last_line, self.last_print = counts, time.time()

    return TrackingCallback()


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or getattr(trial.run_metadata, "error_filename", None)
    try:
        if path and os.path.exists(path):
            return open(path, encoding="utf-8").read()[-4000:]
    except OSError:
        pass
    return "trial failed (no error message recorded)"


# ----------------------------------------------------------------------------------------------
# Entry point


def _init_ray(sweep: Sweep) -> None:
    if not sweep.ray_address and sweep.starts_local_ray():
        # a new local Ray serves this process alone: its GCS, raylets and workers listen on 127.0.0.1 only (Ray's
        # single-machine switch, read when ray is first imported; without it they listen on every interface)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    on_term = signal.getsignal(signal.SIGTERM)  # the CLI's (SIGTERM as Ctrl-C), before ray.init sets Ray's own
    # quieter logs: Ray's note that token authentication is on (it stays on); colours only on a terminal
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not sys.stdout.isatty():
        import colorama  # Ray's own dependency, which colours its worker log prefixes

        colorama.init(strip=True, convert=False)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # our trials write no result.json (auto loggers off); Tune's end-of-run analysis would warn about it
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    from overtok.compat import ray_sigterm_handlers_held
    from overtok.errors import Terminated, sigterm_deferred

    if not sweep.ray_address:
        # local Ray; the dashboard stays off (nothing listens beyond what Ray itself needs). Workers find overtok
        # through PYTHONPATH inherited from this process: a runtime_env with the same variable would make Ray start
        # fresh workers for it instead of using the ones it prestarts (about a second more per trial process)
        paths = [p for p in sys.path if p]
        paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        if sweep.starts_local_ray():
            create_ray_token()
    # a SIGTERM while Ray starts waits until it has started (Ray's own handler would exit halfway and leave its
    # agents running), then stops it: the command ends as on any SIGTERM (exit 143)
    with sigterm_deferred() as came, ray_sigterm_handlers_held():
        if sweep.ray_address:
            ray.init(address=sweep.ray_address, logging_level="WARNING", log_to_driver=True)
        else:
            ray.init(include_dashboard=False, logging_level="WARNING")
    if came:
        _shutdown_ray()
        raise Terminated
    if sweep.ray_address:
        missing = sorted(k for k in sweep.resources if k not in ("cpu", "gpu", "workers")
                         and k not in ray.cluster_resources())
        if missing:
            ray.shutdown()
            raise ConfigError(f"no node of the Ray cluster at {sweep.ray_address} declares the custom resource "
                              f"{missing[0]!r}: its trials would wait forever (start nodes with --resources)",
                              file=sweep.file, key=f"resources.{missing[0]}")
    protect_ray_token()
    # Ray appends a hint about its log deduplication to the first deduplicated line, once per driver; marking it
    # as said keeps the sweep's log to the lines themselves ("[repeated Nx across cluster]" stays)
    from ray.util.debug import log_once

    log_once("log_dedup_warning")
    # where Ray's handler hook has moved, ray.init set Ray's own SIGTERM handlers (Python's: exit 1; native: a stack
    # dump) over the CLI's, which turns SIGTERM into Ctrl-C (overtok.errors.Terminated): the trials' runs then end
    # KILLED and Ray stops
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)


def _ray_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def create_ray_token() -> None:
    """Before a new local Ray with token authentication starts: where no token exists yet, create it owner-only
    (0600; Ray's own would be readable by every user of the machine), in Ray's format (64 hex digits). Ray then
    finds and uses it."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = _ray_token_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # not writable here: Ray makes its own
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def protect_ray_token() -> None:
    """A token file Ray wrote (~/.ray/auth_token, or $RAY_AUTH_TOKEN_PATH) is a credential: owner-only."""
    path = _ray_token_path()
    try:
        if path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass  # not ours to change: Ray's own permissions stand


def _data_parallel_concurrency(max_concurrent: int | None, resources: dict) -> int | None:
    """How many data-parallel trials to run at once. Tune reserves only a trial's coordinating process; its
    TorchTrainer asks Ray for the workers later, so Tune would start trials whose workers cannot all be placed (on
    2 GPUs, a second 2-GPU trial waits, and Ray Train times out and retries every minute). So: at most as many as
    the Ray cluster's resources hold now (a cluster that scales up later gets no more than that)."""
    import ray

    have = ray.cluster_resources()
    cpus, gpu = trial_demand(resources)
    n = _cluster_holds(resources)
    if n is None or (max_concurrent is not None and max_concurrent <= n):
        return max_concurrent
    if n < 1:
        print(f"[overtok] a data-parallel trial needs {cpus:g} CPUs and {gpu:g} GPUs; the Ray cluster has "
              f"{have.get('CPU', 0):g} and {have.get('GPU', 0):g}: trials wait until Ray can place their workers",
              flush=True)
        return max_concurrent
    print(f"[overtok] data-parallel trials ({trial_workers(resources)} workers each): at most {n} at once, as many as the Ray "
          f"cluster's {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs hold", flush=True)
    return n


def _spec_id(group: list[Trial]) -> str:
    """The Tune trial's id of a group of ``sweep.packs``: the trial's own, or for a pack one named by its members'
    ids (a rerun of the same unfinished members finds the pack's checkpoints)."""
    import hashlib

    if len(group) == 1:
        return group[0].trial_id
    ids = sorted(t.trial_id for t in group)
    return "pack-" + hashlib.sha1(",".join(ids).encode()).hexdigest()[:10]


def _cluster_holds(resources: dict) -> int | None:
    """How many trials of these resources the Ray cluster's resources hold at once now (None: they ask for none)."""
    import ray

    have = ray.cluster_resources()
    cpus, gpu = trial_demand(resources)
    fits = [have.get("CPU", 0.0) / cpus] if cpus else []
    fits += [have.get("GPU", 0.0) / gpu] if gpu else []
    return int(min(fits)) if fits else None


def _trials_at_once(resources: dict) -> int:
    return max(_cluster_holds(resources) or 1, 1)


def _pack_spec(sweep: Sweep, group: list[Trial]) -> str:
    """A Tune trial for a pack: its members, and a checkpoint directory named by the pack's id."""
    pid = _spec_id(group)
    return json.dumps({"trial_id": pid, "pack": [json.loads(t.to_json()) for t in group],
                       "checkpoint_dir": os.path.join(sweep.storage_path, sweep.name, "packs", pid)})


def _prepare(sweep: Sweep, uri: str, out: dict) -> None:
    """The driver's MLflow state (which trials are finished, stale runs closed) and the tokenized corpora."""
    try:
        from overtok.data import ensure_prepared

        tracker = SweepTracker(sweep, uri)
        out["tracker"] = tracker  # from here on the sweep has a run to end, whatever happens next
        finished = tracker.finished()
        todo = [t for t in sweep.trials if t.trial_id not in finished]
        tracker.close_stale({t.trial_id for t in todo})
        done, left = len(sweep.trials) - len(todo), len(todo)
        todo = todo[: sweep.run_limit]
        held = f" (--max-trials {sweep.run_limit}: {left - len(todo)} left for later)" if len(todo) < left else ""
        print(f"[overtok] sweep {sweep.name}: {len(sweep.trials)} trials, {done} already finished, {len(todo)} to "
              f"run{held}; MLflow {uri} experiment {sweep.experiment!r}", flush=True)
        for t in todo:  # tokenize text corpora once, here, before any trial starts
            ensure_prepared(t.config)
        out.update(tracker=tracker, todo=todo, finished=done)
    except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
        out["error"] = e


def _probably_all_finished(sweep: Sweep, uri: str) -> bool:
    """A quick read-only look into a local SQLite store, without importing MLflow: is every trial of the sweep
    FINISHED already? Only decides whether Ray starts before or after the MLflow bookkeeping (which then decides
    what runs); any doubt (another store, a schema this query does not know, a locked file) answers False."""
    db = sqlite_path(uri)
    if db is None or not os.path.exists(db):
        return False
    import sqlite3

    query = ("SELECT t.value FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
             "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = ? "
             "JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ? AND s.value = ? "
             "WHERE e.name = ? AND r.status = 'FINISHED' AND r.lifecycle_stage = 'active'")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            done = {row[0] for row in con.execute(query, (TRIAL_ID_TAG, SWEEP_TAG, sweep.name, sweep.experiment))}
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return {t.trial_id for t in sweep.trials} <= done


def _shutdown_ray() -> None:
    """Stop the local Ray this driver started (or leave the one it attached to). Ray stops its processes one after
    another, each with SIGTERM and up to 1 s of waiting; its autoscaler monitor (idle on one machine: no autoscaling
    config) used all of that second before Ray killed it anyway (benchmarks/probe_driver_exit.py). It is killed
    first."""
    import ray

    from overtok.compat import ray_monitor_processes

    for process in ray_monitor_processes():  # none where the driver attached
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    ray.shutdown()


class _DropTuneRestoreHint(logging.Filter):
    """Tune's end-of-run lines on an interrupted experiment ("Resume experiment with: Tuner.restore(...)", "Trials
    did not complete"): overtok resumes by rerunning the sweep, and says so itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Resume experiment with" not in msg and "Trials did not complete" not in msg


def remove_old_tune_runs(sweep: Sweep) -> None:
    """Tune's own state of earlier runs of this sweep (<storage>/<sweep>-<YYYYmmdd-HHMMSS>/): overtok resumes from
    MLflow and the trials' checkpoints (<storage>/<sweep>/trials/), never from it. Called while holding the
    driver lock; links are never followed."""
    import re
    import shutil

    pattern = re.compile(re.escape(sweep.name) + r"-\d{8}-\d{6}")
    root = Path(sweep.storage_path)
    if not root.is_dir():
        return
    for d in root.iterdir():
        if pattern.fullmatch(d.name) and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)


_DRIVER_LOCKS: dict[str, Any] = {}  # open lock files, held until the process ends


def hold_driver_lock(sweep: Sweep) -> None:
    """One driver per sweep: an exclusive lock on <storage>/<sweep>/driver.lock, held until this process ends (the
    kernel releases it when the process dies, however it dies). A second driver of the same sweep is refused."""
    import fcntl

    path = Path(sweep.storage_path) / sweep.name / "driver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"another overtok sweep is running this sweep ({holder}); wait for it to end or stop it",
                          file=sweep.file, key="name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    _DRIVER_LOCKS[str(path)] = f


def _tuner(sweep: Sweep, tracker: SweepTracker, todo: list[Trial], skipped: int, clock: list):
    """Tune's Tuner for the trials ``todo`` (packed where the sweep packs), the driver's MLflow callback and the
    sweep's TimeBox (None without --time-limit)."""
    from ray import tune

    clock.append(("setup", time.time()))  # Ray start, with MLflow and data alongside
    resources = dict(sweep.resources)
    cpu, gpu = resources.pop("cpu", 1.0), resources.pop("gpu", 0.0)
    workers = trial_workers(sweep.resources)
    resources.pop("workers", None)
    if workers > 1:  # the trial itself only coordinates; its TorchTrainer workers hold cpu/gpu each
        trial_bundle = {"CPU": 0.01, **resources}
        per_worker_gpu = gpu / workers if gpu else 0.0
    else:
        trial_bundle = {"CPU": cpu, "GPU": gpu, **resources}
        per_worker_gpu = gpu
    max_concurrent = sweep.max_concurrent or None
    if workers > 1:
        max_concurrent = _data_parallel_concurrency(max_concurrent, sweep.resources)
    trainable = tune.with_resources(trial_main, tune.PlacementGroupFactory([trial_bundle]))
    groups = sweep.packs(todo)
    box = None
    if sweep.time_limit is not None:
        costs, estimates = trial_costs(sweep, groups)
        box = TimeBox(clock[0][1], sweep.time_limit, costs, estimates=estimates)
    callback = _make_callback(tracker, {t.trial_id: t for t in sweep.trials}, len(sweep.trials), skipped, len(todo), box)
    specs = [group[0].to_json() if len(group) == 1 else _pack_spec(sweep, group) for group in groups]
    if len(specs) < len(todo):
        print(f"[overtok] {len(todo)} trials packed into {len(specs)} models (pack: {sweep.pack})", flush=True)
    search, stop = {}, None
    if box is not None:  # trials handed to Tune one slot at a time, each only if it fits the time left
        search = {"search_alg": _time_boxed_grid(box, max_concurrent or _trials_at_once(sweep.resources))}
        max_concurrent, stop = None, _time_limit_stopper(box)
        print(f"[overtok] --time-limit {sweep.time_limit:g} s: {box.left_s():.0f} s left; a trial starts only if "
              "the last one's time, scaled to its size, says it ends in time", flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(specs), "workers": workers,
                     "worker_cpu": cpu, "worker_gpu": per_worker_gpu, "storage_path": sweep.storage_path,
                     "reuse": sweep.reuse_processes},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=sweep.reuse_processes,
                                    trial_name_creator=lambda tr: json.loads(tr.config["trial"])["trial_id"],
                                    trial_dirname_creator=lambda tr: json.loads(tr.config["trial"])["trial_id"],
                                    **search),
        run_config=tune.RunConfig(name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=sweep.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  callbacks=[callback], stop=stop, verbose=0),
    )
    return tuner, callback, box


def _abandon(prep: dict, sweep: Sweep, error: BaseException, ray_started: bool) -> None:
    """Before any trial started, ``error`` stops the sweep: its MLflow parent run (where preparing it got that far)
    ends KILLED on a stop (SIGTERM, Ctrl-C) or FAILED, and the Ray it started stops."""
    if "tracker" in prep:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        prep["tracker"].end_parent(status, {"trials": len(sweep.trials), "finished": prep.get("finished", 0),
                                            "failed": 0})
    if ray_started:
        _shutdown_ray()


def run_sweep(sweep: Sweep, started: float | None = None) -> dict:
    """Run every unfinished trial of ``sweep``; return counts. Resumable: rerun the same command. ``started``: when
    the caller began checking the sweep (its time is printed as the phase ``checks``)."""
    clock = [("start", started)] if started is not None else []  # where the driver's own time goes, printed at the end
    clock.append(("checks" if clock else "start", time.time()))
    hold_driver_lock(sweep)
    remove_old_tune_runs(sweep)
    uri = resolve_tracking_uri(sweep.tracking_uri)
    prep: dict[str, Any] = {}
    ray_started = False
    if _probably_all_finished(sweep, uri):  # a rerun of a finished sweep: answer without starting Ray
        _prepare(sweep, uri, prep)
    else:
        # MLflow bookkeeping and data preparation run in a thread while Ray starts here: both take seconds, and on
        # a machine with several cores they overlap (ray.init itself must stay in the main thread)
        thread = threading.Thread(target=_prepare, args=(sweep, uri, prep), name="overtok-prepare", daemon=True)
        thread.start()
        try:
            _init_ray(sweep)
            ray_started = True
            thread.join()
        except BaseException as e:  # stopped (SIGTERM, Ctrl-C) or failed before any trial: so does the sweep's run
            thread.join()
            _abandon(prep, sweep, e, ray_started)
            raise
    if "error" in prep:  # e.g. a corpus that cannot be read: the sweep's run ends FAILED (KILLED on a stop)
        _abandon(prep, sweep, prep["error"], ray_started)
        raise prep["error"]
    tracker, todo = prep["tracker"], prep["todo"]
    total, skipped = len(sweep.trials), prep["finished"]
    if not todo:
        tracker.end_parent("FINISHED", {"trials": total, "finished": total, "failed": 0})
        if ray_started:
            _shutdown_ray()
        return {"finished": skipped, "failed": 0, "skipped": skipped}
    try:  # until Tune runs the trials, a stop (SIGTERM, Ctrl-C) or a failure ends the sweep's run here
        if not ray_started:
            _init_ray(sweep)
            ray_started = True
        tuner, callback, box = _tuner(sweep, tracker, todo, skipped, clock)
    except BaseException as e:
        _abandon(prep, sweep, e, ray_started)
        raise
    status = "FINISHED"
    hint = _DropTuneRestoreHint()
    logging.getLogger("ray.tune.tune").addFilter(hint)  # overtok's own line says how to resume
    try:
        tuner.fit()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where the CLI raises Terminated for it
        status = "KILLED"
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(hint)
    clock.append(("trials", time.time()))
    interrupted = set(callback.running)
    for tid in interrupted:  # Ctrl-C: leave them resumable
        tracker.end(tid, "KILLED")
    was_interrupted = status == "KILLED" or bool(interrupted)
    not_started = [t for t in todo if t.trial_id not in callback.started] if box is not None else []
    counts = {"trials": total, "finished": callback.done + skipped, "failed": callback.failed, "skipped": skipped,
              "stopped": len(callback.stopped), "not_started": len(not_started)}
    # an interrupted sweep, one with trials stopped on request or left for later: not every trial ran to its end
    status = "KILLED" if was_interrupted or callback.stopped or not_started else "FINISHED"
    tracker.end_parent(status if not callback.failed else "FAILED", counts)
    counts["interrupted"] = was_interrupted
    counts["terminated"] = sigterm_received()
    counts["timed_out"] = box is not None and box.timed_out
    if box is not None and box.held_back is not None:
        names = {t.trial_id: t.run_name for t in todo}
        why = (f"at least about {box.needed_s:.0f} s ({box.FLOOR:g} of the plan's estimate; no trial here has ended "
               "to measure)" if box.by_estimate else
               f"about {box.needed_s:.0f} s (the last trial's {box.last[1]:.0f} s, scaled by their estimated costs)")
        print(f"[overtok] --time-limit: trial {names.get(box.held_back, box.held_back)} would need {why} and "
              f"{max(box.left_s(), 0):.0f} s are left: {len(not_started)} trial(s) not started", flush=True)
    if counts["timed_out"]:
        print(f"[overtok] --time-limit: {sweep.time_limit:g} s reached"
              + (f", {len(interrupted)} running trial(s) stopped" if interrupted else ""), flush=True)
    print(f"[overtok] sweep {sweep.name}: {counts['finished']}/{total} finished, {callback.failed} failed"
          + (f", {len(callback.stopped)} stopped on request" if callback.stopped else "")
          + (f", {len(not_started)} not started (--time-limit)" if not_started else "")
          + (", interrupted" if was_interrupted else "")
          + (" (rerun to resume)" if status == "KILLED" else ""), flush=True)
    _shutdown_ray()
    clock.append(("Ray stop", time.time()))
    print(f"[overtok] sweep {sweep.name}: {clock[-1][1] - clock[0][1]:.1f} s in all: "
          + ", ".join(f"{name} {t - t_prev:.1f} s" for (_, t_prev), (name, t) in zip(clock, clock[1:])), flush=True)
    return counts


__all__ = ["run_sweep", "SweepTracker"]
