"""Golden CPU loss curves: refactors of the trainer must keep every logged loss bit-identical.

Four runs on the CPU, each recorded point by point: a plain trial, a packed pair (two seeds in one model), an OE
trial with row-sparse tables (exact mode) and MTP heads, and a run killed at step 15 and resumed from its step-10
checkpoint. ``tests/golden/curves.json`` holds what they logged; a change that alters any of these numbers (the
order of a reduction, an initialisation, a data stream) fails here. When a change is meant to alter the numbers,
regenerate the file and say why in the commit:

    python -m tests.test_golden

Bit-identity holds on one platform: the CPU's vector kernels (MKL and ATen pick theirs by the instruction set and
the processor) round float32 sums differently, by about 2e-7 relative between two Intel Xeons with AVX-512. So
the file names the platform it was recorded on; on that platform every point must be identical, on another one
within ``PLATFORM_RTOL`` of it (an initialisation, a data stream or a loss that changed moves the curves by far
more; a change of reduction order alone is caught only on the recording platform).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from overtok.tracking import Sink
from tests.conftest import tiny_config

GOLDEN = Path(__file__).parent / "golden" / "curves.json"
PLATFORM_RTOL = 1e-5
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


def platform() -> dict:
    """What decides how float32 kernels round on this CPU: torch's version and vector ISA, the processor model and
    its vector instruction sets."""
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = {f for f in value.split() if f.startswith(("avx", "amx", "fma", "sse"))}
    except OSError:
        pass
    return {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "cpu": model,
            "flags": " ".join(sorted(flags))}


def record(tmp: Path) -> dict:
    torch.set_num_threads(1)  # reductions split over threads may round differently
    return {name: fn(tmp) for name, fn in RUNS.items()}


def _points(curves) -> list:
    """The [key, step, value] points of a run (of each member, in order, for a pack)."""
    return [p for member in curves for p in member] if curves and isinstance(curves[0][0], list) else curves


def test_curves_are_bit_identical_to_the_golden_ones(tmp_path):
    threads = torch.get_num_threads()
    try:
        got = record(tmp_path)
    finally:
        torch.set_num_threads(threads)
    want = json.loads(GOLDEN.read_text())
    recorded_here = want.pop("platform", None) == platform()
    assert set(got) == set(want)
    for name in RUNS:
        if recorded_here:
            assert got[name] == want[name], f"{name}: curves differ from {GOLDEN.name} (regenerate only on purpose)"
            continue
        g, w = _points(got[name]), _points(want[name])
        assert [p[:2] for p in g] == [p[:2] for p in w], f"{name}: other points logged than in {GOLDEN.name}"
        for (key, step, a), (_, _, b) in zip(g, w):
            assert a == pytest.approx(b, rel=PLATFORM_RTOL, abs=0), \
                f"{name}: {key} at step {step} is {a!r}, {GOLDEN.name} has {b!r} (recorded on another platform)"


def test_the_golden_tolerance_tells_a_changed_curve_from_rounding():
    """The tolerance used off the recording platform: a last-bits difference passes, a loss that moved by 1e-4
    does not."""
    assert 2.345678 * (1 + 2e-7) == pytest.approx(2.345678, rel=PLATFORM_RTOL, abs=0)
    assert 2.345678 * (1 + 1e-4) != pytest.approx(2.345678, rel=PLATFORM_RTOL, abs=0)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        curves = {"platform": platform(), **record(Path(d))}
    # one logged point per line, so that a diff of the file shows which points moved
    text = json.dumps(curves, separators=(",", ":")).replace("],[", "],\n[")
    GOLDEN.write_text(text + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
