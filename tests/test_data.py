import functools
import json
import random

import numpy as np
import pytest
import torch

from overtok.data.batches import Batches, group_ngrams, split_ngrams
from overtok.data.cfg import (
    BLOCK_SENTENCES,
    CFGStream,
    Grammar,
    RuleTables,
    accepts,
    load_grammar,
    sample_block,
    sample_sentence,
)
from overtok.data.text import DataError, prepare, read_meta
from tests.conftest import SHARED, tiny_config


def test_cfg3f_samples_accepted_and_corruptions_mostly_rejected():
    g = load_grammar("cfg3f")
    rng = random.Random(0)
    sentences = [sample_sentence(g, rng) for _ in range(100)]
    assert all(set(s) <= {1, 2, 3} for s in sentences)
    assert all(accepts(g, s) for s in sentences)
    rejected = 0
    for s in sentences:
        s = list(s)
        i = rng.randrange(len(s))
        s[i] = rng.choice([t for t in (1, 2, 3) if t != s[i]])
        rejected += not accepts(g, s)
    assert rejected >= 80
    assert not accepts(g, sentences[0][:-1]) or not accepts(g, sentences[0][1:])
    assert not accepts(g, [])


def test_cfg_longest_sentence_is_derivable_and_bounds_samples():
    """Grammar.max_len is the length of a sentence the grammar accepts (each symbol expanded by its longest rule,
    found top-down here) and no sample is longer."""
    g = load_grammar("cfg3f")

    @functools.cache
    def longest(depth: int, sym: int) -> int:
        if depth == g.depth:
            return 1
        return max(sum(longest(depth + 1, c) for c in rule) for rule in g.rules[depth][sym])

    syms = [0]
    for depth, level in enumerate(g.rules):
        syms = [c for s in syms for c in max(level[s], key=lambda r: sum(longest(depth + 1, c) for c in r))]
    sentence = [g.terminals[s] for s in syms]
    assert len(sentence) == g.max_len and accepts(g, sentence)
    rng = random.Random(1)
    assert max(len(sample_sentence(g, rng)) for _ in range(500)) <= g.max_len


def test_cfg_stream_is_seeded_and_resumable():
    cfg = tiny_config()
    a, b = Batches(cfg, "train"), Batches(cfg, "train")
    assert torch.equal(a.next(), b.next())
    state = a.state_dict()
    x = a.next()
    c = Batches(cfg, "train")
    c.load_state_dict(state)
    assert torch.equal(c.next(), x)
    assert not torch.equal(Batches(cfg, "val").next(), Batches(cfg, "train").next())


def split_sentences(tokens, eos_id: int) -> list[tuple[int, ...]]:
    out, cur = [], []
    for tok in tokens:
        if tok == eos_id:
            out.append(tuple(cur))
            cur = []
        else:
            cur.append(tok)
    assert not cur, "a stream block ends with an EOS"
    return out


def test_block_sampler_draws_sentences_with_the_reference_distribution():
    """On a small grammar whose sentence probabilities are enumerable (rules of different lengths, 2 or 3 rules per
    symbol), the block sampler's frequencies match the exact ones, as do the reference sampler's."""
    # level 0: root; level 1: symbols 0, 1; level 2 (terminals): symbols 0, 1, 2 -> tokens 1, 2, 3
    rules = [[[(0, 1), (1,), (1, 0, 1)]],
             [[(0,), (1, 2)], [(2, 2), (0,), (1,)]]]
    g = Grammar("tiny", rules, [1, 2, 3], eos_id=4, vocab_size=5)

    def derive(level: int, sym: int) -> dict[tuple[int, ...], float]:
        if level == len(rules):
            return {(g.terminals[sym],): 1.0}
        out: dict[tuple[int, ...], float] = {}
        for rule in rules[level][sym]:
            part = {(): 1.0 / len(rules[level][sym])}
            for child in rule:
                part = {a + b: p * q for a, p in part.items() for b, q in derive(level + 1, child).items()}
            for k, p in part.items():
                out[k] = out.get(k, 0.0) + p
        return out

    exact = derive(0, 0)
    n = 40_000
    block = split_sentences(sample_block(RuleTables(g), np.random.default_rng(0), n).tolist(), g.eos_id)
    rng = random.Random(0)
    reference = [tuple(sample_sentence(g, rng)) for _ in range(n)]
    assert len(block) == n
    for got in (block, reference):
        counts = {k: 0 for k in exact}
        for sent in got:
            counts[sent] += 1  # a sentence the grammar cannot derive raises KeyError
        for sent, p in exact.items():
            sd = (n * p * (1 - p)) ** 0.5
            assert abs(counts[sent] - n * p) <= 5 * sd + 1, (sent, counts[sent], n * p)


