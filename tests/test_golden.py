"""Golden CPU loss curves: refactors of the trainer must keep every logged loss bit-identical.

Four runs on the CPU, each recorded point by point: a plain trial, a packed pair (two seeds in one model), an OE
trial with row-sparse tables (exact mode) and MTP heads, and a run killed at step 15 and resumed from its step-10
checkpoint. ``tests/golden/curves.json`` holds what they logged; a change that alters any of these numbers (the
order of a reduction, an initialisation, a data stream) fails here. When a change is meant to alter the numbers,
regenerate the file and say why in the commit:

    python -m tests.test_golden
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from overtok.tracking import Sink
from tests.conftest import tiny_config

GOLDEN = Path(__file__).parent / "golden" / "curves.json"
KEYS = ("train/loss", "train/grad_norm", "val/loss")
COMMON = {"train.max_steps": 20, "train.log_every": 2, "train.eval_every": 10, "train.checkpoint_every": 10}


class _Points(Sink):
    def __init__(self):
        self.points: list[list] = []

    def log(self, metrics, step):
        self.points += [[k, step, v] for k, v in sorted(metrics.items()) if k in KEYS]


def _plain(tmp: Path) -> list:
    from overtok.train import train

    sink = _Points()
    train(tiny_config(**COMMON, **{"train.checkpoint_dir": str(tmp / "plain")}), sink)
    return sink.points


def _packed(tmp: Path) -> list:
    from overtok.train import train_pack

    cfgs = [tiny_config(seed=s, **COMMON) for s in (0, 1)]
    sinks = [_Points() for _ in cfgs]
    train_pack(cfgs, sinks, tmp / "pack", device=torch.device("cpu"))
    return [s.points for s in sinks]


def _row_sparse(tmp: Path) -> list:
    from overtok.train import train

    sink = _Points()
    train(tiny_config(**COMMON, **{"model.oe.n": 3, "model.oe.m": 101, "model.oe.sparse_update": True,
                                   "model.oe.sparse_mode": "exact", "model.od_depth": 2,
                                   "train.checkpoint_dir": str(tmp / "sparse")}), sink)
    return sink.points


def _resumed(tmp: Path) -> list:
    from overtok.train import train

    sets = {**COMMON, "model.oe.n": 2, "model.oe.m": 53, "train.checkpoint_dir": str(tmp / "resumed")}
    with pytest.raises(RuntimeError, match="deliberate"):
        train(tiny_config(**sets, **{"runtime.fail_at_step": 15}), _Points())
    sink = _Points()
    train(tiny_config(**sets), sink)
    return sink.points


RUNS = {"plain": _plain, "packed": _packed, "row_sparse": _row_sparse, "resumed": _resumed}


def record(tmp: Path) -> dict:
    torch.set_num_threads(1)  # reductions split over threads may round differently
    return {name: fn(tmp) for name, fn in RUNS.items()}


def test_curves_are_bit_identical_to_the_golden_ones(tmp_path):
    threads = torch.get_num_threads()
    try:
        got = record(tmp_path)
    finally:
        torch.set_num_threads(threads)
    want = json.loads(GOLDEN.read_text())
    assert set(got) == set(want)
    for name in RUNS:
        assert got[name] == want[name], f"{name}: curves differ from {GOLDEN.name} (regenerate only on purpose)"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        curves = record(Path(d))
    # one logged point per line, so that a diff of the file shows which points moved
    text = json.dumps(curves, separators=(",", ":")).replace("],[", "],\n[")
    GOLDEN.write_text(text + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
