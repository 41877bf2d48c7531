"""Data for training: vocabulary resolution and one-time corpus preparation (here, torch-free, so the sweep driver
validates and prepares without importing torch) and batches (``overtok.data.batches``).
"""

from __future__ import annotations

import functools
import random

from overtok.config import ConfigError, RunConfig
from overtok.data.cfg import load_grammar, sample_sentence
from overtok.data.text import DataError, read_meta


def resolve_vocab(cfg: RunConfig, file: str | None = None) -> RunConfig:
    """Fill model.vocab_size from the data, or check that a given one matches it; re-validates the config."""
    from overtok.config import validate

    try:
        if cfg.data.kind == "cfg":
            V = load_grammar(cfg.data.grammar).vocab_size
        elif cfg.data.path:
            V = read_meta(cfg.data.path)["vocab_size"]
        else:
            V = corpus_vocab_size(cfg)
    except (FileNotFoundError, DataError) as e:
        key = getattr(e, "key", None) or (
            "data.grammar" if cfg.data.kind == "cfg" else ("data.path" if cfg.data.path else "data.corpus"))
        raise ConfigError(str(e), file=file, key=key) from None
    if cfg.model.vocab_size and cfg.model.vocab_size != V:
        raise ConfigError(f"{cfg.model.vocab_size} does not match the data's vocabulary ({V})", file=file, key="model.vocab_size")
    cfg.model.vocab_size = V
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(e.problem, file=file, key=e.key) from None


def generation_note(cfg: RunConfig) -> str | None:
    """A line for runs whose CFG generation accuracy can hardly score: fewer than half of the grammar's sentences
    (with the EOS before them, the prompt) fit the model's context, so most samples run past it (a sliding window,
    ``overtok.model.Transformer.generate``) where the model never saw a whole sentence. None otherwise."""
    if cfg.data.kind != "cfg" or not cfg.train.gen_samples:
        return None
    n, seq = cfg.model.tokenizer_ngram, cfg.model.seq_len
    lengths = _sentence_lengths(cfg.data.grammar)
    fit = sum(length + 1 <= seq * n for length in lengths) / len(lengths)
    if fit >= 0.5:
        return None
    context = f"model.seq_len {seq}" + (f" x {n}-gram tokens" if n > 1 else "")
    return (f"train.gen_samples: {fit:.0%} of {cfg.data.grammar}'s sentences fit the context ({context}; "
            f"{len(lengths)} sampled ones have {lengths[0]}-{lengths[-1]} tokens): most samples run past the "
            "context, and val/gen_acc is likely near 0")


@functools.cache
def _sentence_lengths(grammar: str, count: int = 256) -> tuple[int, ...]:
    """Sorted lengths of ``count`` sentences sampled from the grammar with a fixed seed."""
    g, rng = load_grammar(grammar), random.Random(0)
    return tuple(sorted(len(sample_sentence(g, rng)) for _ in range(count)))


def corpus_vocab_size(cfg: RunConfig) -> int:
    """Vocabulary of a not-yet-prepared corpus, from its tokenizer alone (no tokenization at plan time)."""
    from pathlib import Path

    d = cfg.data
    if not d.corpus:
        raise DataError("data.kind: text needs data.path (prepared) or data.corpus + data.tokenizer")
    from overtok.data.text import corpus_files

    corpus = Path(d.corpus)
    if not corpus.exists():
        raise DataError(f"{d.corpus}: no such file or directory")
    corpus_files([corpus], d.exclude)  # refuses a corpus with no input file left
    if corpus.is_file() and corpus.stat().st_size == 0:
        raise DataError(f"{d.corpus}: empty file")
    if d.tokenizer.startswith("bpe:"):
        from overtok.data.text import bpe_vocab_size

        return bpe_vocab_size(d.tokenizer)
    if not d.tokenizer or not Path(d.tokenizer).is_file():
        raise DataError(f"{d.tokenizer or '(empty)'}: tokenizer file not found", key="data.tokenizer")
    from overtok.data.text import load_tokenizer

    return load_tokenizer(d.tokenizer).get_vocab_size()


def ensure_prepared(cfg: RunConfig, cache_root: str = "results/data") -> RunConfig:
    """kind: text with a corpus: tokenize it once into ``cache_root/<hash>`` (reused) and point data.path there."""
    import fcntl
    import hashlib
    import json
    from pathlib import Path

    from overtok.data.text import FORMAT, prepare, source_table

    d = cfg.data
    if d.kind != "text" or d.path:
        return cfg
    # the split does not depend on the training seed: every seed of a sweep validates on the same documents
    key = json.dumps([str(Path(d.corpus).resolve()), str(Path(d.tokenizer).resolve()) if not d.tokenizer.startswith('bpe:') else d.tokenizer, d.max_docs, d.val_fraction, FORMAT] + ([d.exclude] if d.exclude else []))
    out = Path(cache_root).resolve() / hashlib.sha1(key.encode()).hexdigest()[:12]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent preparers wait for the first
        if not (out / "meta.json").exists():
            print(f"[overtok] tokenizing {d.corpus} with {d.tokenizer} into {out}", flush=True)
            prepare([Path(d.corpus)], out, d.tokenizer, d.val_fraction, 0, max_docs=d.max_docs, exclude=d.exclude)
        else:
            print(f"[overtok] {d.corpus} is tokenized in {out}", flush=True)
            for line in source_table(json.loads((out / "meta.json").read_text())):
                print(line, flush=True)
    d.path = str(out)
    return cfg
