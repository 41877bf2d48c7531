"""Checkpoint files: written atomically (tmp + rename; a truncated newest file falls back to the previous one), never
through a symbolic link, the two newest kept; a rank's own part of a checkpoint with row-sharded tables."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from overtok.config import ConfigError, RunConfig, stored_config
from overtok.errors import CheckpointError
from overtok.identity import trial_id


def _write_atomically(path: Path, state: dict) -> None:
    """torch.save to a temporary file of this writer's own (process and thread in its name), fsync, rename: a crash
    leaves the previous file intact, and two writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _refuse_links(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from None


def _refuse_links(directory: Path) -> None:
    """A checkpoint directory that is, or lies under (below the working directory), a symbolic link would let writes
    and the cleanup of old checkpoints reach files outside it: refused."""
    here = Path.cwd()
    full = Path(os.path.abspath(directory))
    # the directory itself, and every folder of its path below the working directory (results/, results/checkpoints/)
    for p in [full, *(q for q in full.parents if here in q.parents)]:
        if p.is_symlink():
            raise CheckpointError(f"checkpoint directory {directory}: {p} is a symbolic link; refusing to write "
                                  "or delete checkpoints through it")


def save_checkpoint(ckpt_dir: Path, state: dict, keep: int = 2) -> Path:
    path = ckpt_dir / f"ckpt_{state['step']:09d}.pt"
    _write_atomically(path, state)
    _remove_old(ckpt_dir, "ckpt_*.pt", keep)
    return path


def _remove_old(ckpt_dir: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` newest files matching ``pattern``; never through a link, and a file another
    writer removed first is no error."""
    for old in sorted(ckpt_dir.glob(pattern))[:-keep]:
        if not old.is_symlink():
            old.unlink(missing_ok=True)


def load_latest_checkpoint(ckpt_dir: Path) -> dict | None:
    for path in sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt file: use the previous one
            print(f"[overtok] skipping unreadable checkpoint {path.name}: {type(e).__name__}")
    return None


def save_shard_state(ckpt_dir: Path, step: int, rank: int, state: dict, keep: int = 2) -> None:
    """A rank's own part of a checkpoint with row-sharded tables (its rows and optimizer state)."""
    _write_atomically(ckpt_dir / f"shard_{step:09d}_rank{rank}.pt", state)
    _remove_old(ckpt_dir, f"shard_*_rank{rank}.pt", keep)


def load_shard_state(ckpt_dir: Path, step: int, rank: int) -> dict:
    path = ckpt_dir / f"shard_{step:09d}_rank{rank}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: this rank's part of the step-{step} checkpoint is unreadable "
                              f"({type(e).__name__})") from None


def default_checkpoint_dir(cfg: RunConfig) -> Path:
    """train.checkpoint_dir, else results/checkpoints/<trial id>: a run resumes only from a checkpoint of its own
    configuration (overtok.identity.trial_id)."""
    return Path(cfg.train.checkpoint_dir or Path("results") / "checkpoints" / trial_id(cfg))


def check_checkpoint_config(state: dict, cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse to resume from a checkpoint of another configuration (another trial id)."""
    saved = state.get("config")
    if saved is None:
        return
    try:
        theirs = trial_id(stored_config(saved))  # runtime fields (fail_at_step too) are not in it
    except (ConfigError, TypeError):
        theirs = "an unreadable configuration"
    ours = trial_id(cfg)
    if theirs != ours:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint there is of trial {theirs}, this run is trial {ours} (another "
                              "configuration); point train.checkpoint_dir elsewhere or remove the old checkpoints")
