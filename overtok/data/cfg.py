"""Synthetic context-free grammars of "Physics of Language Models, Part 1" (Allen-Zhu & Li), as used in the
Over-Tokenized paper's sec. 3.1 (cfg3f): seeded samplers and a fast membership checker.

The grammars are layered: level 0 is the root, every symbol at level l rewrites to 2-3 symbols of level
l+1, and the last level holds the terminals. So every derivation has the same depth and a CYK parse can
go level by level. Spans are kept as bitsets of end positions per (symbol, start) in Python ints, which
makes one cfg3f sentence (~250 tokens) a few milliseconds instead of the seconds of a naive DP.

Training streams draw sentences a block at a time with numpy (``sample_block``: every node of a level of every
sentence in the block expanded in one vectorised step), tens of millions of tokens per second; a tiny model on a
GPU consumes millions. ``sample_sentence`` (one sentence, pure Python, ``random.Random``) is the reference and
the sampler of streams made before the block sampler existed (``data.cfg_sampler: sentence``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRAMMAR_DIR = Path(__file__).with_name("grammars")


@dataclass(frozen=True)
class Grammar:
    name: str
    rules: list[list[list[tuple[int, ...]]]]
    """rules[level][symbol] = list of rules, each a tuple of symbol indices at level+1."""
    terminals: list[int]
    """token id of each symbol at the last level."""
    eos_id: int
    vocab_size: int
    """Token ids 0..vocab_size-1: terminals, EOS, mask and separator (0 unused, the OE pad)."""

    @property
    def depth(self) -> int:
        return len(self.rules)

    @property
    def max_len(self) -> int:
        """Length of the longest sentence the grammar derives (no longer sample can be accepted)."""
        longest = [1] * len(self.terminals)
        for level in reversed(self.rules):
            longest = [max(sum(longest[c] for c in rule) for rule in rules) for rules in level]
        return longest[0]


def load_grammar(name_or_path: str) -> Grammar:
    """A packaged grammar by name (cfg3b ... cfg3k) or a path to its JSON rule table."""
    path = Path(name_or_path)
    if not path.suffix:
        path = GRAMMAR_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRAMMAR_DIR.glob("*.json")))
        raise FileNotFoundError(f"grammar {name_or_path!r} not found (packaged: {known})")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        levels = spec["all"]
        rules = [[[tuple(int(i) for i in r) for r in sym["children"]] for sym in level] for level in levels[:-1]]
        terminals = [int(sym["id"]) for sym in levels[-1]]
        specials = [int(spec.get(k, 0)) for k in ("eos_token", "mask_token", "sep_token")]
        eos = int(spec["eos_token"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileNotFoundError(f"grammar {path}: not a JSON file ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FileNotFoundError(f"grammar {path}: not a Physics-of-LMs rule table ({type(e).__name__}: {e}; "
                                "expected 'all' levels of symbols with 'children' and 'id', and 'eos_token')") from None
    if not levels or not terminals or any(i < 0 or i >= len(nxt) for level, nxt in zip(rules, levels[1:])
                                          for sym in level for r in sym for i in r):
        raise FileNotFoundError(f"grammar {path}: rules point outside the next level, or no terminals")
    return Grammar(path.stem, rules, terminals, eos, max(terminals + specials) + 1)


def sample_sentence(g: Grammar, rng: random.Random) -> list[int]:
    """One sentence (terminal ids), rules chosen uniformly at every node."""
    syms = [0]
    for level in g.rules:
        nxt: list[int] = []
        for s in syms:
            nxt.extend(rng.choice(level[s]))
        syms = nxt
    return [g.terminals[s] for s in syms]


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def accepts(g: Grammar, sentence: list[int]) -> bool:
    """True iff the root derives exactly ``sentence`` (layered CYK over end-position bitsets)."""
    n = len(sentence)
    if n == 0:
        return False
    term_index = {t: i for i, t in enumerate(g.terminals)}
    # ends[s][i]: bitset of j such that symbol s (at the current level) derives sentence[i:j]
    ends = [[0] * n for _ in g.terminals]
    for i, tok in enumerate(sentence):
        s = term_index.get(tok)
        if s is None:
            return False
        ends[s][i] = 1 << (i + 1)
    for level in reversed(g.rules):
        new = [[0] * n for _ in level]
        for s, rules in enumerate(level):
            row = new[s]
            for rule in rules:
                first = ends[rule[0]]
                for i in range(n):
                    cur = first[i]
                    if not cur:
                        continue
                    for c in rule[1:]:
                        child = ends[c]
                        nxt = 0
                        for j in _bits(cur):
                            if j < n:
                                nxt |= child[j]
                        cur = nxt
                        if not cur:
                            break
                    row[i] |= cur
        ends = new
    return bool(ends[0][0] >> n & 1)


class RuleTables:
    """A grammar's rules as flat arrays, per level: symbol s has ``counts[s]`` rules, numbered from ``first[s]``;
    rule g has ``lengths[g]`` children, ``children[g]`` (padded with -1)."""

    def __init__(self, g: Grammar):
        self.levels = []
        for level in g.rules:
            rules = [rule for sym_rules in level for rule in sym_rules]
            widest = max(len(rule) for rule in rules)
            children = np.full((len(rules), widest), -1, dtype=np.intp)
            for i, rule in enumerate(rules):
                children[i, : len(rule)] = rule
            counts = np.array([len(sym_rules) for sym_rules in level], dtype=np.intp)
            first = np.concatenate(([0], np.cumsum(counts)[:-1]))
            lengths = np.array([len(rule) for rule in rules], dtype=np.intp)
            self.levels.append((counts, first, children, lengths))
        self.terminals = np.array(g.terminals, dtype=np.int64)
        self.eos_id = g.eos_id


def sample_block(t: RuleTables, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` sentences, each followed by EOS, concatenated (int64): the same distribution as
    ``sample_sentence`` (a rule chosen uniformly at every node), one level of all sentences at a time."""
    syms = np.zeros(count, dtype=np.intp)  # the current level's symbols of all sentences, in order
    starts = np.arange(count)  # where each sentence's symbols begin in syms
    for counts, first, children, lengths in t.levels:
        # uniform among the symbol's rules (floor(u * c) < c for every float64 u < 1 and small c)
        rule = np.take(first, syms) + (rng.random(len(syms)) * np.take(counts, syms)).astype(np.intp)
        sizes = np.take(lengths, rule)
        before = np.cumsum(sizes) - sizes  # children of the nodes before each node
        starts = np.take(before, starts)
        kids = np.take(children, rule, axis=0)
        syms = kids[kids >= 0]  # row-major: each node's children in order, nodes in order
    ends = np.append(starts[1:], len(syms))
    eos_at = ends + np.arange(count)  # each sentence's EOS, after the EOSes of the sentences before it
    out = np.full(len(syms) + count, t.eos_id, dtype=np.int64)
    keep = np.ones(len(out), dtype=bool)
    keep[eos_at] = False
    out[keep] = np.take(t.terminals, syms)
    return out


