"""How long a GPU trial will take, from a throughput model calibrated on the project's committed measurements.

The trainer's MFU (model FLOPs / bf16 peak) was measured on one GPU for a few body sizes
(``CALIBRATION``, a benchmark file committed with its command, date and GPU). A trial's time alone on a whole GPU
is its training FLOPs over (MFU at its body size x peak), with MFU interpolated in log(body parameters) and held
constant beyond the measured sizes (flagged), plus the memory traffic of dense AdamW on OE tables (they are
updated every step, whatever the batch touched). Trials sharing a GPU share its throughput, so the sweep's GPU
time is the sum of its trials' times, and its wall time that over the GPUs it may use at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from overtok import accounting

CALIBRATION = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_trainer_fused.json"
CALIBRATION_VARIANT = "fused-eager-embed"  # the rows measured as the trainer runs a model
ADAMW_BYTES_PER_PARAM = 32  # fp32 param, grad and two moments: read and written once per step
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet bandwidth; the calibration's GPU


@dataclass
class Calibration:
    gpu: str
    date: str
    command: str
    points: list[tuple[float, float]]  # (body parameters, MFU), sorted

    def mfu(self, n_body: float) -> tuple[float, bool]:
        """(MFU at this body size, whether the size lies inside the measured range)."""
        xs = [math.log(n) for n, _ in self.points]
        x = math.log(max(n_body, 1.0))
        if x <= xs[0]:
            return self.points[0][1], x >= xs[0] - 1e-9
        if x >= xs[-1]:
            return self.points[-1][1], x <= xs[-1] + 1e-9
        for (x0, (_, m0)), (x1, (_, m1)) in zip(zip(xs, self.points), zip(xs[1:], self.points[1:])):
            if x0 <= x <= x1:
                return m0 + (m1 - m0) * (x - x0) / (x1 - x0), True
        return self.points[-1][1], False


def load_calibration(path: Path = CALIBRATION) -> Calibration | None:
    """The committed measurement, or None where the project's benchmark results are not at hand."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pts = sorted((float(r["params"]["body"]), float(r["mfu"])) for r in data.get("results", [])
                 if r.get("variant") == CALIBRATION_VARIANT and r.get("mfu"))
    if not pts:
        return None
    env = data.get("environment", {})
    return Calibration(env.get("gpu", "?"), env.get("date", "?"), data.get("command", ""), pts)


def trial_seconds(cfg, total_flops: float, cal: Calibration, workers: int = 1) -> tuple[float, bool]:
    """(seconds of the trial alone on ``workers`` whole GPUs, whether its body size is inside the calibration)."""
    groups = accounting.param_groups(cfg.model)
    mfu, inside = cal.mfu(groups["body"])
    compute = total_flops / (mfu * accounting.BF16_PEAK * workers)
    dense_tables = 0 if cfg.model.oe.sparse_update else groups.get("oe_tables", 0)
    tables = cfg.train.max_steps * dense_tables * ADAMW_BYTES_PER_PARAM / HBM_BYTES_PER_S
    return compute + tables, inside
