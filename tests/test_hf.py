"""Trained models out of overtok: a Llama export that transformers loads offline with the same logits, and text
generation from a checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, SHARED

pytestmark = pytest.mark.slow


def _train(work, env, name, extra=()):
    sets = ["data.kind=text", "data.path=prep", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.seq_len=32", "train.max_steps=12", "train.eval_every=12", "train.eval_batches=1",
            "data.batch_size=4", f"train.checkpoint_dir=results/{name}", *extra]
    res = subprocess.run([sys.executable, "-m", "overtok", "train", *[a for s in sets for a in ("--set", s)]],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from overtok.hf import build_model, load_checkpoint
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
cfg, state = load_checkpoint(sys.argv[2])
ours = build_model(cfg, state)
ids = torch.tensor([tok("It is a truth universally acknowledged, that a single man")["input_ids"][:24]])
with torch.no_grad():
    a = model(ids).logits
    b = ours(ids, targets=False)[0]
print(json.dumps({"diff": float((a - b).abs().max()), "scale": float(b.abs().max()), "n": ids.shape[1],
                  "type": model.config.model_type}))
"""


def _matches(work, env, export: str, ckpt: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOGITS, export, ckpt], cwd=work, env={**env, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n"] > 5 and r["diff"] < 1e-4 * max(1.0, r["scale"]), r  # float32 on both sides: rounding only
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny models trained a few steps on a BPE-tokenized slice of the prose corpus, checkpointed: overtok's default
    body untied (results/ckpt), and an OE model with learned positions and a GELU MLP (results/oe)."""
    work = tmp_path_factory.mktemp("hf")
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(ROOT)}
    prep = subprocess.run([sys.executable, "-m", "overtok", "data", "prepare", str(SHARED / "text" / "austen.txt.xz"),
                           "--out", "prep", "--tokenizer", "bpe:400", "--max-docs", "40"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    lines = (prep.stdout + prep.stderr).splitlines()  # the per-source table and a summary: no blank lines, no bars
    assert lines and all(line.startswith("[overtok] ") for line in lines), prep.stdout + prep.stderr
    _train(work, env, "ckpt", ["model.tie_embeddings=false"])
    _train(work, env, "oe", ["model.oe.n=3", "model.oe.m=1009", "model.pos_encoding=learned", "model.mlp=gelu"])
    return work, env


def test_export_model_loads_in_transformers_with_the_same_logits(trained):
    work, env = trained
    res = subprocess.run([sys.executable, "-m", "overtok", "export-model", "results/ckpt", "--out", "hf"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((work / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert _matches(work, env, "hf", "results/ckpt")["type"] == "llama"


def test_an_oe_model_exports_with_its_modeling_file_and_the_same_logits(trained):
    work, env = trained
    res = subprocess.run([sys.executable, "-m", "overtok", "export-model", "results/oe", "--out", "hf_oe"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "hf_oe" / "modeling_overtok.py").is_file()
    # the modeling file is self-contained: it loads where overtok cannot be imported
    alone = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'hf_oe'); import modeling_overtok"],
                           cwd=work, env={k: v for k, v in env.items() if k != "PYTHONPATH"}, capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert _matches(work, env, "hf_oe", "results/oe")["type"] == "overtok"


def test_generate_continues_a_prompt_and_refuses_what_it_cannot_export(trained):
    work, env = trained
    res = subprocess.run([sys.executable, "-m", "overtok", "generate", "results/ckpt", "--prompt", "It is a truth",
                          "--tokens", "8", "--seed", "1"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("It is a truth") and len(res.stdout) > len("It is a truth"), \
        res.stdout + res.stderr[-2000:]
    again = subprocess.run([sys.executable, "-m", "overtok", "generate", "results/ckpt", "--prompt", "It is a truth",
                            "--tokens", "8", "--seed", "1"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.stdout == res.stdout  # seeded
    # a model with extra heads is not a causal LM of transformers: one line, exit 2
    from overtok.config import load_config
    from overtok.model import Transformer

    cfg = load_config(None, ["model.vocab_size=7", "model.od_depth=2", "model.d_model=32", "model.n_heads=2"])
    torch.save({"config": __import__("dataclasses").asdict(cfg), "model": Transformer(cfg.model).state_dict()},
               work / "od.pt")
    bad = subprocess.run([sys.executable, "-m", "overtok", "export-model", "od.pt", "--out", "x"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "it has OD/MTP heads" in bad.stderr and "\n" not in bad.stderr.strip()
