"""Real text: tokenize local files into memmapped shards with a held-out split per source.

``overtok data prepare`` reads .txt / .txt.xz / .py.txt.xz (split on a document header line where the file has
one, cut into pieces of at most MAX_DOC_CHARS), .jsonl (a text field per line) or .parquet (a text column), or a
HF ``datasets`` directory saved with ``save_to_disk`` (its Arrow files). Every input file is a source, and every
source contributes its share of held-out text. It writes:

    OUT/train.bin, OUT/val.bin   flat token ids (uint16 when V <= 65535, else uint32), EOS between documents
    OUT/meta.json                vocab size, dtype, eos id, token counts, bytes per token, per-source counts
    OUT/tokenizer.json           the tokenizer (given, or a byte-level BPE trained on the training documents)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import lzma
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Document structure of a file, tried in order; the first pattern found in a file splits it. Patterns match whole
# lines that only these corpora use as document headers (reST over- and underlines are lines of '=' alone).
DOC_SEPARATORS = [
    re.compile(r"^# ==== FILE: .* ====$", re.M),  # the code/ corpus: one source file per document
    re.compile(r"^=== \d{4}_\S+$", re.M),  # sotu: one address per document, "=== 1790_george_washington_n"
]
FORMAT = 2
"""meta.json's format: 2 adds per-source counts, the held-out split per source and tokenizer.json."""
MAX_DOC_CHARS = 16384
"""Documents longer than this are cut (at blank lines, else at line ends) into pieces of at most this size; prose
without document structure is grouped from its paragraphs, or lines where it has no blank lines, into pieces of
this size. The held-out split then samples every source in small units."""


class DataError(ValueError):
    """A problem with the user's data files (missing, empty, not UTF-8, tokenizer mismatch); ``key``: the config
    key that names the file, where it is not the data source itself (e.g. data.tokenizer)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _read_text(path: Path) -> str:
    try:
        raw = lzma.open(path).read() if path.suffix == ".xz" else path.read_bytes()
    except (lzma.LZMAError, EOFError) as e:
        raise DataError(f"{path}: not a valid .xz file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes (at offset {text.index(chr(0))}): not text")
    return text


def _text_value(value, where: str) -> str:
    """A document's text: a string without NUL characters."""
    if not isinstance(value, str):
        raise DataError(f"{where}: the text field holds {type(value).__name__}, not a string")
    if "\x00" in value:
        raise DataError(f"{where}: the text contains NUL characters")
    return value


def _split_documents(text: str) -> list[str]:
    """The documents of one file: by its separator lines where it has them, else the whole text; each one cut into
    pieces of at most MAX_DOC_CHARS (:func:`_cut`)."""
    docs = [text]
    for sep in DOC_SEPARATORS:
        if sep.search(text):
            docs = sep.split(text)
            break
    return [piece for doc in docs if doc.strip() for piece in _cut(doc.strip("\n"))]


