"""A real tracking database: an `mlflow server` backed by PostgreSQL (Debian's server, a throwaway cluster started
here on 127.0.0.1) with a local artifact root; a sweep tracks into it, and export and report read it."""

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.sweeplib import free_port, mlflow_server, overtok, sweep_runs, write

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"PostgreSQL's {name} is missing (the Makefile's test target installs Debian's postgresql)"
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run the command as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    """A fresh cluster on 127.0.0.1:<free port> with trust authentication for user overtok and database mlflow;
    stopped and removed afterwards. Yields the SQLAlchemy URI."""
    root = Path(tempfile.mkdtemp(prefix="otpg"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "overtok", "-A", "trust"]), check=True,
                   capture_output=True, timeout=120)
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                 f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "overtok", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://overtok@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_sweep_export_and_report_through_a_postgres_backed_mlflow_server(tmp_path, postgres):
    with mlflow_server(postgres, tmp_path / "artifacts") as uri:
        write(tmp_path / "pg.yaml", """
name: pg
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}
  train: {max_steps: 20, eval_every: 10, log_every: 5, checkpoint_every: 10, gen_samples: 0}
grid:
  model.oe.n: [1, 2]
  model.oe.m: [101]
""")
        res = overtok(tmp_path, "sweep", "pg.yaml", "--tracking-uri", uri)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        _, parents, children = sweep_runs(uri, "pg")
        assert len(parents) == 1 and len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        exp = overtok(tmp_path, "export", "pg", "--tracking-uri", uri)
        assert exp.returncode == 0, exp.stderr[-2000:]
        rep = overtok(tmp_path, "report", "pg", "--tracking-uri", uri)
        assert rep.returncode == 0, rep.stderr[-2000:]
        assert (tmp_path / "dashboards" / "pg" / "index.html").is_file()
        assert not (tmp_path / "results" / "mlflow.db").exists()  # everything went to the database
        import psycopg

        with psycopg.connect(postgres) as conn, conn.cursor() as cur:  # the rows really live in PostgreSQL
            cur.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
            assert cur.fetchone()[0] >= 2
