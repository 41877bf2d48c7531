"""Each private-API helper of overtok.compat against the installed Ray, MLflow and torch: an upgrade that moves one
of them fails here, by name."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from overtok import compat
from tests.conftest import ROOT


def test_mlflow_store_and_metric_model_read_a_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("e"))
    c.log_metric(run.info.run_id, "loss", 2.5, step=7)
    store = compat.mlflow_store(uri)
    metric = compat.sql_metric_model()
    with store.ManagedSessionMaker() as session:
        rows = session.query(metric.run_uuid, metric.key, metric.step, metric.value).all()
    assert rows == [(run.info.run_id, "loss", 7, 2.5)]


def test_ray_cpu_count_is_a_positive_count():
    assert 1 <= compat.ray_cpu_count() <= (os.cpu_count() or 1)


def test_ray_monitor_processes_finds_the_local_monitor_of_a_started_ray():
    """In a child process (Ray stays out of this one): a driver-started local Ray has a live monitor process;
    after the helper's processes are killed, ray.shutdown() still returns."""
    code = ("import ray, sys; sys.path.insert(0, sys.argv[1]); from overtok.compat import ray_monitor_processes\n"
            "ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[2])\n"
            "procs = ray_monitor_processes(); print('MONITORS', len(procs), all(p.poll() is None for p in procs))\n"
            "[p.kill() for p in procs]; ray.shutdown(); print('STOPPED')\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # loopback only
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as short:  # Ray's socket paths must stay < 108 bytes
        res = subprocess.run([sys.executable, "-c", code, str(ROOT), short], capture_output=True, text=True,
                             timeout=180, env=env)
    assert "MONITORS 1 True" in res.stdout and "STOPPED" in res.stdout, res.stdout + res.stderr[-2000:]


def test_ddp_ignore_marks_the_named_parameters():
    model = torch.nn.Linear(2, 2)
    compat.ddp_ignore(model, ["bias"])
    assert model._ddp_params_and_buffers_to_ignore == ["bias"]


def test_foreach_norm_and_mul_match_plain_torch():
    xs = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])]
    assert [float(n) for n in compat.foreach_norm(xs)] == pytest.approx([5.0, 5.0])
    compat.foreach_mul_(xs, torch.tensor(0.5))
    assert torch.equal(xs[0], torch.tensor([1.5, 2.0]))


def test_fused_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    p, g = torch.randn(5), torch.randn(5)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref.grad = g.clone()
    opt.step()
    m, v = torch.zeros(5), torch.zeros(5)
    compat.fused_adamw_([p], [g], [m], [v], torch.tensor(1.0), lr=0.1, beta1=0.9, beta2=0.95, weight_decay=0.1,
                        eps=1e-8)
    assert torch.allclose(p, ref.detach(), atol=1e-6)


def test_run_exit_handlers_runs_the_registered_functions_in_a_child():
    code = ("import atexit, sys; sys.path.insert(0, sys.argv[1]); from overtok.compat import run_exit_handlers\n"
            "atexit.register(lambda: print('HANDLER', flush=True))\n"
            "print('RAN', run_exit_handlers(), flush=True)\n"
            "import os; os._exit(0)\n")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert res.stdout.split("\n")[:2] == ["HANDLER", "RAN True"], res.stdout + res.stderr


def test_clear_cublas_workspaces_exists_in_this_build():
    if not torch.cuda.is_available():  # the call is a CUDA one; its presence is what an upgrade could break
        assert hasattr(torch._C, "_cuda_clearCublasWorkspaces") or compat.clear_cublas_workspaces() is False
    else:
        torch.zeros(1, device="cuda")
        assert compat.clear_cublas_workspaces()


def test_ray_sigterm_handlers_held_keeps_rays_handler_off_and_sigterm_deferred_records_it():
    """While Ray starts (overtok.tune._init_ray): Ray's own SIGTERM handler is not installed, and a SIGTERM is
    recorded rather than raised; afterwards the earlier handler is back, and Ray's hook is Ray's again."""
    import os
    import signal

    import ray._private.utils as ray_utils

    from overtok import errors
    from overtok.compat import ray_sigterm_handlers_held
    from overtok.errors import sigterm_deferred

    before = signal.getsignal(signal.SIGTERM)
    hook = ray_utils.set_sigterm_handler
    with sigterm_deferred() as came, ray_sigterm_handlers_held() as held:
        assert held
        deferring = signal.getsignal(signal.SIGTERM)
        ray_utils.set_sigterm_handler(lambda signum, frame: os._exit(99))  # as ray.init does: a no-op here
        assert signal.getsignal(signal.SIGTERM) is deferring
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded, not raised, and the process lives on
        finally:
            errors._SIGTERM_RECEIVED.clear()  # the rest of this test session saw no SIGTERM
    assert came == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before and ray_utils.set_sigterm_handler is hook
