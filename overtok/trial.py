"""The worker side of a sweep: what runs inside a Ray trial process (see overtok.tune for the driver side).

- ``trial_main`` is the Tune function trainable: a few lines around the same ``train()`` as `overtok train` (or
  ``train_pack()`` for a pack, or a Ray Train ``TorchTrainer`` of data-parallel workers), run on one long-lived
  thread of the process.
- ``ReportSink`` buffers metric points and sends them to the driver with ``tune.report`` (never one request per
  point); the driver is the only MLflow writer.
- With ``reuse_processes`` a process runs trial after trial; ``release`` leaves it as the next trial expects a new
  one.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from typing import Any

from overtok.tracking import Sink

POINTS_KEY = "overtok_points"
ERROR_KEY = "overtok_error"
STOPPED_KEY = "overtok_stopped"  # the step at which a trial stopped on request (overtok stop)
MEMBER_KEY = "overtok_trial"  # the sweep trial a result belongs to (Tune overwrites its own "trial_id" key)


class ReportSink(Sink):
    """Buffers points in the trial and ships them to the driver through ``tune.report``."""

    def __init__(self, trial_id: str, every_s: float = 5.0):
        self.trial_id, self.every_s = trial_id, every_s
        self.points: list[list] = []
        self.last = time.time()

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.add_points([[k, float(v), int(step), ts] for k, v in metrics.items()])

    def add_points(self, points: list[list]) -> None:
        """Buffer [key, value, step, timestamp_ms] points; report them every ``every_s`` seconds."""
        self.points.extend(points)
        if time.time() - self.last > self.every_s:
            self.flush()

    def report(self, **extra: Any) -> None:
        from ray import tune

        tune.report({POINTS_KEY: json.dumps(self.points), MEMBER_KEY: self.trial_id, **extra})
        self.points = []
        self.last = time.time()

    def flush(self) -> None:
        if self.points:
            self.report()


def trial_main(config: dict) -> None:
    """Tune function trainable: one trial = one ``train()`` (with several workers a data-parallel TorchTrainer;
    for a pack, one ``train_pack()`` over its member trials), run on this process's trial thread."""
    return _trial_thread().run(lambda: _run_trial(config))


def _run_trial(config: dict) -> None:
    from pathlib import Path

    from overtok.config import RunConfig, build_config
    from overtok.train import STOP_FILE, TrialStopped, train

    spec = json.loads(config["trial"])
    try:
        if "pack" in spec:
            return _packed_main(spec)
        cfg: RunConfig = build_config(spec["config"])
        (Path(cfg.train.checkpoint_dir) / STOP_FILE).unlink(missing_ok=True)  # a request of an earlier sweep run
        sink = ReportSink(spec["trial_id"])
        sink.report(**_count_trial())  # recorded as tags
        try:
            if config.get("workers", 1) > 1:
                summary = _data_parallel(config, spec, sink)
            else:
                summary = train(cfg, sink)
        except TrialStopped as e:
            sink.report(**{STOPPED_KEY: e.step})
            return
        except Exception as e:
            _report_failure(sink, f"{type(e).__name__}: {e}")
            raise
        sink.report(done_tokens=summary["tokens_seen"])
    finally:
        if config.get("reuse"):
            release()


