"""Every committed fits.json is what `overtok fit` of the current code gives on the export beside it: REPRODUCTION.md quotes
those files, so a change to the analysis code that moves a number must come with the refitted file."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMITTED = sorted(p.parent for p in (ROOT / "results").rglob("fits.json") if (p.parent / "runs.parquet").exists())


def _bootstrap(fits: dict) -> int:
    """The resample count the file was made with (every fit in it records it)."""
    counts = set()

    def walk(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("bootstrap"), int) and "estimates" in obj:
                counts.add(obj["bootstrap"])
            for v in obj.values():
                walk(v)

    walk(fits)
    assert len(counts) == 1, counts
    return counts.pop()


def _differences(new, old, path="") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        out = [f"{path}/{k}: only in one" for k in set(new) ^ set(old)]
        for k in set(new) & set(old):
            out += _differences(new[k], old[k], f"{path}/{k}")
        return out
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in _differences(a, b, f"{path}[{i}]")]
    if isinstance(new, float) and isinstance(old, float) and math.isclose(new, old, rel_tol=1e-9, abs_tol=1e-12):
        return []
    return [] if new == old else [f"{path}: {new!r} now, {old!r} committed"]


def test_the_committed_results_have_fits():
    names = {str(p.relative_to(ROOT / "results")) for p in COMMITTED}
    assert {"vocab_scaling", "ot_grid", "cfg_paper_merged", "loglinear_code/merged"} <= names, names


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_committed_fits_are_the_current_fit_of_their_export(folder, tmp_path):
    old = json.loads((folder / "fits.json").read_text())
    copy = tmp_path / folder.name
    copy.mkdir()
    for name in ("runs.parquet", "curves.parquet"):
        shutil.copy(folder / name, copy / name)
    at = list(old.get("loglinear_at_tokens") or {})
    res = subprocess.run([sys.executable, "-m", "overtok", "fit", str(copy), "--bootstrap", str(_bootstrap(old)),
                          *(["--at-tokens", *at] if at else [])], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    new = json.loads((copy / "fits.json").read_text())
    diffs = _differences(new, old)
    rel = folder.relative_to(ROOT)
    assert not diffs, f"{rel}/fits.json is stale (rerun the command results/README.md gives for it):\n" + "\n".join(
        sorted(diffs)[:20])
