"""Fault injection with real processes: a killed trial worker, a tracking server that goes away for 30 s,
checkpoints that cannot be written or were cut short, a loss that turns NaN."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from overtok.checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint
from tests.sweeplib import env, free_port, kill_group, overtok, start_sweep, sweep_runs, wait_for, write

TWO_TRIALS = """
name: {name}
base:
  model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 64}}
  data: {{batch_size: 8}}
  train: {{max_steps: {steps}, eval_every: 100, log_every: 10, checkpoint_every: 40, gen_samples: 0}}
grid:
  model.od_depth: [1, 2]
max_concurrent: 2
max_failures: 2
"""


def _complete_curve(c, run, steps):
    got = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss"))
    tps = int(run.data.params["tokens_per_step"])
    return got == [tps * 10 * i for i in range(1, steps // 10 + 1)]


@pytest.mark.slow
def test_sigkill_of_one_trial_worker_retries_it_from_its_checkpoint(tmp_path):
    write(tmp_path / "wk.yaml", TWO_TRIALS.format(name="wk", steps=400))
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    proc = start_sweep(tmp_path, "wk.yaml")
    try:
        ckpts = tmp_path / "results" / "ray" / "wk" / "trials"

        def victim():
            _, _, runs = sweep_runs(uri, "wk")
            for r in runs:
                pid = r.data.tags.get("overtok.pid")
                if pid and list((ckpts / r.data.tags["overtok.trial_id"]).glob("ckpt_*.pt")):
                    return r, int(pid)
            return None

        wait_for(lambda: victim() is not None, 240, what="a trial with a checkpoint")
        run, pid = victim()
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:]
    c, parents, children = sweep_runs(uri, "wk")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    killed = next(r for r in children if r.info.run_id == run.info.run_id)
    assert killed.data.tags.get("overtok.retried") == "true"
    other = next(r for r in children if r.info.run_id != run.info.run_id)
    assert "overtok.retried" not in other.data.tags
    assert all(_complete_curve(c, r, 400) for r in children)  # no gap, no duplicate step
    assert "resumed from" in out


@pytest.mark.slow
def test_tracking_server_down_for_30s_loses_no_point(tmp_path):
    port = free_port()
    db = tmp_path / "server.db"

    def start_server():
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", str(tmp_path / "art")],
            env=env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def up():
        import urllib.request

        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(server):
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            kill_group(server)

    uri = f"http://127.0.0.1:{port}"
    server = start_server()
    sweep = None
    try:
        wait_for(up, 120, what="mlflow server")
        write(tmp_path / "down.yaml", TWO_TRIALS.format(name="down", steps=600))
        sweep = subprocess.Popen([sys.executable, "-m", "overtok", "sweep", "down.yaml", "--tracking-uri", uri],
                                 cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)

        def logging_started():
            _, _, runs = sweep_runs(uri, "down")
            return len(runs) == 2 and all("train/loss" in r.data.metrics for r in runs)

        wait_for(logging_started, 240, every=2, what="first metric points")
        stop(server)
        time.sleep(30)
        assert sweep.poll() is None, "the sweep must survive the outage"
        server = start_server()
        wait_for(up, 120, what="mlflow server restart")
        out, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, out[-3000:]
        c, parents, children = sweep_runs(uri, "down")
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        assert all(_complete_curve(c, r, 600) for r in children)
    finally:
        if sweep is not None:
            kill_group(sweep)
        stop(server)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, {"step": 10, "w": torch.ones(1000)})
    newest = save_checkpoint(tmp_path, {"step": 20, "w": torch.full((1000,), 2.0)})
    newest.write_bytes(newest.read_bytes()[:1500])  # power loss mid-write (of a non-atomic writer)
    state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 10 and float(state["w"][0]) == 1.0


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(blocker / "ckpts", {"step": 1})


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us


@pytest.mark.parametrize("case", ["full", "unwritable", "nan"])
def test_train_fails_cleanly(tmp_path, case):
    sets = ["train.max_steps=30", "train.checkpoint_every=10", "train.gen_samples=0", "train.log_every=1"]
    kw = {}
    if case == "full":  # a 3M-parameter model's checkpoint (~40 MB) meets an 8 MB file-size limit
        sets += ["model.d_model=256", "model.n_layers=4", "model.seq_len=32", "data.batch_size=2"]
        kw["preexec_fn"] = _limit_file_size
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        sets += [f"train.checkpoint_dir={tmp_path / 'file' / 'ckpt'}"]
    else:
        sets += ["train.lr=1e12", "train.grad_clip=0", "train.warmup_steps=0"]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    res = overtok(tmp_path, "train", *args, timeout=300, **kw)
    assert res.returncode == 1 and time.time() - t0 < 300
    from overtok.tracking import client

    c = client(f"sqlite:///{tmp_path}/results/mlflow.db")
    run = c.search_runs([c.get_experiment_by_name("overtok").experiment_id])[0]
    assert run.info.status == "FAILED"
    err = run.data.tags["overtok.error"]
    if case == "nan":
        assert "TrainingDiverged" in err and ("nan at step" in err or "inf at step" in err)
    else:
        assert "CheckpointError: cannot write checkpoint" in err
        assert not list((tmp_path / "results" / "checkpoints").rglob("*.tmp"))


def test_processes_opening_one_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow migrates a fresh SQLite file when it is first opened; without overtok.tracking.client's lock two
    processes doing so at once race, and all but one fail. The store's folder may not exist yet (MLflow creates it):
    the lock must hold then too."""
    code = ("import sys; from overtok.tracking import client, experiment_id\n"
            "c = client(sys.argv[1]); experiment_id(c, 'race'); print('ok')")
    for i in range(4):
        uri = f"sqlite:///{tmp_path}/store{i}.db" if i < 2 else f"sqlite:///{tmp_path}/new{i}/results/mlflow.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in outs]


