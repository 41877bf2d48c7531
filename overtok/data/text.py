"""Real text: tokenize local files into memmapped shards with a held-out split by document.

``overtok data prepare`` reads .txt / .txt.xz / .py.txt.xz (one document per file, or split on a
separator line), .jsonl (a text field per line) or .parquet (a text column), or a HF ``datasets``
directory saved with ``save_to_disk`` (its Arrow files), and writes:

    OUT/train.bin, OUT/val.bin   flat token ids (uint16 when V <= 65535, else uint32), EOS between documents
    OUT/meta.json                vocab size, dtype, eos id, token counts, bytes per token, sources

The tokenizer is an HF ``tokenizer.json`` file or a byte-level BPE trained here on the same files.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DOC_SEPARATORS = [
    re.compile(r"^# ==== FILE: .* ====$", re.M),  # the code/ corpus: one source file per document
    re.compile(r"^=== .*$", re.M),  # sotu: one address per document
]


class DataError(ValueError):
    """A problem with the user's data files (missing, empty, not UTF-8, tokenizer mismatch)."""


def _read_text(path: Path) -> str:
    raw = lzma.open(path).read() if path.suffix == ".xz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _split_documents(text: str) -> list[str]:
    for sep in DOC_SEPARATORS:
        if sep.search(text):
            parts = [p.strip("\n") for p in sep.split(text)]
            return [p for p in parts if p.strip()]
    # plain prose: blank-line separated blocks grouped into ~8 KB documents
    docs, cur = [], []
    size = 0
    for block in text.split("\n\n"):
        cur.append(block)
        size += len(block)
        if size > 8192:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        docs.append("\n\n".join(cur))
    return docs


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(source name, document) for every document in the given files or directories."""
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
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no input files")
    for f in files:
        name = f.name
        if name.endswith((".jsonl", ".jsonl.xz")):
            lines = _read_text(f).splitlines()
            for ln, line in enumerate(lines, 1):
                if line.strip():
                    rec = json.loads(line)
                    if text_field not in rec:
                        raise DataError(f"{f}:{ln}: no field {text_field!r}")
                    yield name, rec[text_field]
        elif name.endswith((".parquet", ".arrow")):
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.read_table(f) if name.endswith(".parquet") else pa.ipc.open_stream(f).read_all()
            if text_field not in table.column_names:
                raise DataError(f"{f}: no column {text_field!r} (has {table.column_names})")
            for doc in table.column(text_field).to_pylist():
                yield name, doc
        else:
            for doc in _split_documents(_read_text(f)):
                yield name, doc


def load_tokenizer(spec: str, train_files: list[Path] | None = None, vocab_size: int = 0):
    """An HF tokenizer.json path, or 'bpe:<V>' to train a byte-level BPE on train_files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if spec.startswith("bpe:"):
        V = int(spec.split(":", 1)[1])
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|pad|>", "<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((d for _, d in iter_documents(train_files or [])), trainer=trainer)
        return tok
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: tokenizer file not found")
    return Tokenizer.from_file(str(path))


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


def prepare(inputs: list[Path], out_dir: Path, tokenizer: str, val_fraction: float = 0.01, seed: int = 0,
            text_field: str = "text", max_docs: int = 0) -> PrepareResult:
    """Tokenize ``inputs`` into ``out_dir``; documents are assigned to val by a hash of their text (stable)."""
    tok = load_tokenizer(tokenizer, inputs)
    V = tok.get_vocab_size()
    eos = _eos_id(tok)
    dtype = np.uint16 if V <= 65535 else np.uint32
    docs = list(iter_documents(inputs, text_field))
    if max_docs:
        docs = docs[:max_docs]
    docs = [(s, d) for s, d in docs if d and d.strip()]
    if not docs:
        raise DataError(f"{', '.join(map(str, inputs))}: no non-empty documents")
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    n_bytes = {"train": 0, "val": 0}
    threshold = int(val_fraction * 2**32)
    encoded = tok.encode_batch([d for _, d in docs], add_special_tokens=False)
    for (_source, doc), enc in zip(docs, encoded):
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc}".encode(), digest_size=4).digest(), "little")
        split = "val" if h < threshold else "train"
        splits[split].append(np.asarray(enc.ids + [eos], dtype=dtype))
        n_bytes[split] += len(doc.encode())
    if not splits["val"]:  # tiny inputs: hold out the last document
        splits["val"].append(splits["train"].pop())
    meta = {"vocab_size": V, "eos_id": eos, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer,
            "sources": sorted({s for s, _ in docs}), "format": 1}
    for split, arrays in splits.items():
        arr = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        arr.tofile(out_dir / f"{split}.bin")
        meta[f"{split}_tokens"] = int(arr.size)
        meta[f"{split}_documents"] = len(arrays)
        meta[f"{split}_bytes_per_token"] = n_bytes[split] / max(arr.size, 1)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return PrepareResult(out_dir, meta)


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
