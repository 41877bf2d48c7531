"""Trained models out of overtok: `overtok export-model` (a Hugging Face `transformers` directory) and
`overtok generate` (text sampled from a checkpoint).

A model without OE, OD/MTP heads or n-gram vocabularies, with RoPE, SwiGLU and RMSNorm (overtok's default body) is
exactly a Llama model: the fused qkv and gate/up projections are split into Llama's q/k/v and gate/up, RoPE uses
the same half-split rotation and frequencies, and the head is tied or not as trained. It is written as a standard
Llama checkpoint (config.json, model.safetensors) that `AutoModelForCausalLM.from_pretrained` loads without custom
code. A model with Over-Encoding, learned positions or a GELU MLP is written with a self-contained modeling file
(``overtok/hf_modeling.py``, copied as modeling_overtok.py) that loads with ``trust_remote_code=True``. The training
data's tokenizer goes beside either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from overtok.config import ConfigError, RunConfig, stored_config
from overtok.errors import CheckpointError


def load_checkpoint(path: str | Path) -> tuple[RunConfig, dict]:
    """(config, model state) of a checkpoint file, or of the newest checkpoint in a directory."""
    from overtok.checkpoint import load_latest_checkpoint

    p = Path(path)
    if p.is_dir():
        state = load_latest_checkpoint(p)
        if state is None:
            raise CheckpointError(f"{p}: no readable checkpoint (ckpt_*.pt) there")
    elif p.is_file():
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
            raise CheckpointError(f"{p}: not a readable overtok checkpoint ({type(e).__name__})") from None
    else:
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{p}: not an overtok checkpoint (no config and model state)")
    try:
        cfg = stored_config(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{p}: its config does not load ({e})") from None
    return cfg, state["model"]


def build_model(cfg: RunConfig, state: dict):
    """The trained model, on the CPU, in eval mode."""
    from overtok.model import Transformer

    model = Transformer(cfg.model)
    model.load_state_dict(state)
    return model.eval()


def export_problem(cfg: RunConfig) -> str | None:
    """Why this model cannot be exported at all, or None."""
    m = cfg.model
    checks = [(m.od_depth > 1, "it has OD/MTP heads"),
              (m.tokenizer_ngram > 1 or m.output_ngram > 1, "it has an n-gram vocabulary"),
              (m.oe.n > 1 and m.oe.stop_at_eos, "its OE stops at EOS (model.oe.stop_at_eos)"),
              (m.oe.n > 1 and m.oe.shard, "its OE table was sharded over ranks (each checkpoint file holds a part)")]
    reasons = [why for bad, why in checks if bad]
    return ", ".join(reasons) if reasons else None


def llama_problem(cfg: RunConfig) -> str | None:
    """Why this model is not a Llama model, or None."""
    m = cfg.model
    checks = [(m.oe.n > 1, "it uses Over-Encoding"), (m.od_depth > 1, "it has OD/MTP heads"),
              (m.tokenizer_ngram > 1 or m.output_ngram > 1, "it has an n-gram vocabulary"),
              (m.pos_encoding != "rope", "it uses learned positions"), (m.mlp != "swiglu", "its MLP is GELU")]
    reasons = [why for bad, why in checks if bad]
    return ", ".join(reasons) if reasons else None


def llama_state(cfg: RunConfig, state: dict) -> dict[str, torch.Tensor]:
    """overtok's state dict under Llama's parameter names."""
    m = cfg.model
    d, h = m.d_model, m.mlp_hidden_size
    out = {"model.embed_tokens.weight": state["embed.wte.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(m.n_layers):
        b, o = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[b + "attn.qkv.weight"].split(d, dim=0)
        gate, up = state[b + "mlp.gate_up.weight"].split(h, dim=0)
        out.update({o + "input_layernorm.weight": state[b + "attn_norm.weight"],
                    o + "self_attn.q_proj.weight": q, o + "self_attn.k_proj.weight": k,
                    o + "self_attn.v_proj.weight": v, o + "self_attn.o_proj.weight": state[b + "attn.proj.weight"],
                    o + "post_attention_layernorm.weight": state[b + "mlp_norm.weight"],
                    o + "mlp.gate_proj.weight": gate, o + "mlp.up_proj.weight": up,
                    o + "mlp.down_proj.weight": state[b + "mlp.down.weight"]})
    if "head.weight" in state:
        out["lm_head.weight"] = state["head.weight"]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def llama_config(cfg: RunConfig, eos_id: int | None) -> dict:
    m = cfg.model
    tied = m.tie_embeddings and m.input_vocab_size == m.output_vocab_size
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "intermediate_size": m.mlp_hidden_size, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads, "head_dim": m.d_model // m.n_heads,
            "hidden_act": "silu", "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied, "torch_dtype": "float32",
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None}


def tokenizer_file(cfg: RunConfig) -> Path | None:
    """The tokenizer the model was trained with (text data prepared by `overtok data prepare`), if any."""
    if cfg.data.kind != "text" or not cfg.data.path:
        return None
    p = Path(cfg.data.path) / "tokenizer.json"
    return p if p.is_file() else None


def export_model(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` as a transformers Llama model directory (with the tokenizer where the data had one)."""
    from safetensors.torch import save_file

    cfg, state = load_checkpoint(checkpoint)
    why = export_problem(cfg)
    if why:
        raise ConfigError(f"{checkpoint}: not exportable: {why} (models with extra heads or n-gram vocabularies are "
                          "not transformers causal LMs)", file=str(checkpoint))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_file(cfg)
    eos = None
    if tok is not None:
        from tokenizers import Tokenizer

        eos = Tokenizer.from_file(str(tok)).token_to_id("<|endoftext|>")
        shutil.copy(tok, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>" if eos is not None else None,
             "model_max_length": cfg.model.seq_len}, indent=2))
    if llama_problem(cfg) is None:
        (out / "config.json").write_text(json.dumps(llama_config(cfg, eos), indent=2))
        save_file(llama_state(cfg, state), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shutil.copy(Path(__file__).with_name("hf_modeling.py"), out / "modeling_overtok.py")
        (out / "config.json").write_text(json.dumps(overtok_config(cfg, eos), indent=2))
        save_file(overtok_state(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def overtok_config(cfg: RunConfig, eos_id: int | None) -> dict:
    """config.json of the remote-code model (overtok/hf_modeling.py)."""
    from overtok.ngram import hash_weights

    m = cfg.model
    moduli = m.oe_moduli()
    order = m.oe.n if moduli else 1
    return {"architectures": ["OvertokForCausalLM"], "model_type": "overtok",
            "auto_map": {"AutoConfig": "modeling_overtok.OvertokConfig",
                         "AutoModelForCausalLM": "modeling_overtok.OvertokForCausalLM"},
            "vocab_size": m.vocab_size, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "mlp_hidden": m.mlp_hidden_size, "seq_len": m.seq_len, "rope_theta": m.rope_theta, "norm_eps": m.norm_eps,
            "pos_encoding": m.pos_encoding, "mlp": m.mlp, "tied": m.tie_embeddings,
            "oe_order": order, "oe_moduli": [mod for _, mod in moduli],
            "oe_hash_weights": [hash_weights(m.vocab_size, o, mod) + [0] * (order - o) for o, mod in moduli],
            "oe_divisor": (1 + len(moduli)) if moduli and m.oe.combine == "mean" else 1,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}


def overtok_state(state: dict) -> dict[str, torch.Tensor]:
    """overtok's parameters under the remote-code model's names (``decoder.`` + overtok's), float32; a row-sparse
    table's optimizer state stays behind."""
    keep = {k: v for k, v in state.items() if not k.startswith("embed.tables.") or k == "embed.tables.weight"}
    return {f"decoder.{k}": v.detach().to(torch.float32).contiguous().clone() for k, v in keep.items()}


def generate_text(checkpoint: str | Path, prompt: str, tokens: int = 64, temperature: float = 1.0,
                  seed: int = 0) -> str:
    """``prompt`` continued by ``tokens`` tokens sampled from the checkpoint's model (text data only)."""
    from tokenizers import Tokenizer

    cfg, state = load_checkpoint(checkpoint)
    tok_path = tokenizer_file(cfg)
    if tok_path is None:
        raise ConfigError(f"{checkpoint}: the model was not trained on text prepared with a tokenizer.json (data.kind "
                          f"{cfg.data.kind}); there is no tokenizer to encode a prompt", file=str(checkpoint))
    if cfg.model.tokenizer_ngram > 1:
        raise ConfigError(f"{checkpoint}: n-gram tokenizer models cannot continue text prompts", file=str(checkpoint))
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ConfigError("the prompt encodes to no tokens", file="--prompt")
    model = build_model(cfg, state)
    eos = tok.token_to_id("<|endoftext|>")
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), tokens, stop_id=eos, temperature=temperature, generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
