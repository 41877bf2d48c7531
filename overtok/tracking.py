"""Metrics sinks: the training loop calls ``sink.log(metrics, step)`` and never asks whether tracking is on.

- :class:`Sink` does nothing (the null object); :class:`FanOut` sends to several.
- :class:`MlflowSink` buffers points and writes them with ``log_batch`` (one request per flush, not per
  point: 1,000 ``log_metric`` calls take 22 s on SQLite, one ``log_batch`` 0.15 s). A failed flush keeps
  the buffer and retries, so a tracking server that is down for a while loses nothing.
- :class:`ConsoleSink` prints progress.
mlflow is imported lazily: the model and the analysis side never pay for it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_STORE = "results/mlflow.db"
TRIAL_ID_TAG = "overtok.trial_id"
SWEEP_TAG = "overtok.sweep"
ROLE_TAG = "overtok.role"


TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "postgresql://", "postgresql+psycopg2://", "mysql://",
                    "mysql+pymysql://")


def check_tracking_uri(uri: str, where: str) -> str:
    """A tracking URI overtok can use: an MLflow server (http, https), a SQLite file whose folder exists (folders
    under the project's results/ are created), or a database URI MLflow's SQL store takes. Anything else is a ConfigError naming ``where`` it came from."""
    from overtok.config import ConfigError

    if not uri.startswith(TRACKING_SCHEMES):
        raise ConfigError(f"unsupported tracking URI {uri[:100]!r}: use sqlite:///PATH, http(s)://HOST:PORT or a "
                          "postgresql:// or mysql:// database URI", file=where)
    db = sqlite_path(uri)
    if db is not None:
        folder = Path(db).parent
        results = Path(DEFAULT_STORE).parent.resolve()
        if not folder.is_dir() and (folder.resolve() == results or results in folder.resolve().parents):
            folder.mkdir(parents=True, exist_ok=True)  # the project's own results tree
        if not folder.is_dir():
            raise ConfigError(f"{uri}: the folder {folder} does not exist (create it, or use another path)", file=where)
        if Path(db).exists() and not _is_sqlite(Path(db)):
            raise ConfigError(f"{db} is not a SQLite database (a damaged or foreign file; move it away)", file=where)
    return uri


def _is_sqlite(path: Path) -> bool:
    """The file starts with SQLite's header, or is empty (a store being created)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head == b"" or head == b"SQLite format 3\x00"


def resolve_tracking_uri(uri: str = "") -> str:
    """Explicit > $MLFLOW_TRACKING_URI > SQLite in the project's results/ (never MLflow's implicit default).
    Checked (:func:`check_tracking_uri`) before anything uses it."""
    if uri:
        return check_tracking_uri(uri, "--tracking-uri / tracking.tracking_uri")
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return check_tracking_uri(env, "MLFLOW_TRACKING_URI")
    path = Path(DEFAULT_STORE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


CONNECT_TIMEOUT_S = 10.0
"""How long a tracking server or Ray head may take to accept a connection before overtok gives up with one line."""
_REACHED: set[str] = set()


def check_server(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An http(s) tracking server must answer its /health page within ``timeout`` seconds (once per process);
    otherwise a ConfigError says so, instead of MLflow's minutes of retries."""
    import urllib.error
    import urllib.request

    if uri in _REACHED or not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        from overtok.config import ConfigError

        reason = getattr(e, "reason", e)
        raise ConfigError(f"the tracking server {uri} does not answer ({reason}; waited up to {timeout:g} s); start it "
                          "or pass another --tracking-uri", file="tracking URI") from None
    _REACHED.add(uri)


def check_ray_head(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A Ray head given as HOST:PORT must accept a TCP connection within ``timeout`` seconds."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', 'ray://...' and the like: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        from overtok.config import ConfigError

        raise ConfigError(f"the Ray head at {address} does not answer ({e.strerror or e}; waited up to {timeout:g} s)",
                          file="--address") from None


def client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # bounded waits: a request that gets no answer fails after 30 s, retried twice (the sink keeps unsent points and
    # sends them again later, so nothing is lost to a short outage)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from mlflow.tracking import MlflowClient

    # never mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI, which child processes would inherit
    db = sqlite_path(uri)
    if db is None:
        check_server(uri)
        return MlflowClient(tracking_uri=uri)
    # a SQLite store is created (or migrated) when first opened; processes that open one fresh file at once (a sweep
    # and the dashboard, runs started together) would each run MLflow's schema migration and all but one fail. MLflow
    # also creates the store's folder, so the folder is made here first: the lock beside the file must exist for the
    # very first opener too.
    import fcntl

    try:
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        lock = open(db + ".lock", "a")
    except OSError:  # a read-only place: nobody creates the store there
        return MlflowClient(tracking_uri=uri)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            c = MlflowClient(tracking_uri=uri)
            c.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - a damaged store raises SQLAlchemy's or MLflow's own errors
            from overtok.config import ConfigError

            raise ConfigError(f"cannot open the MLflow store {db}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]} (a damaged or truncated file? move it away)",
                              file="tracking URI") from None
    return c


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite store's file (MLflow's own default is ./mlruns
    under whatever directory the command ran in); None lets a server or other store decide."""
    db = sqlite_path(uri)
    return None if db is None else (Path(db).parent / "mlartifacts").resolve().as_uri()


def experiment_id(c, name: str, uri: str = "") -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


class Sink:
    """Null sink: the interface every sink implements."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class MemorySink(Sink):
    """Keeps every logged point in memory, ``points[key][step] = value``: curves of ``train()`` or ``train_pack()``
    run in a notebook, a test or a benchmark."""

    def __init__(self):
        self.points: dict[str, dict[int, float]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.points.setdefault(k, {})[step] = v


class FanOut(Sink):
    def __init__(self, *sinks: Sink):
        self.sinks = [s for s in sinks if s is not None]

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class MetricBuffer:
    """Points waiting to be written, flushed with log_batch; failures keep them for the next try."""

    def __init__(self, c, run_id: str, min_step: dict[str, int] | None = None):
        self.c, self.run_id = c, run_id
        self.points: list[tuple[str, float, int, int]] = []
        # Resumed runs: points at or below the last logged step per key were written already (exact resume
        # recomputes the same values), so they are dropped to keep curves free of duplicate steps.
        self.min_step = dict(min_step or {})

    def add(self, key: str, value: float, step: int, timestamp_ms: int | None = None) -> None:
        # each key's points arrive in step order; anything at or below the last accepted step was sent again by
        # a restarted trial (exact resume replays the same values)
        if step <= self.min_step.get(key, -1):
            return
        self.min_step[key] = step
        if not math.isfinite(value):
            return  # MLflow rejects NaN/inf; the failure itself is recorded as the run's error
        self.points.append((key, float(value), int(step), timestamp_ms or int(time.time() * 1000)))

    def flush(self) -> bool:
        """Write everything buffered; return False (keeping the points) if the store is unreachable."""
        from mlflow.entities import Metric

        while self.points:
            chunk = self.points[:1000]  # MLflow's per-request limit
            try:
                self.c.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, s, ts in chunk])
            except Exception as e:  # noqa: BLE001 - any transport/store error: keep and retry later
                print(f"[overtok] metric flush failed, keeping {len(self.points)} points: {type(e).__name__}: {str(e)[:200]}",
                      file=sys.stderr)
                return False
            del self.points[: len(chunk)]
        return True

    def flush_with_retry(self, timeout_s: float = 300.0) -> bool:
        deadline = time.time() + timeout_s
        delay = 1.0
        while not self.flush():
            if time.time() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        return True


USER_ERROR_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                    "PERMISSION_DENIED", "INVALID_STATE"}


class RetryingClient:
    """An MlflowClient whose calls are retried with backoff while the store is unreachable (a restarting
    tracking server, a locked file); errors that retrying cannot fix are raised at once."""

    def __init__(self, c, timeout_s: float = 900.0):
        self._c, self._timeout_s = c, timeout_s

    def __getattr__(self, name):
        fn = getattr(self._c, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            deadline, delay = time.time() + self._timeout_s, 1.0
            while True:
                try:
                    return fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - classify below
                    if getattr(e, "error_code", None) in USER_ERROR_CODES or time.time() > deadline:
                        raise
                    print(f"[overtok] MLflow {name} failed ({type(e).__name__}); retrying in {delay:.0f}s",
                          file=sys.stderr, flush=True)
                    time.sleep(delay)
                    delay = min(delay * 2, 15.0)

        return call


def last_steps(c, run_id: str) -> dict[str, int]:
    """Largest logged step of every metric of a run (used when a run is resumed)."""
    run = c.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        hist = c.get_metric_history(run_id, key)
        if hist:
            out[key] = max(m.step for m in hist)
    return out


class MlflowSink(Sink):
    def __init__(self, c, run_id: str, flush_every_s: float = 5.0, min_step: dict[str, int] | None = None):
        self.buffer = MetricBuffer(c, run_id, min_step)
        self.flush_every_s = flush_every_s
        self.last_flush = time.time()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.buffer.add(k, v, step)
        if time.time() - self.last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self.buffer.flush()
        self.last_flush = time.time()

    def close(self) -> None:
        if not self.buffer.flush_with_retry():
            raise RuntimeError(f"could not write {len(self.buffer.points)} metric points to MLflow")


class ConsoleSink(Sink):
    """One progress line per log: step, loss, tokens/s, ETA."""

    def __init__(self, total_steps: int, tokens_per_step: int, prefix: str = ""):
        self.total_steps, self.tokens_per_step, self.prefix = total_steps, tokens_per_step, prefix
        self.tty = sys.stdout.isatty()

    def log(self, metrics: dict[str, float], step: int) -> None:
        it = step // self.tokens_per_step
        parts = [f"{self.prefix}step {it:>6}/{self.total_steps}", f"tokens {step:,}"]
        for key, fmt in [("train/loss", "loss {:.4f}"), ("val/loss", "val {:.4f}"), ("val/gen_acc", "gen_acc {:.3f}"),
                         ("perf/tokens_per_s", "{:,.0f} tok/s"), ("perf/mfu", "mfu {:.2f}")]:
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        tps = metrics.get("perf/tokens_per_s")
        if tps:
            eta = (self.total_steps - it) * self.tokens_per_step / tps
            parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
        print(" | ".join(parts), flush=True)
