"""Synthetic context-free grammars of "Physics of Language Models, Part 1" (Allen-Zhu & Li), as used in the
Over-Tokenized paper's sec. 3.1 (cfg3f): a seeded sampler and a fast membership checker.

The grammars are layered: level 0 is the root, every symbol at level l rewrites to 2-3 symbols of level
l+1, and the last level holds the terminals. So every derivation has the same depth and a CYK parse can
go level by level. Spans are kept as bitsets of end positions per (symbol, start) in Python ints, which
makes one cfg3f sentence (~250 tokens) a few milliseconds instead of the seconds of a naive DP.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

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
    spec = json.loads(path.read_text())
    levels = spec["all"]
    rules = [[[tuple(r) for r in sym["children"]] for sym in level] for level in levels[:-1]]
    terminals = [sym["id"] for sym in levels[-1]]
    specials = [spec.get(k, 0) for k in ("eos_token", "mask_token", "sep_token")]
    return Grammar(path.stem, rules, terminals, spec["eos_token"], max(terminals + specials) + 1)


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


class CFGStream:
    """Endless seeded stream of sentences, each followed by EOS, cut into fixed-length rows."""

    def __init__(self, grammar: Grammar, seed: int):
        self.g = grammar
        self.rng = random.Random(seed)
        self.buffer: list[int] = []

    def take(self, n: int) -> list[int]:
        while len(self.buffer) < n:
            self.buffer.extend(sample_sentence(self.g, self.rng))
            self.buffer.append(self.g.eos_id)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = list(state["buffer"])