def test_a_second_config_trains_from_scratch_not_from_the_first_runs_checkpoint(cli, tmp_path):
    """Two `overtok train` runs with different learning rates, back to back, in one project: the second finds no
    checkpoint of its own configuration (checkpoints are keyed by trial id) and trains every step."""
    sets = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set",
            "model.seq_len=32", "--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set",
            "train.log_every=3", "--set", "train.checkpoint_every=3", "--set", "train.gen_samples=0",
            "--set", "data.batch_size=4"]
    first = cli("train", *sets, "--set", "train.lr=1e-3", "--tracking-uri", "sqlite:///results/mlflow.db")
    assert first.returncode == 0, first.stderr
    second = cli("train", *sets, "--set", "train.lr=2e-3", "--tracking-uri", "sqlite:///results/mlflow.db")
    assert second.returncode == 0, second.stderr
    assert "resumed" not in second.stdout, second.stdout
    dirs = sorted(p.name for p in (tmp_path / "results" / "checkpoints").iterdir())
    assert len(dirs) == 2
    from mlflow.tracking import MlflowClient

    from overtok.identity import code_version

    c = MlflowClient(f"sqlite:///{tmp_path}/results/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("overtok").experiment_id], max_results=10)
    assert [r.data.tags["overtok.code"] for r in runs] == [code_version()] * 2  # which code trained each run
    # an explicit checkpoint_dir holding another configuration's checkpoint is refused in one line
    other = cli("train", *sets, "--set", "train.lr=3e-3", "--set", f"train.checkpoint_dir=results/checkpoints/{dirs[0]}",
                "--tracking-uri", "sqlite:///results/mlflow.db")
    assert other.returncode == 1 and "another configuration" in other.stderr
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_checkpoints_are_not_written_or_deleted_through_a_symbolic_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "ckpt_000000001.pt").write_bytes(b"not ours")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "link").symlink_to(target)
    with pytest.raises(CheckpointError, match="symbolic link"):
        save_checkpoint(Path("results/link"), {"step": 5}, keep=0)
    assert (target / "ckpt_000000001.pt").read_bytes() == b"not ours"