def _cut(doc: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """``doc`` as consecutive pieces of at most ``limit`` characters, made of whole paragraphs (blank-line
    separated), or whole lines where a paragraph is longer, or hard cuts where a line is."""
    if len(doc) <= limit:
        return [doc]
    units = []
    for para in doc.split("\n\n"):
        if len(para) <= limit:
            units.append((para, "\n\n"))
            continue
        for line in para.split("\n"):
            units.extend((line[i : i + limit], "\n") for i in range(0, max(len(line), 1), limit))
        units[-1] = (units[-1][0], "\n\n")
    pieces, cur, size = [], [], 0
    for unit, joiner in units:
        if cur and size + len(unit) > limit:
            pieces.append("".join(cur).rstrip("\n"))
            cur, size = [], 0
        cur.append(unit + joiner)
        size += len(unit) + len(joiner)
    if cur:
        pieces.append("".join(cur).rstrip("\n"))
    return [p for p in pieces if p.strip()]


def corpus_files(paths: list[Path], exclude: str = "") -> list[Path]:
    """The input files of the given files or directories, without those whose name matches a pattern of ``exclude``
    (comma-separated fnmatch patterns)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            if (p / "dataset_info.json").exists() or list(p.glob("*.arrow")):
                files.extend(sorted(p.glob("*.arrow")))
            else:
                files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(("README", "MANIFEST", "."))))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    patterns = [x.strip() for x in exclude.split(",") if x.strip()]
    files = [f for f in files if not any(fnmatch.fnmatch(f.name, x) for x in patterns)]
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no input files" + (f" left after excluding {exclude}" if patterns else ""))
    return files


def iter_documents(paths: list[Path], text_field: str = "text", exclude: str = "") -> Iterator[tuple[str, str]]:
    """(source name, document) for every document in the given files or directories (see :func:`corpus_files`)."""
    for f in corpus_files(paths, exclude):
        name = f.name
        if name.endswith((".jsonl", ".jsonl.xz")):
            lines = _read_text(f).splitlines()
            for ln, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{ln}: not a JSON line ({e.msg} at column {e.colno})") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{f}:{ln}: a JSON {type(rec).__name__}, not an object with a "
                                        f"{text_field!r} field")
                    if text_field not in rec:
                        raise DataError(f"{f}:{ln}: no field {text_field!r}")
                    yield name, _text_value(rec[text_field], f"{f}:{ln}")
        elif name.endswith((".parquet", ".arrow")):
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(f) if name.endswith(".parquet") else pa.ipc.open_stream(f).read_all()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f}: not a readable {'Parquet' if name.endswith('.parquet') else 'Arrow'} file "
                                f"({str(e).splitlines()[0][:200]})") from None
            if text_field not in table.column_names:
                raise DataError(f"{f}: no column {text_field!r} (has {table.column_names})")
            column = table.column(text_field)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise DataError(f"{f}: column {text_field!r} holds {column.type}, not strings")
            for i, doc in enumerate(column.to_pylist()):
                if doc is not None:
                    yield name, _text_value(doc, f"{f}: row {i}")
        else:
            for doc in _split_documents(_read_text(f)):
                yield name, doc


def load_tokenizer(spec: str, train_docs: list[str] | None = None):
    """An HF tokenizer.json path, or 'bpe:<V>' to train a byte-level BPE on ``train_docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if spec.startswith("bpe:"):
        V = bpe_vocab_size(spec)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|pad|>", "<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(train_docs or [], trainer=trainer)
        return tok
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: tokenizer file not found", key="data.tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
        raise DataError(f"{spec}: not a tokenizer.json file ({str(e).splitlines()[0][:200]})") from None


def bpe_vocab_size(spec: str) -> int:
    """V of a 'bpe:<V>' tokenizer spec (at least 258: the 256 bytes and two special tokens)."""
    text = spec.split(":", 1)[1]
    if not text.isdigit() or not 258 <= int(text) <= 1 << 20:
        raise DataError(f"{spec}: expected bpe:<V> with an integer V from 258 to {1 << 20}")
    return int(text)


def _eos_id(tok) -> int:
    for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return tok.get_vocab_size() - 1


@dataclass
class PrepareResult:
    out_dir: Path
    meta: dict


def sample_documents(docs: list[tuple[str, str]], max_docs: int, seed: int) -> list[tuple[str, str]]:
    """``max_docs`` documents drawn uniformly without replacement across every source (seeded), in file order;
    all of them when ``max_docs`` is 0 or at least their number."""
    if not max_docs or max_docs >= len(docs):
        return docs
    return [docs[i] for i in sorted(random.Random(seed).sample(range(len(docs)), max_docs))]


def split_documents(docs: list[tuple[str, str]], val_fraction: float, seed: int) -> list[bool]:
    """Which documents are held out (True): per source, documents in the order of a seeded hash of their text are
    taken until the source's held-out characters reach ``val_fraction`` of its characters (the document that crosses
    the target is taken when that lands nearer to it); at least one document of every source with two or more,
    never all of a source's documents. Where this holds out nothing (every source a single document), the last
    document is held out."""
    by_source: dict[str, list[int]] = {}
    for i, (source, _) in enumerate(docs):
        by_source.setdefault(source, []).append(i)
    held = [False] * len(docs)

    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{docs[i][1]}".encode(), digest_size=8).digest()

    for idx in by_source.values():
        if len(idx) < 2:
            continue
        target = val_fraction * sum(len(docs[i][1]) for i in idx)
        taken = 0
        for n, i in enumerate(sorted(idx, key=rank)):
            size = len(docs[i][1])
            if n == len(idx) - 1 or (n > 0 and taken + size / 2 > target):
                break
            held[i] = True
            taken += size
    if not any(held):
        held[-1] = True
    return held


ENCODE_BATCH_CHARS = 16_000_000
"""Characters of text per encode_batch call: the tokenizer keeps every Encoding of a call (ids, offsets, token
strings) until it returns, so a whole corpus at once needs memory in proportion to the corpus (docs/performance.md);
batches of this size keep the peak near one batch's while the tokenizer still uses every core."""


def _encoded(tok, texts: list[str], eos: int, dtype) -> Iterator[np.ndarray]:
    """Each text's token ids followed by ``eos``, in order, encoded a batch of texts at a time."""
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= ENCODE_BATCH_CHARS):
            chars += len(texts[end])
            end += 1
        for enc in tok.encode_batch(texts[start:end], add_special_tokens=False):
            yield np.asarray(enc.ids + [eos], dtype=dtype)
        start = end


