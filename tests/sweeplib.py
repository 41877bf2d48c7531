"""Helpers for the end-to-end sweep tests (real Ray, real MLflow)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

SMALL = [  # shrink a sweep so a test takes seconds per trial
    "base.train.max_steps=20", "base.train.eval_every=10", "base.train.log_every=5", "base.train.checkpoint_every=10",
    "base.train.gen_samples=4", "base.train.eval_batches=2",
]


def env(extra=None):
    e = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)])
    e.update(extra or {})
    return e


def overtok(cwd, *args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "overtok", *map(str, args)], cwd=cwd, env=env(kw.pop("env", None)),
                          capture_output=True, text=True, timeout=timeout, **kw)


def sigint_default() -> None:
    """For a child that a test sends Ctrl-C: SIGINT at its default disposition, as under a terminal. A test run
    started in the background by a non-interactive shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler of its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_sweep(cwd, sweep_file: str) -> subprocess.Popen:
    """`overtok sweep SWEEP_FILE` in the background, in a process group of its own (kill_group ends it and its Ray),
    its stdout and stderr together as text."""
    return subprocess.Popen([sys.executable, "-m", "overtok", "sweep", sweep_file], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=sigint_default)


def sweep_runs(uri, experiment):
    from overtok.tracking import client

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return c, [], []
    runs = c.search_runs([exp.experiment_id], max_results=10000)
    parents = [r for r in runs if r.data.tags.get("overtok.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("overtok.role") == "trial"]
    return c, parents, children


def sweep_with_and_without_reuse(tmp_path, template: str, name: str, trials: int, keys=("train/loss", "val/loss")):
    """Run the sweep ``template % reuse`` with reuse_processes true and false, each in a folder of its own; every
    trial must finish. Returns {reuse: [(run, {key: {step: value}})]} with the curves of ``keys``."""
    out = {}
    for reuse in ("true", "false"):
        work = tmp_path / reuse
        work.mkdir()
        write(work / f"{name}.yaml", template % reuse)
        res = overtok(work, "sweep", f"{name}.yaml")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        c, _, children = sweep_runs(f"sqlite:///{work}/results/mlflow.db", name)
        assert len(children) == trials and all(r.info.status == "FINISHED" for r in children)
        out[reuse] = [(r, {k: {m.step: m.value for m in c.get_metric_history(r.info.run_id, k)} for k in keys})
                      for r in children]
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout, every=0.5, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` (a start_sweep sweep and the Ray it started) still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def sweep_output_after_kill(proc, tail: int = 5000) -> str:
    """What a background sweep (start_sweep) printed, once kill_group has ended it: for a failing test to show the
    sweep's own account of where it was."""
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        return "(the sweep's output did not close within 30 s)"
    return (out or "")[-tail:]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def stop_processes_mentioning(text: str, timeout: float = 30.0) -> list[int]:
    """SIGTERM, then SIGKILL, the processes whose command line contains ``text`` (a folder only the test's own
    processes were given); returns their pids. Processes the test did not start are never touched."""
    def matching():
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                pids.append(int(proc.name))
        return pids

    found = matching()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in matching():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while matching() and time.time() < deadline:
            time.sleep(0.5)
    return found


def listening_sockets_of_tree(root: int) -> list[tuple[str, int, str]]:
    """(local address, port, process name) of every listening TCP socket held by ``root`` or its descendants, read
    from /proc (addresses as Linux prints them, e.g. 0100007F for 127.0.0.1, 00000000 for every interface)."""
    parent = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                parent[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue

    def in_tree(pid):
        while pid and pid in parent:
            if pid == root:
                return True
            pid = parent[pid]
        return False

    listen = {}
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A":  # LISTEN
                addr, port = f[1].rsplit(":", 1)
                listen[f[9]] = (addr, int(port, 16))
    out = []
    for pid in [p for p in parent if in_tree(p)]:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listen:
                out.append((*listen[target[8:-1]], name))
    return out


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifact_root: Path):
    """A real `mlflow server` on 127.0.0.1:<free port> over ``backend_uri``, up (its /health answers) when the
    block starts, stopped (SIGINT, then SIGKILL) when it ends; yields its URL."""
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri, "--default-artifact-root", str(artifact_root)],
        env=env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 180, what=f"mlflow server on {backend_uri.split(':')[0]}")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            kill_group(server)
