"""Batches for training and evaluation, with state for exact resume.

Every source yields rows of *base* tokens; the n-gram tokenizer variant groups them into V^n ids here,
so the model only ever sees its own vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from overtok.config import RunConfig
from overtok.data.cfg import CFGStream, load_grammar
from overtok.data.text import DataError, open_tokens, read_meta

VAL_SEED_OFFSET = 1_000_003


def group_ngrams(tokens: torch.Tensor, vocab_size: int, n: int) -> torch.Tensor:
    """(B, n*T) base tokens -> (B, T) n-gram ids ``sum_i x_{n t + i} V^i``."""
    if n == 1:
        return tokens
    B, L = tokens.shape
    digits = tokens.view(B, L // n, n)
    weights = torch.tensor([vocab_size**i for i in range(n)], dtype=torch.long)
    return (digits * weights).sum(-1)


def split_ngrams(ids: torch.Tensor, vocab_size: int, n: int) -> torch.Tensor:
    """Inverse of group_ngrams."""
    if n == 1:
        return ids
    digits = [(ids // vocab_size**i) % vocab_size for i in range(n)]
    return torch.stack(digits, dim=-1).flatten(-2)


class Batches:
    """Rows of (T + L) model tokens, L = lookahead. ``next()`` returns a LongTensor (B, T + L).

    Text training rows follow ``data.text_sampler``: 'epoch' cuts the split into disjoint windows at an offset drawn
    per epoch and reads them in a shuffled order, rank r of W taking every W-th window of the common order (the
    ranks read disjoint text); 'random' draws each row at a uniformly random start, each rank from its own seed."""

    def __init__(self, cfg: RunConfig, split: str, rank: int = 0, world: int = 1):
        self.cfg = cfg
        self.split = split
        m = cfg.model
        self.n = m.tokenizer_ngram
        self.row_len = (m.seq_len + m.lookahead) * self.n  # base tokens per row
        # validation is the same everywhere; with the random sampler each data-parallel rank draws its own training
        # stream, with the epoch sampler the ranks share one order and split it
        self.epochwise = split == "train" and cfg.data.kind == "text" and cfg.data.text_sampler == "epoch"
        self.rank, self.world = rank, world
        seed = cfg.seed + (VAL_SEED_OFFSET if split == "val" else 0 if self.epochwise else 7919 * rank)
        if cfg.data.kind == "cfg":
            self.grammar = load_grammar(cfg.data.grammar)
            self.vocab_size = self.grammar.vocab_size
            self.eos_id = self.grammar.eos_id
            self.stream = CFGStream(self.grammar, seed, cfg.data.cfg_sampler)
        else:
            meta = read_meta(cfg.data.path)
            self.vocab_size, self.eos_id = meta["vocab_size"], meta["eos_id"]
            self.tokens = open_tokens(cfg.data.path, split, meta)
            if len(self.tokens) <= self.row_len:
                raise DataError(f"{cfg.data.path}/{split}.bin: {len(self.tokens)} tokens, fewer than one row ({self.row_len})")
            self.gen = torch.Generator().manual_seed(seed)
            self.cursor = 0  # val: windows taken so far since the last rewind
            # val: an evaluation's windows are spread evenly over the whole split (which is stored source by source),
            # so that every source is read, not just the first few
            windows = cfg.train.eval_batches * cfg.data.batch_size
            self.stride = max(self.row_len, (len(self.tokens) - self.row_len) // max(windows, 1))
            if self.epochwise:
                self._start_epoch()

    def _start_epoch(self) -> None:
        """Draw this epoch's window offset and order (from ``gen``, whose state before the draw is kept so that a
        resumed stream draws the same epoch again)."""
        self.epoch_state = self.gen.get_state()
        offset = int(torch.randint(0, self.row_len, (), generator=self.gen))
        if len(self.tokens) - offset < self.row_len:
            offset = 0
        count = (len(self.tokens) - offset) // self.row_len
        self.order = offset + torch.randperm(count, generator=self.gen) * self.row_len
        self.pos = self.rank  # index into ``order`` of this rank's next window

    def _epoch_starts(self, B: int) -> list[int]:
        starts = []
        for _ in range(B):
            if self.pos >= len(self.order):
                self._start_epoch()
            starts.append(int(self.order[self.pos]))
            self.pos += self.world
        return starts

    def next(self, batch_size: int | None = None) -> torch.Tensor:
        B = batch_size or self.cfg.data.batch_size
        if self.cfg.data.kind == "cfg":
            rows = torch.from_numpy(self.stream.take(B * self.row_len)).view(B, self.row_len)
        elif self.epochwise:
            starts = self._epoch_starts(B)
            rows = torch.from_numpy(np.stack([self.tokens[s : s + self.row_len].astype(np.int64) for s in starts]))
        elif self.split == "train":
            starts = torch.randint(0, len(self.tokens) - self.row_len, (B,), generator=self.gen).tolist()
            rows = torch.from_numpy(np.stack([self.tokens[s : s + self.row_len].astype(np.int64) for s in starts]))
        else:
            span = len(self.tokens) - self.row_len
            starts = [((self.cursor + i) * self.stride) % span for i in range(B)]
            self.cursor += B
            rows = torch.from_numpy(np.stack([self.tokens[s : s + self.row_len].astype(np.int64) for s in starts]))
        return group_ngrams(rows, self.vocab_size, self.n)

    def rewind(self) -> None:
        """Validation restarts at the same windows each evaluation (comparable numbers across steps)."""
        if self.cfg.data.kind == "cfg":
            self.stream = CFGStream(self.grammar, self.cfg.seed + VAL_SEED_OFFSET, self.cfg.data.cfg_sampler)
        else:
            self.cursor = 0

    def state_dict(self) -> dict:
        if self.cfg.data.kind == "cfg":
            return {"cfg": self.stream.state_dict()}
        if self.epochwise:
            return {"gen": self.epoch_state, "cursor": self.cursor, "pos": self.pos}
        return {"gen": self.gen.get_state(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.data.kind == "cfg":
            self.stream.load_state_dict(state["cfg"])
        else:
            self.gen.set_state(state["gen"])
            self.cursor = state["cursor"]
            if self.epochwise:
                self._start_epoch()  # redraws the saved epoch's offset and order
                self.pos = state["pos"]

    @property
    def epoch_tokens(self) -> int | None:
        return None if self.cfg.data.kind == "cfg" else len(self.tokens)