def test_block_sampler_on_cfg3f_sentences_are_accepted_and_lengths_match():
    g = load_grammar("cfg3f")
    block = split_sentences(sample_block(RuleTables(g), np.random.default_rng(1), 1000).tolist(), g.eos_id)
    assert len(block) == 1000 and all(accepts(g, list(s)) for s in block[:60])
    rng = random.Random(1)
    reference = [len(sample_sentence(g, rng)) for _ in range(1000)]
    lengths = [len(s) for s in block]
    assert max(lengths) <= g.max_len
    sd = float(np.std(reference)) * (2 / 1000) ** 0.5  # of the difference of two means of 1,000
    assert abs(np.mean(lengths) - np.mean(reference)) < 4 * sd


def test_cfg_stream_does_not_depend_on_how_it_is_taken():
    g = load_grammar("cfg3f")
    whole = CFGStream(g, 5).take(8 * BLOCK_SENTENCES * 250)  # several blocks
    s, parts = CFGStream(g, 5), []
    for size in [1, 7, 513, 16_000, 1] * 4:
        parts.append(s.take(size))
    got = np.concatenate(parts)
    assert len(got) <= len(whole) and np.array_equal(got, whole[: len(got)])
    assert not np.array_equal(CFGStream(g, 6).take(1000), whole[:1000])


def test_cfg_stream_state_survives_a_checkpoint_file(tmp_path):
    """Both samplers' states go through torch.save / torch.load(weights_only=True), as checkpoints do."""
    g = load_grammar("cfg3f")
    for sampler in ("block", "sentence"):
        a = CFGStream(g, 3, sampler)
        a.take(1234)
        torch.save({"data": a.state_dict()}, tmp_path / f"{sampler}.pt")
        b = CFGStream(g, 99)
        b.load_state_dict(torch.load(tmp_path / f"{sampler}.pt", weights_only=True)["data"])
        assert b.sampler == sampler
        assert np.array_equal(a.take(5000), b.take(5000))


def test_sentence_sampler_is_the_stream_before_the_block_sampler():
    """'sentence' reproduces the earlier stream: sample_sentence with random.Random(seed), each followed by EOS; a
    state saved then (no 'sampler' key) resumes it in a stream made with today's default."""
    g = load_grammar("cfg3f")
    rng, expected = random.Random(11), []
    while len(expected) < 2000:
        expected += sample_sentence(g, rng) + [g.eos_id]
    s = CFGStream(g, 11, "sentence")
    assert s.take(1000).tolist() == expected[:1000]
    old_state = {"rng": s.rng.getstate(), "buffer": s.buffer.tolist()}
    resumed = CFGStream(g, 11)
    resumed.load_state_dict(old_state)
    assert resumed.take(1000).tolist() == expected[1000:2000]


def test_ngram_grouping_roundtrip():
    x = torch.randint(0, 7, (3, 12))
    g = group_ngrams(x, 7, 3)
    assert g.shape == (3, 4) and int(g.max()) < 343
    assert torch.equal(split_ngrams(g, 7, 3), x)


@pytest.mark.parametrize("tokenizer", ["bpe:512", str(SHARED / "tokenizers" / "gpt-neox-olmo.json")])
def test_prepare_real_text(tmp_path, tokenizer):
    out = tmp_path / "austen"
    res = prepare([SHARED / "text" / "austen.txt.xz"], out, tokenizer, val_fraction=0.1, max_docs=60)
    meta = read_meta(out)
    assert meta == res.meta
    assert meta["train_tokens"] > 10_000 and meta["val_tokens"] > 500
    assert 1.0 < meta["train_bytes_per_token"] < 6.0
    arr = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    assert int(arr.max()) < meta["vocab_size"]
    cfg = tiny_config(**{"data.kind": "text", "data.path": str(out), "model.vocab_size": 0})
    assert cfg.model.vocab_size == meta["vocab_size"]
    batch = Batches(cfg, "train").next()
    assert batch.shape == (4, cfg.model.seq_len + 1)


def test_prepare_encodes_in_batches_with_the_same_tokens(tmp_path, monkeypatch):
    """Documents are encoded a batch at a time (peak memory of one batch, not of the corpus): batches of a few
    documents give byte-identical token files to one batch of all."""
    import overtok.data.text as text

    tok = str(SHARED / "tokenizers" / "gpt-neox-olmo.json")
    prepare([SHARED / "text" / "austen.txt.xz"], tmp_path / "one", tok, val_fraction=0.1, max_docs=60)
    calls = []
    encode_batch = text.load_tokenizer(tok).__class__.encode_batch
    monkeypatch.setattr(text, "ENCODE_BATCH_CHARS", 20_000)
    monkeypatch.setattr(text.load_tokenizer(tok).__class__, "encode_batch",
                        lambda self, texts, **kw: calls.append(len(texts)) or encode_batch(self, texts, **kw))
    prepare([SHARED / "text" / "austen.txt.xz"], tmp_path / "many", tok, val_fraction=0.1, max_docs=60)
    assert len(calls) > 3 and sum(calls) == 60
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name