CFG_SAMPLERS = ("block", "sentence")
BLOCK_SENTENCES = 64
"""Sentences per block of the block sampler: fixed, so that a stream depends only on its seed, not on how much
each ``take`` asks for."""


class CFGStream:
    """Endless seeded stream of sentences, each followed by EOS, cut into fixed-length rows.

    sampler 'block' (the default): blocks of ``BLOCK_SENTENCES`` from ``sample_block`` with numpy's PCG64;
    'sentence': one ``sample_sentence`` at a time with ``random.Random``, the stream of overtok before the block
    sampler (about 10x slower, `benchmarks/bench_data.py`; reproduces runs made then). The two give different
    sentences for the same seed, drawn from the same distribution. A state saved by either restores that
    sampler's stream exactly.
    """

    def __init__(self, grammar: Grammar, seed: int, sampler: str = "block"):
        if sampler not in CFG_SAMPLERS:
            raise ValueError(f"unknown CFG sampler {sampler!r} (known: {', '.join(CFG_SAMPLERS)})")
        self.g = grammar
        self.tables = RuleTables(grammar)
        self.sampler = sampler
        self.rng = np.random.default_rng(seed) if sampler == "block" else random.Random(seed)
        self.buffer = np.empty(0, dtype=np.int64)  # drawn, not yet taken

    def _draw(self) -> np.ndarray:
        if self.sampler == "block":
            return sample_block(self.tables, self.rng, BLOCK_SENTENCES)
        return np.array(sample_sentence(self.g, self.rng) + [self.g.eos_id], dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` tokens (int64)."""
        parts, have = [self.buffer], len(self.buffer)
        while have < n:
            parts.append(self._draw())
            have += len(parts[-1])
        stream = np.concatenate(parts) if len(parts) > 1 else self.buffer
        self.buffer = stream[n:]
        return stream[:n]

    def state_dict(self) -> dict:
        if self.sampler == "sentence":  # the format of every checkpoint made before the block sampler
            return {"rng": self.rng.getstate(), "buffer": self.buffer.tolist()}
        import torch  # here, not at the top: the sweep driver loads grammars without importing torch

        return {"sampler": "block", "rng": self.rng.bit_generator.state, "buffer": torch.from_numpy(self.buffer.copy())}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved stream, whichever sampler saved it (a state without 'sampler' is the sentence sampler's,
        as every checkpoint made before the block sampler)."""
        self.sampler = state.get("sampler", "sentence")
        if self.sampler == "sentence":
            version, internal, gauss = state["rng"]
            self.rng = random.Random()
            self.rng.setstate((version, tuple(internal), gauss))
            self.buffer = np.array(state["buffer"], dtype=np.int64)
        else:
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = state["rng"]
            self.buffer = state["buffer"].numpy().astype(np.int64)
