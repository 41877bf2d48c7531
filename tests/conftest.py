import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the fused loss kernel (overtok.kernels) runs on the CPU under Triton's interpreter; set before triton is imported
# (its jit decorator reads this). runtime.loss_kernel 'auto' still picks the stock loss on the CPU.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_config(**overrides):
    """A resolved tiny cfg3f config; overrides are dotted keys."""
    from overtok.config import load_config
    from overtok.data import resolve_vocab

    sets = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 32,
            "data.batch_size": 4, "train.max_steps": 20, "train.eval_every": 10, "train.log_every": 5,
            "train.gen_samples": 0, "train.warmup_steps": 2}
    sets.update(overrides)
    return resolve_vocab(load_config(None, [f"{k}={v}" for k, v in sets.items()]))


@pytest.fixture
def cli(tmp_path):
    """Run `python -m overtok ...` in tmp_path; returns CompletedProcess."""
    import subprocess

    def run(*args, timeout=300, env=None):
        e = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        e.update(PYTHONPATH=str(ROOT), **(env or {}))
        return subprocess.run([sys.executable, "-m", "overtok", *map(str, args)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=timeout, env=e)

    return run


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The shipped quickstart sweep, shrunk in steps, run once for several tests."""
    from tests.sweeplib import SMALL, overtok

    work = tmp_path_factory.mktemp("qs")
    shutil.copy(ROOT / "sweeps" / "quickstart.yaml", work / "quickstart.yaml")
    t0 = time.time()
    res = overtok(work, "sweep", "quickstart.yaml", *[f"--set={s}" for s in SMALL])
    return work, res, time.time() - t0
