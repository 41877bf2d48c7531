"""Sweep files: load, validate, expand into concrete trials with stable ids, and plan. No Ray here.

A sweep YAML::

    name: quickstart
    base: {...}                  # a full training config (the `overtok train` schema)
    grid:                        # dotted keys -> lists; cartesian product
      model.oe.n: [1, 2, 3]
    zip:                         # optional groups of keys that vary together (equal-length lists)
      - {model.d_model: [32, 64], model.n_layers: [2, 3]}
    seeds: [0]
    resources: {cpu: 1, gpu: 0}  # per trial; fractions allowed; other keys are Ray custom resources
    max_concurrent: 2
    max_failures: 0              # retries of a failed trial, from its last checkpoint
    pack: 1                      # up to this many trials differing only in seed / train.lr share one process
                                 # and one model with stacked weights (overtok/packed.py); 1 = off
    reuse_processes: true        # a finished trial's process runs the next trial of the same resources
    tracking: {tracking_uri: "", experiment: ""}
    ray: {address: "", storage_path: results/ray}

Every trial is validated before anything starts; its id is a hash of its experiment sections (overtok.identity), so reruns
recognise finished trials and new grid points or seeds run alone.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overtok import accounting
from overtok.config import (
    NAME_RE,
    NAME_RULE,
    ConfigError,
    RunConfig,
    TrainConfig,
    apply_overrides,
    build_config,
    cuda_index,
    flatten,
    load_yaml,
    set_dotted,
    to_dict,
)
from overtok.identity import pack_key, trial_id

SWEEP_KEYS = {"name", "base", "grid", "zip", "seeds", "resources", "max_concurrent", "max_failures", "tracking", "ray",
              "max_trials", "description", "pack", "reuse_processes"}
TRACKING_KEYS = {"tracking_uri", "experiment"}
RAY_KEYS = {"address", "storage_path"}
DEFAULT_MAX_TRIALS = 256
MAX_EXPANSION = 10_000  # trials a grid may expand to at all (max_trials and --yes apply below it)


@dataclass
class Trial:
    trial_id: str
    run_name: str
    varied: dict[str, Any]
    config: RunConfig

    def to_json(self) -> str:
        return json.dumps({"trial_id": self.trial_id, "run_name": self.run_name, "varied": self.varied,
                           "config": to_dict(self.config)})


def trial_workers(resources: dict) -> int:
    """Data-parallel workers of each trial: resources.workers, else one per GPU when a trial asks for 2 or more."""
    gpu = resources.get("gpu", 0)
    return int(resources.get("workers", 0)) or (int(gpu) if gpu >= 2 else 1)


def trial_demand(resources: dict) -> tuple[float, float]:
    """(CPUs, GPUs) one trial takes in all: each data-parallel worker gets resources.cpu CPUs and a share of
    resources.gpu; a single-process trial gets them itself."""
    return resources.get("cpu", 1.0) * trial_workers(resources), resources.get("gpu", 0.0)


def _ray_address_file() -> Path:
    """Where ``ray start`` leaves the address of a Ray instance running on this machine (``ray.init()`` attaches to
    it): Ray's temp dir, which is $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp."""
    import sys
    import tempfile

    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    if not tmp:
        tmp = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    return Path(tmp) / "ray" / "ray_current_cluster"


def local_gpus() -> int:
    """GPUs a new local Ray would see: those CUDA_VISIBLE_DEVICES names, else those ``nvidia-smi -L`` lists (without
    importing torch, which the driver does not)."""
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def local_cpus(needed: float) -> int:
    """CPUs a new local Ray would see, as far as asking for ``needed`` of them goes: os.cpu_count() when that is not
    enough anyway, else Ray's own count (it honours a container's CPU quota or cpuset, which os.cpu_count() does
    not). Ray is imported only for trials that ask for more than one CPU."""
    have = os.cpu_count() or 1
    if needed <= 1 or needed > have:
        return have
    from overtok.compat import ray_cpu_count

    return ray_cpu_count()