def test_a_second_driver_of_the_same_sweep_is_refused(tmp_path):
    """Two `overtok sweep` processes on one sweep: the second exits 2 naming the running driver; the lock goes with
    the first driver's process."""
    import fcntl

    write(tmp_path / "two.yaml", TWO_TRIALS.format(name="two", steps=4000))
    lock = tmp_path / "results" / "ray" / "two" / "driver.lock"
    first = subprocess.Popen([sys.executable, "-m", "overtok", "sweep", "two.yaml"], cwd=tmp_path, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), 120, what="the first driver's lock")
        second = overtok(tmp_path, "sweep", "two.yaml", timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert "another overtok sweep is running this sweep" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        kill_group(first)
        first.wait(timeout=60)
    with open(lock, "a") as f:  # released with the process that held it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_full_disk_during_export_leaves_the_previous_files_whole(tmp_path):
    """An export that cannot be written (the file-size limit stands in for a full disk) fails in one line and leaves
    the previous runs.parquet readable, with no temporary file behind."""
    code = f"""
import resource, signal, sys
import pandas as pd
from pathlib import Path
from overtok.export import write_atomically
from overtok.errors import ExportError
path = Path({str(tmp_path)!r}) / "runs.parquet"
write_atomically(path, lambda f: pd.DataFrame({{"a": [1, 2, 3]}}).to_parquet(f))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
big = pd.DataFrame({{"a": range(2_000_000)}}).astype(str)
try:
    write_atomically(path, lambda f: big.to_parquet(f, compression=None))
except ExportError as e:
    print("ERROR", e)
"""
    res = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert "ERROR cannot write" in res.stdout, res.stdout + res.stderr
    import pandas as pd

    assert pd.read_parquet(tmp_path / "runs.parquet")["a"].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.parquet"]


def test_overtok_train_refuses_a_checkpoint_directory_behind_a_link(cli, tmp_path):
    """`overtok train` with its checkpoint directory under a symbolic link (results/link -> elsewhere): one line,
    and the link's target keeps its files (nothing written or deleted through the link)."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "ckpt_000000001.pt").write_bytes(b"not ours")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "link").symlink_to(target)
    res = cli("train", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
              "--set", "model.seq_len=32", "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2",
              "--set", "train.gen_samples=0", "--set", "train.checkpoint_dir=results/link/run",
              "--tracking-uri", "sqlite:///results/mlflow.db")
    assert res.returncode == 1 and "symbolic link" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in target.iterdir()) == ["ckpt_000000001.pt"]
    assert (target / "ckpt_000000001.pt").read_bytes() == b"not ours"


def test_sigterm_of_a_training_run_ends_it_killed_with_exit_143(tmp_path):
    """`overtok train` sent SIGTERM (a batch scheduler's time limit) while it trains: its MLflow run ends KILLED, not
    RUNNING, and the command exits 143 with one line."""
    from overtok.tracking import client

    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    sets = [f"{k}={v}" for k, v in {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.seq_len": 32,
                                      "train.max_steps": 200000, "train.log_every": 10, "train.eval_every": 100000,
                                      "train.gen_samples": 0, "data.batch_size": 4}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "overtok", "train", *[a for s in sets for a in ("--set", s)],
                             "--tracking-uri", uri], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def training():  # overtok's client: the store is opened under its lock, as the run creates it
            c = client(uri)
            exp = c.get_experiment_by_name("overtok")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            return bool(runs) and bool(c.get_metric_history(runs[0].info.run_id, "train/loss"))

        wait_for(training, 240, every=1.0, what="the run to log a loss")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "overtok: terminated", err[-2000:]
    c = client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("overtok").experiment_id])
    assert run.info.status == "KILLED"


def test_a_reused_trial_process_stopped_in_a_gc_callback_prints_nothing():
    """Ray stops an idle reused trial process with SIGTERM, and its handler raises SystemExit wherever the main
    thread is; in a garbage-collection callback Python prints "Exception ignored ... SystemExit" into the sweep's
    log. The trial process's hook (set with its first trial) drops exactly that; other unraisable errors still
    print. A real process, a real signal, a weakref callback as the GC runs it."""
    code = """
import gc, os, signal, sys, weakref
from overtok import trial
if sys.argv[1] == "hooked":
    trial._trial_thread()
def stop(signum, frame):  # as Ray's worker does
    raise SystemExit(1)
signal.signal(signal.SIGTERM, stop)
class Box: pass
def on_collect(ref):
    if sys.argv[2] == "other":
        raise ValueError("a real error in a callback")
    os.kill(os.getpid(), signal.SIGTERM)  # the signal lands while the callback runs
    for _ in range(1000): pass
b = Box(); r = weakref.ref(b, on_collect); del b; gc.collect()
print("went on")
"""
    def run(*args):
        return subprocess.run([sys.executable, "-c", code, *args], env=env(), capture_output=True, text=True, timeout=120)

    plain, hooked = run("plain", "exit"), run("hooked", "exit")
    assert "Exception ignored" in plain.stderr and "SystemExit" in plain.stderr, plain.stderr
    assert hooked.stderr == "" and hooked.stdout == "went on\n", hooked.stderr
    other = run("hooked", "other")
    assert "Exception ignored" in other.stderr and "ValueError: a real error" in other.stderr, other.stderr