def prepare(inputs: list[Path], out_dir: Path, tokenizer: str, val_fraction: float = 0.01, seed: int = 0,
            text_field: str = "text", max_docs: int = 0, exclude: str = "", log=print) -> PrepareResult:
    """Tokenize ``inputs`` into ``out_dir``: documents (``max_docs`` sampled across sources, :func:`sample_documents`),
    a held-out split per source (:func:`split_documents`), a BPE trained on the training documents alone for
    'bpe:<V>' (saved as ``out_dir/tokenizer.json``, as is a given tokenizer), and documents and tokens per source
    for each split in meta.json and in the lines given to ``log``."""
    given = None if tokenizer.startswith("bpe:") else load_tokenizer(tokenizer)  # checked before any reading
    if given is None:
        bpe_vocab_size(tokenizer)
    if len(docs := [(s, d) for s, d in iter_documents(inputs, text_field, exclude) if d and d.strip()]) == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no non-empty documents")
    docs = sample_documents(docs, max_docs, seed)
    if len(docs) < 2:
        raise DataError(f"{', '.join(map(str, inputs))}: one document; training and validation need two or more")
    held = split_documents(docs, val_fraction, seed)
    tok = given or load_tokenizer(tokenizer, [d for (_, d), h in zip(docs, held) if not h])
    V = tok.get_vocab_size()
    eos = _eos_id(tok)
    dtype = np.uint16 if V <= 65535 else np.uint32
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    n_bytes = {"train": 0, "val": 0}
    per_source: dict[str, dict[str, int]] = {}
    for (source, doc), ids, h in zip(docs, _encoded(tok, [d for _, d in docs], eos, dtype), held):
        split = "val" if h else "train"
        splits[split].append(ids)
        n_bytes[split] += len(doc.encode())
        row = per_source.setdefault(source, {"train_documents": 0, "train_tokens": 0, "val_documents": 0,
                                             "val_tokens": 0})
        row[f"{split}_documents"] += 1
        row[f"{split}_tokens"] += int(ids.size)
    meta = {"vocab_size": V, "eos_id": eos, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer,
            "tokenizer_file": "tokenizer.json", "sources": dict(sorted(per_source.items())), "format": FORMAT,
            "max_docs": max_docs, "exclude": exclude, "val_fraction": val_fraction, "seed": seed}
    for split, arrays in splits.items():
        arr = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        arr.tofile(out_dir / f"{split}.bin")
        meta[f"{split}_tokens"] = int(arr.size)
        meta[f"{split}_documents"] = len(arrays)
        meta[f"{split}_bytes_per_token"] = n_bytes[split] / max(arr.size, 1)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    for line in source_table(meta):
        log(line)
    return PrepareResult(out_dir, meta)


def source_table(meta: dict) -> list[str]:
    """Lines of documents and tokens per source and split (meta.json of format 2), for logs."""
    rows = meta.get("sources")
    if not isinstance(rows, dict):
        return []
    width = max(len(s) for s in rows)
    lines = [f"[overtok] {'source':<{width}}  {'train docs':>10} {'train tokens':>13}  {'val docs':>8} {'val tokens':>11} "
             f"{'val share':>9}"]
    for source, r in rows.items():
        share = r["val_tokens"] / max(r["train_tokens"] + r["val_tokens"], 1)
        lines.append(f"[overtok] {source:<{width}}  {r['train_documents']:>10,} {r['train_tokens']:>13,}  "
                     f"{r['val_documents']:>8,} {r['val_tokens']:>11,} {share:>9.1%}")
    return lines


def read_meta(path: str | Path) -> dict:
    p = Path(path) / "meta.json"
    if not p.is_file():
        raise DataError(f"{path}: no meta.json (run `overtok data prepare` first)")
    meta = json.loads(p.read_text())
    for split in ("train", "val"):
        f = Path(path) / f"{split}.bin"
        if not f.is_file():
            raise DataError(f"{f}: missing")
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty")
    return meta


def open_tokens(path: str | Path, split: str, meta: dict) -> np.memmap:
    return np.memmap(Path(path) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