def test_prepare_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(DataError, match="not UTF-8"):
        prepare([bad], tmp_path / "o", "bpe:300")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare([empty], tmp_path / "o2", "bpe:300")
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "missing"], tmp_path / "o3", "bpe:300")


def test_prepare_jsonl_parquet_and_hf_saved_dataset(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (5 + i % 7) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:20]))
    pq.write_table(pa.table({"text": docs[20:40]}), tmp_path / "b.parquet")
    hf = tmp_path / "hf"  # the layout of datasets' save_to_disk: Arrow IPC stream files + dataset_info.json
    hf.mkdir()
    (hf / "dataset_info.json").write_text("{}")
    table = pa.table({"text": docs[40:]})
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    res = prepare([tmp_path / "a.jsonl", tmp_path / "b.parquet", hf], tmp_path / "out", "bpe:300", val_fraction=0.1)
    m = res.meta
    assert m["train_documents"] + m["val_documents"] == 60
    assert set(m["sources"]) == {"a.jsonl", "b.parquet", "data-00000-of-00001.arrow"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="no field 'text'"):
        prepare([bad], tmp_path / "o", "bpe:300")


@pytest.mark.parametrize("n", [1, 3])
def test_generation_prompts_end_a_sentence_as_in_training(n):
    """Sampling starts from a model token that precedes a sentence in the training stream (for n = 1: EOS; for an
    n-gram tokenizer: (end of a sentence, EOS)), never from the all-EOS n-gram, which training never shows."""
    from overtok.train import generation_prompts

    cfg = tiny_config(**{"model.tokenizer_ngram": n, "model.seq_len": 64, "data.batch_size": 32})
    data = Batches(cfg, "train")
    g, V = data.grammar, data.grammar.vocab_size
    seen = set(torch.cat([data.next() for _ in range(20)]).flatten().tolist())
    prompts = generation_prompts(g, n, 50, seed=1)[:, 0].tolist()
    assert all(p // V ** (n - 1) % V == g.eos_id for p in prompts)  # the last token is EOS
    assert set(prompts) <= seen
    if n > 1:
        assert sum(g.eos_id * V**i for i in range(n)) not in seen and len(set(prompts)) > 1


def test_prepare_holds_out_every_source_in_proportion(tmp_path):
    """Three sources with different structure (one line per sentence and no blank lines; '=== 1790_name' headers;
    '# ==== FILE:' headers, one file far over the document cap): every source is cut into documents of at most
    MAX_DOC_CHARS and gives about val_fraction of its tokens to validation; meta.json and the log say so per
    source; the BPE is trained on training documents only and saved beside the shards."""
    from overtok.data.text import MAX_DOC_CHARS, _split_documents

    rng = __import__("random").Random(0)
    words = [f"w{i}" for i in range(300)]

    def sentence():
        return " ".join(rng.choice(words) for _ in range(12)) + " ."

    (tmp_path / "lines.txt").write_text("\n".join(sentence() for _ in range(8000)) + "\n")
    (tmp_path / "speeches.txt").write_text("".join(f"=== {1790 + i}_speaker\n" + "\n\n".join(sentence() for _ in range(40))
                                                   + "\n" for i in range(60)))
    files = [f"# ==== FILE: pkg/m{i}.py ====\n" + "\n".join(f"x{j} = {j}  # {sentence()}" for j in range(60)) + "\n"
             for i in range(40)]
    files.append("# ==== FILE: pkg/huge.py ====\n" + "\n".join(f"y{j} = {j}" for j in range(20000)) + "\n")
    (tmp_path / "code.py.txt").write_text("".join(files))
    for f in ("lines.txt", "speeches.txt", "code.py.txt"):
        docs = _split_documents((tmp_path / f).read_text())
        assert len(docs) > 10 and max(map(len, docs)) <= MAX_DOC_CHARS, f
    lines = []
    res = prepare([tmp_path / f for f in ("lines.txt", "speeches.txt", "code.py.txt")], tmp_path / "out", "bpe:400",
                  val_fraction=0.05, log=lines.append)
    sources = res.meta["sources"]
    assert set(sources) == {"lines.txt", "speeches.txt", "code.py.txt"}
    for name, row in sources.items():
        share = row["val_tokens"] / (row["val_tokens"] + row["train_tokens"])
        assert 0.02 < share < 0.09 and row["val_documents"] >= 1, (name, row)
    assert sum(r["val_tokens"] for r in sources.values()) == res.meta["val_tokens"]
    assert any("speeches.txt" in line and "val share" not in line for line in lines)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.get_vocab_size() == res.meta["vocab_size"]
    # max_docs draws across sources, not the first documents of the first file
    few = prepare([tmp_path / f for f in ("lines.txt", "speeches.txt", "code.py.txt")], tmp_path / "few", "bpe:400",
                  val_fraction=0.05, max_docs=30, log=lambda _: None)
    assert len(few.meta["sources"]) == 3
    # exclude leaves the named files out, and refuses to leave none
    inputs = [tmp_path / f for f in ("lines.txt", "speeches.txt", "code.py.txt")]
    some = prepare(inputs, tmp_path / "some", "bpe:400", val_fraction=0.05, exclude="speeches*, code.*",
                   log=lambda _: None)
    assert set(some.meta["sources"]) == {"lines.txt"} and some.meta["exclude"] == "speeches*, code.*"
    with pytest.raises(DataError, match="no input files left after excluding"):
        prepare(inputs, tmp_path / "none", "bpe:400", exclude="*.txt", log=lambda _: None)


def test_validation_windows_cover_the_whole_split(tmp_path):
    """An evaluation's windows are spread over the whole held-out split (stored source after source), not taken
    from its start."""
    out = tmp_path / "prep"
    out.mkdir()
    val = (np.arange(100_000) // 1000).astype(np.uint16)  # each token names its thousand: 0..99
    val.tofile(out / "val.bin")
    val.tofile(out / "train.bin")
    (out / "meta.json").write_text('{"vocab_size": 500, "eos_id": 0, "dtype": "uint16", "train_tokens": 100000, '
                                   '"val_tokens": 100000, "val_bytes_per_token": 4.0}')
    cfg = tiny_config(**{"data.kind": "text", "data.path": str(out), "model.vocab_size": 0, "train.eval_batches": 4})
    batches = Batches(cfg, "val")
    firsts = [int(batches.next()[i, 0]) for _ in range(4) for i in range(cfg.data.batch_size)]
    assert min(firsts) == 0 and max(firsts) >= 90  # from the first thousand to the last tenth of the split
    batches.rewind()
    assert int(batches.next()[0, 0]) == firsts[0]


def _position_corpus(tmp_path, n_tokens: int):
    """A prepared 'corpus' whose token i is i: every row of a batch names the window it was cut from."""
    out = tmp_path / "positions"
    out.mkdir()
    np.arange(n_tokens, dtype=np.uint16).tofile(out / "train.bin")
    np.arange(1000, dtype=np.uint16).tofile(out / "val.bin")
    (out / "meta.json").write_text(json.dumps({"vocab_size": 65535, "eos_id": 0, "dtype": "uint16"}))
    return out


def test_epoch_sampler_reads_each_window_once_per_epoch_and_resumes(tmp_path):
    """data.text_sampler: epoch: within an epoch the rows are disjoint windows covering the split (up to the offset's
    remainder), the next epoch cuts at another offset in another order, two ranks read disjoint halves, and a
    restored state continues mid-epoch with the same rows."""
    path = _position_corpus(tmp_path, 4000)
    cfg = tiny_config(**{"data.kind": "text", "data.path": str(path), "model.vocab_size": 65535,
                         "model.seq_len": 63, "data.batch_size": 4})  # rows of 64 tokens
    data = Batches(cfg, "train")
    per_epoch = len(data.order)
    assert per_epoch in (61, 62)  # (4000 - offset) // 64
    rows = torch.cat([data.next() for _ in range(per_epoch // 4)])
    starts = rows[:, 0].tolist()
    assert len(set(starts)) == len(starts) and all(torch.equal(r, torch.arange(r[0], r[0] + 64)) for r in rows)
    assert len({s % 64 for s in starts}) == 1  # one cut per epoch
    assert starts != sorted(starts)  # shuffled
    epoch2 = Batches(cfg, "train")
    for _ in range(40):  # ~2.6 epochs: the offsets or orders differ between epochs
        epoch2.next()
    state = epoch2.state_dict()
    expected = [epoch2.next() for _ in range(20)]  # crosses an epoch boundary
    resumed = Batches(cfg, "train")
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next(), x) for x in expected)
    r0, r1 = Batches(cfg, "train", 0, 2), Batches(cfg, "train", 1, 2)
    a = set(torch.cat([r0.next() for _ in range(7)])[:, 0].tolist())
    b = set(torch.cat([r1.next() for _ in range(7)])[:, 0].tolist())
    assert len(a) == len(b) == 28 and not a & b
    rand = Batches(tiny_config(**{"data.kind": "text", "data.path": str(path), "model.vocab_size": 65535,
                                  "model.seq_len": 63, "data.batch_size": 4, "data.text_sampler": "random"}), "train")
    assert len({s % 64 for s in torch.cat([rand.next() for _ in range(8)])[:, 0].tolist()}) > 1
