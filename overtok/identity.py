"""Trial identity: the hash that names a trial's experiment, and the key that says which trials can share a pack.

A trial id hashes what determines a run's result: the experiment sections of the resolved config (seed, model,
data, train), not naming, tracking, the checkpoint folder or the ``runtime`` section. Equal ids mean "the same
experiment", which is how a sweep finds finished trials, a checkpoint refuses another config and exports from
several runs are merged.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from overtok.config import RunConfig, to_dict
from overtok.data.text import FORMAT as TEXT_FORMAT

PACK_FREE_KEYS = ("seed", "train.lr")  # what may differ inside one pack (overtok/packed.py)


def pack_key(cfg: RunConfig) -> str | None:
    """Trials with equal keys can share a pack; None if this config cannot be packed (row-sparse OE tables)."""
    if cfg.model.oe.sparse_update and cfg.model.oe.n > 1:
        return None
    return config_hash(cfg, ("tracking", "name", "seed", "train.checkpoint_dir", "train.lr") + unused_fields(cfg))


def unused_fields(cfg: RunConfig) -> tuple[str, ...]:
    """Fields this config never reads: text has no grammar to sample (data.cfg_sampler), a grammar no training split
    (data.text_sampler); dense OE tables have no row-sparse mode (model.oe.sparse_mode)."""
    unused = ("data.cfg_sampler",) if cfg.data.kind != "cfg" else ("data.text_sampler",)
    if not (cfg.model.oe.sparse_update and cfg.model.oe.n > 1):
        unused += ("model.oe.sparse_mode",)
    return unused


# Fields added after trial ids were first handed out, with the value that reproduces what ran before them: at that
# value they are left out of the id, so the trials of existing sweeps keep their ids (and stay finished). Changing
# such a default would silently reuse old results: give the field a new name instead.
# data.cfg_sampler's and data.text_sampler's defaults are not the values that ran before ('block' and 'epoch' are new
# streams): trials at the default get ids of their own, those set to 'sentence' / 'random' the ids of the old stream.
ADDED_FIELDS = {"train.residual_dtype": "float32", "train.grad_reduce_dtype": "float32", "data.cfg_sampler": "sentence",
                "model.pos_encoding": "rope", "model.pos_init_std": 0.02, "model.mlp": "swiglu",
                "model.embed_init_std": 0.02, "model.oe.table_init_std": 0.02, "model.oe.combine": "mean",
                "model.oe.allow_degenerate": False, "train.table_weight_decay": None,
                "data.text_sampler": "random", "data.exclude": ""}


def trial_id(cfg: RunConfig) -> str:
    """Hash of what determines the result: the experiment sections (seed, model, data, train), without where the
    checkpoints go and the fields its data never reads (``unused_fields``). Naming, tracking and the whole
    ``runtime`` section (compilation, kernels, CUDA graphs, placement: the same results up to float summation order)
    are not part of it."""
    drop = ("tracking", "name", "runtime", "train.checkpoint_dir")
    drop += unused_fields(cfg)
    # a corpus is prepared by this version's rules (documents, per-source held-out split): text trials of a corpus
    # prepared by earlier rules are other experiments
    extra = {"data.prepare_format": TEXT_FORMAT} if cfg.data.kind == "text" and cfg.data.corpus else None
    return config_hash(cfg, drop, ADDED_FIELDS, extra)


def _get(d: dict, key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def config_hash(cfg: RunConfig, drop: tuple[str, ...], drop_at: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> str:
    """Short hash of the resolved config without the dotted keys in ``drop``, nor those of ``drop_at`` that hold
    the value given there, with the dotted keys of ``extra`` added."""
    d = to_dict(cfg)
    for key, value in (extra or {}).items():
        parent, _, leaf = key.rpartition(".")
        _get(d, parent)[leaf] = value
    drop += tuple(k for k, v in (drop_at or {}).items() if _get(d, k) == v)
    for key in dict.fromkeys(drop):
        parent, _, leaf = key.rpartition(".")
        (_get(d, parent) if parent else d).pop(leaf)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@functools.cache
def code_version() -> str:
    """Short hash of the package's Python sources (paths and contents): which code trained a run, recorded as the tag
    ``overtok.code`` even where no git history travels with the code (a copied working tree on a GPU machine)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]