def kept_checkpoints(t: TrainConfig) -> int:
    """How many checkpoint files a trial keeps at the end: its saves (every checkpoint_every steps, and the final
    one), of which the 2 newest stay."""
    return min(t.max_steps // t.checkpoint_every + int(t.checkpoint_final), 2)


@dataclass
class Sweep:
    name: str
    file: str
    trials: list[Trial]
    resources: dict[str, float]
    max_concurrent: int = 0
    max_failures: int = 0
    tracking_uri: str = ""
    experiment: str = ""
    ray_address: str = ""
    storage_path: str = ""
    max_trials: int = DEFAULT_MAX_TRIALS
    varied_keys: list[str] = field(default_factory=list)
    pack: int = 1
    reuse_processes: bool = True
    lines: dict[str, int] = field(default_factory=dict)  # line of each key in the sweep file, for errors
    run_limit: int | None = None  # `overtok sweep --max-trials`: at most this many of the trials not yet FINISHED
    time_limit: float | None = None  # `overtok sweep --time-limit`: seconds from the command's start (tune.TimeBox)

    def select(self, only: list[str] | None = None, seeds: list[int] | None = None, skip: set[str] | None = None,
               limit: int | None = None) -> None:
        """Keep the trials whose id starts with one of ``only`` and whose seed is in ``seeds`` (either None: no
        filter), then drop those in ``skip`` (e.g. finished in earlier waves' exports) and keep the first ``limit``.
        Ids stay what they are in the whole grid, so waves of one campaign can run on different machines and be
        merged. A prefix that names no trial, or names several, is an error; so is a selection left empty.
        (`overtok sweep` passes no ``limit`` but sets ``run_limit``: the first N of the trials its MLflow store
        does not hold FINISHED, which only the run knows.)"""
        keep = self.trials
        if only:
            picked = set()
            for prefix in only:
                hits = [t.trial_id for t in keep if t.trial_id.startswith(prefix)]
                if len(hits) != 1:
                    what = "no trial" if not hits else f"{len(hits)} trials ({', '.join(hits[:3])})"
                    raise ConfigError(f"{prefix!r} names {what} of this sweep; `overtok plan` lists the ids",
                                      file=self.file, key="--only")
                picked.add(hits[0])
            keep = [t for t in keep if t.trial_id in picked]
        if seeds is not None:
            known = {t.config.seed for t in self.trials}
            if unknown := sorted(set(seeds) - known):
                raise ConfigError(f"seed {unknown[0]} is not one of this sweep's seeds {sorted(known)}", file=self.file,
                                  key="--seeds")
            keep = [t for t in keep if t.config.seed in seeds]
        if not keep:
            raise ConfigError("no trial has both a chosen id and a chosen seed", file=self.file, key="--seeds")
        if skip:
            keep = [t for t in keep if t.trial_id not in skip]
            if not keep:
                raise ConfigError("every chosen trial has finished in the given exports: nothing left to run",
                                  file=self.file, key="--skip-done")
        self.trials = keep[:limit] if limit else keep

    def checkpoint_bytes_needed(self) -> int:
        """Disk the sweep's new checkpoints will take: the 2 newest per trial (a pack's file holds its members),
        for trials whose checkpoint directory does not exist yet (existing ones are already on disk)."""
        sizes = sorted((kept_checkpoints(t.config.train) * accounting.checkpoint_bytes(t.config.model)
                        for t in self.trials if not Path(t.config.train.checkpoint_dir).exists()), reverse=True)
        return sum(sizes[: self.run_limit])  # with run_limit: the largest that many trials can need

    def free_disk(self) -> tuple[Path, int]:
        """(the nearest existing folder of storage_path, its free bytes): where the checkpoints will go."""
        import shutil

        where = Path(self.storage_path)
        while not where.exists():
            where = where.parent
        return where, shutil.disk_usage(where).free

    def check_disk(self, yes: bool) -> None:
        """Refuse (before anything starts) a sweep whose checkpoints would not fit on the storage disk."""
        need = self.checkpoint_bytes_needed()
        where, free = self.free_disk()
        if need > free and not yes:
            raise ConfigError(f"checkpoints need about {need / 2**30:.1f} GiB (2 kept per trial) but {where} has "
                              f"{free / 2**30:.1f} GiB free; raise train.checkpoint_every, set train.checkpoint_final: "
                              "false, or pass --yes", file=self.file, key="base.train.checkpoint_every")

    def starts_local_ray(self) -> bool:
        """Whether the sweep's Ray will be a new local one: no ray.address, no RAY_ADDRESS, no Ray instance started
        on this machine with ``ray start``."""
        return not (self.ray_address or os.environ.get("RAY_ADDRESS") or _ray_address_file().exists())

    def check_local_resources(self) -> None:
        """Refuse (before anything starts) a sweep whose trial needs more GPUs or CPUs than this machine has, or a
        custom resource, when its Ray will be a new local one (:meth:`starts_local_ray`): Ray would wait for them
        forever. A cluster decides for itself (its nodes may come later)."""
        if not self.starts_local_ray():
            return
        custom = sorted(k for k in self.resources if k not in ("cpu", "gpu", "workers"))
        if custom:
            raise ConfigError(f"a trial needs the custom resource {custom[0]!r}, which a local Ray does not have; "
                              "attach to a cluster whose nodes declare it with --address", file=self.file,
                              key=f"resources.{custom[0]}", line=self.lines.get(f"resources.{custom[0]}"))
        workers = trial_workers(self.resources)
        cpus, gpu = trial_demand(self.resources)
        have_gpu = local_gpus() if gpu > 0 else 0  # (nvidia-smi only where a trial asks for a GPU)
        if gpu > have_gpu:
            raise ConfigError(f"a trial needs {gpu:g} GPU{'s' if gpu != 1 else ''} but this machine has {have_gpu} "
                              "(a local Ray has this machine's); run it on a GPU machine or attach to a cluster "
                              "with --address", file=self.file, key="resources.gpu", line=self.lines.get("resources.gpu"))
        cuda = {d: i for t in self.trials if (i := cuda_index(d := t.config.runtime.device)) is not None}
        if cuda:
            device = max(cuda, key=cuda.get)
            have = local_gpus()
            if cuda[device] >= have:
                raise ConfigError(f"trials ask for runtime.device {device} but this machine has {have} CUDA "
                                  "GPUs (a local Ray has this machine's)", file=self.file, key="base.runtime.device",
                                  line=self.lines.get("base.runtime.device"))
        have_cpu = local_cpus(cpus)
        if cpus > have_cpu:
            each = f" ({workers} workers x {self.resources.get('cpu', 1.0):g})" if workers > 1 else ""
            raise ConfigError(f"a trial needs {cpus:g} CPUs{each} but this machine has {have_cpu} (a local "
                              "Ray has this machine's); lower resources.cpu or attach to a cluster with --address",
                              file=self.file, key="resources.cpu", line=self.lines.get("resources.cpu"))

    def packs(self, trials: list[Trial] | None = None) -> list[list[Trial]]:
        """Groups of trials that run as one process: packable trials (same config but seed / lr) in chunks of
        at most ``pack``, in sweep order; every other trial alone."""
        groups: dict[str, list[Trial]] = {}
        out: list[list[Trial]] = []
        for t in self.trials if trials is None else trials:
            key = pack_key(t.config) if self.pack > 1 else None
            if key is None:
                out.append([t])
                continue
            if key not in groups or len(groups[key]) == self.pack:
                groups[key] = []
                out.append(groups[key])
            groups[key].append(t)
        return out

    def notes(self) -> list[str]:
        """Lines about trials that will run but cannot measure something (each line once, in sweep order)."""
        from overtok.data import generation_note

        return list(dict.fromkeys(n for t in self.trials if (n := generation_note(t.config))))

    def check_size(self, yes: bool) -> None:
        n = min(len(self.trials), self.run_limit or len(self.trials))
        if n > self.max_trials and not yes:
            raise ConfigError(f"{n} trials exceed max_trials={self.max_trials}; pass --yes to run them",
                              file=self.file, key="grid")


def _short(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{leaf}={value}"


def _expect(cond: bool, problem: str, file: str, key: str, lines: dict[str, int]) -> None:
    if not cond:
        raise ConfigError(problem, file=file, key=key, line=lines.get(key))


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read, validate and expand a sweep file. Raises ConfigError (file, line, key, problem) on any mistake."""
    from overtok.data import resolve_vocab

    file = str(path)
    raw, lines = load_yaml(path)
    try:
        raw = apply_overrides(raw, overrides, flat_sections=("grid",))
    except ConfigError as e:
        raise ConfigError(e.problem, file=file, key=e.key) from None
    for k in raw:
        _expect(k in SWEEP_KEYS, f"unknown key (allowed: {', '.join(sorted(SWEEP_KEYS))})", file, str(k), lines)
    name = raw.get("name")
    _expect(isinstance(name, str) and NAME_RE.fullmatch(name) is not None, NAME_RULE, file, "name", lines)
    base = raw.get("base", {})
    _expect(isinstance(base, dict), "must be a mapping (a training config)", file, "base", lines)
    grid = raw.get("grid", {}) or {}
    _expect(isinstance(grid, dict), "must be a mapping of dotted keys to lists", file, "grid", lines)
    for k, v in grid.items():
        _expect(isinstance(k, str), f"keys must be dotted config keys (strings), got {k!r}", file, "grid", lines)
        _expect(isinstance(v, list) and len(v) > 0, "must be a non-empty list", file, f"grid.{k}", lines)
        _expect(k != "seed", "seeds are an axis of their own: use the top-level key seeds: [...]", file, "grid.seed",
                lines)
    zips = raw.get("zip", []) or []
    _expect(isinstance(zips, list), "must be a list of groups", file, "zip", lines)
    for i, group in enumerate(zips):
        key = f"zip[{i}]"
        _expect(isinstance(group, dict) and group, "must be a mapping of dotted keys to lists", file, key, lines)
        _expect(all(isinstance(k, str) for k in group), "keys must be dotted config keys (strings)", file, key, lines)
        lengths = {len(v) if isinstance(v, list) else -1 for v in group.values()}
        _expect(len(lengths) == 1 and min(lengths) > 0, "lists must be non-empty and of equal length", file, key, lines)
    seeds = raw.get("seeds", [base.get("seed", 0)])
    _expect(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
            "must be a non-empty list of integers", file, "seeds", lines)
    resources = raw.get("resources", {"cpu": 1}) or {}
    _expect(isinstance(resources, dict), "must be a mapping like {cpu: 1, gpu: 0.25}", file, "resources", lines)
    for k, v in resources.items():
        _expect(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "must be a number >= 0", file,
                f"resources.{k}", lines)
    if "workers" in resources:  # data-parallel workers per trial (each gets cpu and gpu / workers)
        _expect(isinstance(resources["workers"], int) and resources["workers"] >= 1, "must be an integer >= 1", file,
                "resources.workers", lines)
    for key in ("max_concurrent", "max_failures", "max_trials", "pack"):
        v = raw.get(key, 0)
        _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be an integer >= 0", file, key, lines)
    _expect(isinstance(raw.get("reuse_processes", True), bool), "must be true or false", file, "reuse_processes", lines)
    tracking, ray = raw.get("tracking", {}) or {}, raw.get("ray", {}) or {}
    for sect, allowed in (("tracking", TRACKING_KEYS), ("ray", RAY_KEYS)):
        val = raw.get(sect, {}) or {}
        _expect(isinstance(val, dict), "must be a mapping", file, sect, lines)
        for k, v in val.items():
            _expect(k in allowed, f"unknown key (allowed: {', '.join(sorted(allowed))})", file, f"{sect}.{k}", lines)
            _expect(isinstance(v, str), "must be a string", file, f"{sect}.{k}", lines)

    # the base must be valid on its own (errors point at base.*)
    try:
        build_config(base)
    except ConfigError as e:
        key = f"base.{e.key}" if e.key else "base"
        raise ConfigError(e.problem, file=file, key=key, line=lines.get(key)) from None

    storage = Path(ray.get("storage_path") or "results/ray").resolve()
    axes: list[list[dict[str, Any]]] = [[{k: v} for v in vals] for k, vals in grid.items()]
    axes += [[dict(zip(g.keys(), vals)) for vals in zip(*g.values())] for g in zips]
    axes.append([{"seed": s} for s in seeds])
    varied_keys = list(grid) + [k for g in zips for k in g] + (["seed"] if len(seeds) > 1 else [])

    count = 1
    for axis in axes:
        count *= len(axis)
    # counted before expanding: validating each trial costs milliseconds, so a grid of millions would hang
    _expect(count <= MAX_EXPANSION, f"expands to {count:,} trials; at most {MAX_EXPANSION:,} can be expanded "
            "(split the grid into several sweeps)", file, "grid", lines)
    trials: list[Trial] = []
    seen: dict[str, dict] = {}
    for combo in itertools.product(*axes):
        point: dict[str, Any] = {}
        for part in combo:
            point.update(part)
        data = json.loads(json.dumps(base))
        where = ", ".join(f"{k}={v}" for k, v in point.items())
        try:
            for k, v in point.items():
                set_dotted(data, k, v)
            cfg = resolve_vocab(build_config(data))
        except ConfigError as e:
            gkey = next((f"grid.{k}" for k in grid if k == e.key or e.key.startswith(f"{k}.") or k.startswith(f"{e.key}.")),
                        None) or next(
                (f"zip[{i}].{e.key}" for i, g in enumerate(zips) if e.key in g), f"base.{e.key}")
            line = lines.get(gkey) or lines.get(f"grid.{e.key}") or lines.get(f"base.{e.key}")
            raise ConfigError(f"{e.problem} (trial {where})", file=file, key=gkey, line=line) from None
        tid = trial_id(cfg)
        if tid in seen:
            raise ConfigError(f"duplicate trials after expansion: {where} equals {seen[tid]}", file=file, key="grid")
        seen[tid] = point
        for attr in ("path", "corpus", "tokenizer"):  # Ray workers run elsewhere; the id keeps paths as written
            val = getattr(cfg.data, attr)
            if val and not val.startswith("bpe:"):
                setattr(cfg.data, attr, str(Path(val).resolve()))
        varied = {k: point[k] for k in varied_keys}
        run_name = " ".join(_short(k, v) for k, v in varied.items()) or name
        cfg.name = name
        cfg.tracking.run_name = f"{run_name} [{tid[:6]}]"
        cfg.train.checkpoint_dir = str(storage / name / "trials" / tid)
        trials.append(Trial(tid, cfg.tracking.run_name, varied, cfg))
    _expect(len(trials) > 0, "expands to no trials", file, "grid", lines)
    if resources.get("workers", 1) > 1 or resources.get("gpu", 0) >= 2:
        _expect(not any(t.config.model.oe.sparse_update and t.config.model.oe.n > 1 and not t.config.model.oe.shard
                        for t in trials),
                "row-sparse OE tables (model.oe.sparse_update) with data-parallel workers must be sharded over them "
                "(model.oe.shard: true)", file, "resources.workers", lines)
        _expect(raw.get("pack", 1) <= 1, "packed trials run in one process; data-parallel workers (resources.workers "
                "or gpu >= 2) cannot be combined with pack > 1", file, "pack", lines)

    return Sweep(name=name, file=file, trials=trials, resources={k: float(v) for k, v in resources.items()},
                 max_concurrent=raw.get("max_concurrent", 0), max_failures=raw.get("max_failures", 0),
                 tracking_uri=tracking.get("tracking_uri", ""), experiment=tracking.get("experiment", "") or name,
                 ray_address=ray.get("address", ""), storage_path=str(storage),
                 max_trials=raw.get("max_trials", 0) or DEFAULT_MAX_TRIALS, varied_keys=varied_keys,
                 pack=raw.get("pack", 1) or 1, reuse_processes=raw.get("reuse_processes", True), lines=lines)


# ----------------------------------------------------------------------------------------------
# Planning


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def trial_plan(trial: Trial, on_gpu: bool = False, workers: int = 1) -> dict[str, Any]:
    """One row of ``overtok plan``: tokens and FLOPs of the whole trial (each of ``workers`` data-parallel ranks
    draws its own batches), memory per worker (a row-sharded OE table is split over them)."""
    cfg = trial.config
    cuda_bf16 = on_gpu and cfg.train.dtype != "float32"  # bf16 autocast on CUDA
    groups = accounting.param_groups(cfg.model)
    tokens = cfg.train.max_steps * cfg.tokens_per_step * workers
    positions = tokens // cfg.model.tokenizer_ngram
    return {"trial_id": trial.trial_id, **trial.varied, **{f"N_{k}": v for k, v in groups.items()},
            "flops_per_token": accounting.flops_per_token(cfg.model), "tokens": tokens,
            "total_flops": accounting.flops_per_token(cfg.model) * positions,
            "memory_gb": accounting.memory_estimate_bytes(
                cfg.model, cfg.data.batch_size, workers, cuda_bf16=cuda_bf16,
                residual_dtype=cfg.train.residual_dtype, fused_loss=cfg.runtime.loss_kernel != "torch") / 2**30,
            "ckpt_gb": accounting.checkpoint_bytes(cfg.model) / 2**30}


PLAN_LEGEND = ("columns: N_* parameters by group (body = blocks and norms; embedding, OE tables and projection, head, "
               "extra OD/MTP heads); flops_per_token = training FLOPs per position (6 N + attention); tokens = base "
               "tokens the trial trains on; memory_gb = estimated peak GPU memory of the trial (per worker); ckpt_gb = "
               "one checkpoint (2 are kept); est_min = estimated minutes alone on one whole GPU of the calibration's "
               "kind (* = body size outside the measured range)")


def plan_table(sweep: Sweep, done: dict[str, str] | None = None) -> str:
    """One row per trial and the sweep's totals; with ``done`` (trial id -> the export it finished in, see
    ``overtok.export.finished_trials``) a column saying where each trial finished and the ``--only`` list of those
    still to run."""
    from overtok.estimate import load_calibration, trial_seconds

    workers = trial_workers(sweep.resources)
    on_gpu = sweep.resources.get("gpu", 0) > 0
    rows = [trial_plan(t, on_gpu=on_gpu, workers=workers) for t in sweep.trials]
    cal = load_calibration() if on_gpu else None
    if cal is not None:
        for t, r in zip(sweep.trials, rows):
            secs, inside = trial_seconds(t.config, r["total_flops"], cal, workers)
            r["est_seconds"] = secs
            r["est_min"] = f"{secs / 60:.1f}" + ("" if inside else "*")
    cols = ["trial_id", *sweep.varied_keys, "N_body", "N_embedding", "N_oe_tables", "N_oe_proj", "N_head",
            "N_extra_heads", "flops_per_token", "tokens", "memory_gb", "ckpt_gb"] + (["est_min"] if cal else [])
    if done is not None:
        cols.append("done")
        for r in rows:
            r["done"] = done.get(r["trial_id"], "-")
    cells = [[c.split(".")[-1] if "." in c else c for c in cols]]
    for r in rows:
        out = []
        for c in cols:
            v = r[c]
            if c in ("memory_gb", "ckpt_gb"):
                out.append(f"{v:.2f}")
            elif c.startswith("N_") or c in ("flops_per_token", "tokens"):
                out.append(_fmt_count(v))
            else:
                out.append(str(v))
        cells.append(out)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    total_flops = sum(r["total_flops"] for r in rows)
    total_tokens = sum(r["tokens"] for r in rows)
    lines.append("")
    lines.append(f"sweep {sweep.name}: {len(rows)} trials, {_fmt_count(total_tokens)} tokens, "
                 f"{total_flops:.3g} training FLOPs, resources per trial {sweep.resources}, "
                 f"peak memory per {'worker' if workers > 1 else 'trial'} up to "
                 f"{max(r['memory_gb'] for r in rows):.2f} GiB (estimate); checkpoints "
                 f"{sum(kept_checkpoints(t.config.train) * r['ckpt_gb'] for t, r in zip(sweep.trials, rows)):.1f} GiB on disk "
                 "(each trial keeps its 2 newest)")
    if sweep.pack > 1:
        packs = sweep.packs()
        sizes = [len(p) for p in packs]
        by_id = {r["trial_id"]: r for r in rows}
        mem = max(sum(by_id[t.trial_id]["memory_gb"] for t in p) for p in packs)
        lines.append(f"packed (pack: {sweep.pack}): {len(sizes)} packed models, trials per model {sizes}, "
                     f"peak memory per model up to {mem:.2f} GiB (estimate: its trials' sum)")
    lines.append("trial processes: " + ("reused, each runs trial after trial of the same resources (reuse_processes)"
                                        if sweep.reuse_processes else "a new one per trial (reuse_processes: false)"))
    lines += _plan_time_and_room(sweep, rows, cal, workers)
    if done is not None:
        todo = [r for r in rows if r["done"] == "-"]
        left = (f" ({sum(r['est_seconds'] for r in todo) / 3600:.2f} GPU-hours by the estimate above)"
                if cal is not None and todo else "")
        lines.append(f"done: {len(rows) - len(todo)} of {len(rows)} trials finished in the given exports; "
                     + (f"to run{left}: --only {','.join(r['trial_id'] for r in todo)}" if todo
                        else "nothing left to run"))
    lines.append(PLAN_LEGEND)
    lines.extend(f"note: {n}" for n in sweep.notes())
    return "\n".join(lines)


def _plan_time_and_room(sweep: Sweep, rows: list[dict], cal, workers: int) -> list[str]:
    """Estimated GPU time and wall time; the memory of the trials that share one GPU; checkpoints against the free
    disk where they go."""
    out = []
    gpu = sweep.resources.get("gpu", 0.0)
    if gpu > 0 and cal is None:
        out.append("time: no calibration at hand (benchmarks/results/gpu_trainer_fused.json), no estimate")
    elif gpu > 0:
        gpu_s = sum(r["est_seconds"] for r in rows)
        have = local_gpus() if sweep.starts_local_ray() else 0
        gpus = max(have, 1)
        outside = sum(str(r["est_min"]).endswith("*") for r in rows)
        out.append(f"time (estimate from {cal.gpu} measurements of {cal.date}, MFU {cal.points[0][1]:.2f}-"
                   f"{cal.points[-1][1]:.2f} at {_fmt_count(cal.points[0][0])}-{_fmt_count(cal.points[-1][0])} body "
                   f"parameters): {gpu_s / 3600:.2f} GPU-hours; about {gpu_s / gpus / 60:.0f} min of wall time on "
                   f"{gpus} GPU{'s' if gpus > 1 else ''}" + ("" if have else " (no GPU here: one assumed)")
                   + ", plus each trial's start-up and compilation (not modelled)"
                   + (f"; {outside} trial(s) outside the measured sizes (*)" if outside else ""))
        per_gpu = max(1, int(1 / gpu)) if gpu < 1 else 1
        if sweep.max_concurrent:
            per_gpu = min(per_gpu, sweep.max_concurrent)
        share = sorted((r["memory_gb"] for r in rows), reverse=True)[:per_gpu]
        out.append(f"memory: up to {per_gpu} trial(s) share one GPU (resources.gpu {gpu:g}, max_concurrent "
                   f"{sweep.max_concurrent or 'unset'}): the largest {len(share)} together need about {sum(share):.1f} GiB"
                   f" (an H100 has 80 GiB, an H200 141 GiB)")
    need = sweep.checkpoint_bytes_needed()
    where, free = sweep.free_disk()
    out.append(f"disk: new checkpoints need about {need / 2**30:.1f} GiB; {where} has {free / 2**30:.1f} GiB free"
               + (" -- `overtok sweep` will refuse this without --yes" if need > free else ""))
    return out


def describe_config(cfg: RunConfig) -> str:
    groups = accounting.param_groups(cfg.model)
    parts = [f"{k}={_fmt_count(v)}" for k, v in groups.items()]
    return (f"{cfg.name}: params {' '.join(parts)} | total {_fmt_count(sum(groups.values()))} | "
            f"FLOPs/token {_fmt_count(accounting.flops_per_token(cfg.model))} | "
            f"tokens {_fmt_count(cfg.train.max_steps * cfg.tokens_per_step)}")


def flat_params(trial: Trial) -> dict[str, Any]:
    return accounting.run_params(trial.config)


__all__ = ["Sweep", "Trial", "load_sweep", "plan_table", "trial_id", "flatten"]
