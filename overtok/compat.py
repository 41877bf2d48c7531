"""Every use of a private Ray, MLflow or torch API, in one place, each with a fallback or a clear failure.

These names are not part of their libraries' public contracts and can move in any release. Keeping them here means
an upgrade breaks one small module, and ``tests/test_compat.py`` says which helper broke. Imports are lazy: the
sweep driver must not import torch, and the trial side need not import MLflow.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any


def mlflow_store(uri: str) -> Any:
    """MLflow's tracking store behind ``uri`` (SQL stores answer one query for many runs' metrics, which the
    public client cannot ask)."""
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(uri)


def sql_metric_model() -> Any:
    """MLflow's SQLAlchemy model of a metric point (columns run_uuid, key, step, value, timestamp)."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric

    return SqlMetric


def ray_cpu_count() -> int:
    """The CPUs a new local Ray would see (it honours a container's CPU quota or cpuset, which os.cpu_count() does
    not); os.cpu_count() where Ray's helper has moved."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:
        return os.cpu_count() or 1
    return int(get_num_cpus(override_docker_cpu_warning=True))


def ray_monitor_processes() -> list:
    """The Popen objects of the local Ray's autoscaler monitor started by this driver ([] where the driver attached
    to a running Ray, or where Ray's node object has moved)."""
    import ray

    worker = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(worker, "_global_node", None)
    return [info.process for info in (getattr(node, "all_processes", None) or {}).get("monitor", [])]


@contextlib.contextmanager
def ray_sigterm_handlers_held():
    """While in this block Ray installs no SIGTERM handler of its own: ``ray.init`` sets one that exits at once
    (``sys.exit``) before the node it starts can stop its processes, so a SIGTERM then left Ray's agents running.
    Ray calls its private ``ray._private.utils.set_sigterm_handler`` for each; where that has moved, Ray's
    handlers are installed as before (yields False)."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:
        yield False
        return
    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield False
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield True
    finally:
        ray_utils.set_sigterm_handler = original


def ddp_ignore(model: Any, names: list[str]) -> None:
    """Have DistributedDataParallel leave out the parameters and buffers named ``names`` (row-sharded tables, whose
    rows each rank owns)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def foreach_norm(tensors: list) -> list:
    """The 2-norm of each tensor, in one fused launch per device and dtype."""
    import torch

    return torch._foreach_norm(tensors)


def foreach_mul_(tensors: list, scalar: Any) -> None:
    """Multiply every tensor in place by ``scalar`` (a number or a 0-d tensor), fused."""
    import torch

    torch._foreach_mul_(tensors, scalar)


def fused_adamw_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, step: Any, *, lr: Any, beta1: float,
                 beta2: float, weight_decay: float, eps: float, grad_scale: Any = None) -> None:
    """One AdamW step of ``params`` in place with torch's fused kernel (the one ``torch.optim.AdamW(fused=True)``
    runs), ``step`` a tensor already counting this step; gradients are divided by ``grad_scale`` first if given."""
    import torch

    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(params), lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                        grad_scale=grad_scale, found_inf=None)


def run_exit_handlers() -> bool:
    """Run the functions registered with ``atexit`` now (before an ``os._exit``); False where this Python has no
    such hook (it is CPython's private ``atexit._run_exitfuncs``)."""
    import atexit

    run = getattr(atexit, "_run_exitfuncs", None)
    if run is None:
        return False
    run()
    return True


def clear_cublas_workspaces() -> bool:
    """Free cuBLAS's per-stream workspaces, which it otherwise keeps for the process's lifetime; False where this
    build has no such call."""
    import torch

    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        return False
    clear()
    return True