class _TrialThread:
    """The one thread on which every trial of this worker process trains.

    With ``reuse_processes`` (Tune's ``reuse_actors``) a process runs trial after trial, and Tune calls each from a
    new thread of its own. CUDA graph trees (torch.compile's reduce-overhead mode, ``runtime.cuda_graphs``) keep their
    state with the thread that first used them, so a second trial on a new thread fails at its first compiled step.
    Trials therefore run here, one at a time, while Tune's thread
    waits; ``tune.report`` works from any thread of the process (its session is per process)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="overtok-trial", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - raised again in Tune's thread (SystemExit = Tune's stop)
                box["error"] = e
            done.set()

    def run(self, fn):
        box: dict[str, Any] = {}
        done = threading.Event()
        self.jobs.put((fn, box, done))
        done.wait()
        if "error" in box:
            raise box.pop("error")
        return box.get("value")


_TRIAL_THREAD: _TrialThread | None = None


def _trial_thread() -> _TrialThread:
    global _TRIAL_THREAD
    if _TRIAL_THREAD is None:  # this process's first trial
        _TRIAL_THREAD = _TrialThread()
        sys.unraisablehook = _quiet_exit_when_unraisable(sys.unraisablehook)
    return _TRIAL_THREAD


def _quiet_exit_when_unraisable(default):
    """An unraisable-exception hook that drops SystemExit and passes everything else to ``default``.

    When Ray stops an idle reused trial process (the sweep's end), its SIGTERM handler raises SystemExit wherever
    the main thread is; inside a garbage-collection callback Python cannot raise it and prints "Exception ignored
    in: ... SystemExit: 1" into the sweep's log, a stop that Ray completes anyway. Nothing else is hidden."""

    def hook(unraisable) -> None:
        if unraisable.exc_type is SystemExit:
            return
        default(unraisable)

    return hook


def release() -> None:
    """Leave a reused process as the next trial expects a new one: no compiled graphs (dynamo would otherwise
    keep guarding old modules and stop compiling after its cache limit), no CUDA graph trees, nothing allocated.

    cuBLAS keeps a workspace per stream for the process's lifetime, which would count in the next trial's peak
    (``perf/mem_gb``), so it is cleared too, as CUDA graph trees themselves do around recording
    (``benchmarks/bench_reuse.py`` checks that nothing stays allocated)."""
    import gc

    import torch

    from overtok.compat import clear_cublas_workspaces

    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_initialized():
        clear_cublas_workspaces()
        torch.cuda.empty_cache()


def _report_failure(sink: ReportSink, error: str) -> None:
    sink.points.append(["sys/failed", 1.0, 0, int(time.time() * 1000)])
    sink.report(**{ERROR_KEY: error[:4000]})


def _packed_main(spec: dict) -> None:
    """Member trials trained as one packed model; each member reports under its own trial id."""
    from overtok.config import build_config
    from overtok.train import train_pack

    members = spec["pack"]
    cfgs = [build_config(m["config"]) for m in members]
    sinks = [ReportSink(m["trial_id"]) for m in members]
    where = _count_trial()
    for s in sinks:
        s.report(**where)
    try:
        summaries = train_pack(cfgs, sinks, spec["checkpoint_dir"])
    except Exception as e:
        for s in sinks:
            _report_failure(s, f"{type(e).__name__}: {e}")
        raise
    for s, summary in zip(sinks, summaries):
        if "error" in summary:  # this member diverged; the others trained on
            _report_failure(s, summary["error"])
        else:
            s.report(done_tokens=summary["tokens_seen"])


class QueueSink(Sink):
    """Rank 0 of a data-parallel trial: points go through a Ray queue to the Tune trial, which reports them."""

    def __init__(self, queue):
        self.queue = queue

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.queue.put([[k, float(v), int(step), ts] for k, v in metrics.items()])


def _ddp_worker(config: dict) -> None:
    """Ray Train worker loop: the process group is set up by TorchTrainer; train() wraps the model in DDP."""
    import ray.train

    from overtok.config import build_config
    from overtok.train import pick_device, train

    cfg = build_config(json.loads(config["trial"])["config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if config["use_gpu"] else pick_device("cpu")
    summary = train(cfg, QueueSink(config["queue"]) if rank == 0 else None, device=device)
    if rank == 0:
        config["queue"].put({"summary": summary})


def _data_parallel(config: dict, spec: dict, sink: ReportSink) -> dict:
    """Run the trial as a TorchTrainer with config['workers'] workers inside this Tune trial (Ray Train V2)."""
    import threading

    import ray.train
    import ray.train.torch
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": "DEFAULT"})  # outside the trial's bundle
    trainer = ray.train.torch.TorchTrainer(
        _ddp_worker,
        train_loop_config={"trial": config["trial"], "queue": queue, "use_gpu": config["worker_gpu"] > 0},
        scaling_config=ray.train.ScalingConfig(num_workers=config["workers"], use_gpu=config["worker_gpu"] > 0,
                                               resources_per_worker={"CPU": config["worker_cpu"],
                                                                     **({"GPU": config["worker_gpu"]} if config["worker_gpu"] else {})}),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if config["worker_gpu"] > 0 else "gloo"),
        run_config=ray.train.RunConfig(name=f"ddp-{spec['trial_id']}-{int(time.time())}",
                                       storage_path=config["storage_path"]),
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # noqa: BLE001 - re-raised in the trial below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    summary: dict = {}
    try:
        while thread.is_alive() or not queue.empty():
            try:
                item = queue.get(timeout=1.0)
            except Empty:
                continue
            if isinstance(item, dict):
                summary = item["summary"]
            else:
                sink.add_points(item)
        thread.join()
    finally:  # the queue is an actor of its own: with reuse_processes this process outlives the trial
        queue.shutdown(force=True)
    sink.flush()
    if "error" in outcome:
        raise outcome["error"]
    if getattr(outcome.get("result"), "error", None):
        raise RuntimeError(f"data-parallel trial failed: {outcome['result'].error}")
    return summary


def _count_trial() -> dict:
    """Count a trial starting in this process, and say where it runs: node, process, and the how-manieth trial of
    that process it is (1 = a new process; more with reuse_processes). Called once per trial (or pack)."""
    import ray

    global _PROCESS_TRIALS
    _PROCESS_TRIALS += 1
    from overtok.identity import code_version

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "process_trial": _PROCESS_TRIALS,
            "device": _device_name(), "code": code_version()}


def _device_name() -> str:
    """The hardware a trial trains on: the GPU's name where Ray gave it one, else the CPU count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


_PROCESS_TRIALS = 0


__all__ = ["trial_main", "ReportSink", "release"]
