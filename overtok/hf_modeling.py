"""A self-contained `transformers` model for any overtok decoder without extra heads: copied next to the weights by
`overtok export-model` as modeling_overtok.py and loaded with ``trust_remote_code=True``. It imports nothing from
overtok, so an export works where overtok is not installed. Over-Encoding (hashed n-gram tables, paper Alg. 1),
learned positions and the GELU MLP are supported; parameter names are overtok's own."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class OvertokConfig(PretrainedConfig):
    model_type = "overtok"

    def __init__(self, vocab_size=0, d_model=64, n_layers=2, n_heads=4, mlp_hidden=0, seq_len=128, rope_theta=1e4,
                 norm_eps=1e-5, pos_encoding="rope", mlp="swiglu", tied=True, oe_order=1, oe_hash_weights=None,
                 oe_moduli=None, oe_divisor=1, **kwargs):
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.mlp_hidden, self.seq_len, self.rope_theta, self.norm_eps = mlp_hidden, seq_len, rope_theta, norm_eps
        self.pos_encoding, self.mlp, self.tied = pos_encoding, mlp, tied
        self.oe_order, self.oe_divisor = oe_order, oe_divisor
        self.oe_hash_weights, self.oe_moduli = oe_hash_weights or [], oe_moduli or []
        kwargs["tie_word_embeddings"] = False  # a tied head reads the embedding itself (no second parameter)
        super().__init__(**kwargs)


class _Norm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.rope = c.n_heads, c.pos_encoding == "rope"
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = (torch.cat([a * cos[:T] - b * sin[:T], a * sin[:T] + b * cos[:T]], -1)
                    for a, b in (t.chunk(2, dim=-1) for t in (q, k)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _SwiGLU(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.gate_up = nn.Linear(c.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, c.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _Gelu(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.up = nn.Linear(c.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, c.d_model, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class _Block(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.attn_norm, self.attn = _Norm(c.d_model, c.norm_eps), _Attention(c)
        self.mlp_norm = _Norm(c.d_model, c.norm_eps)
        self.mlp = _SwiGLU(c, hidden) if c.mlp == "swiglu" else _Gelu(c, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class _Embedding(nn.Module):
    """The 1-gram embedding plus hashed n-gram tables: row id of slice s = sum_i x_{t-i} w[s, i] mod m_s (tokens
    before the sequence count as 0), all slices in one table with offsets, projected and averaged."""

    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.order, self.divisor = c.oe_order, c.oe_divisor
        # the hash's constants stay Python ints (transformers builds the model on the meta device first)
        self.hash_w, self.moduli = c.oe_hash_weights, c.oe_moduli
        self.offsets = [sum(c.oe_moduli[:i]) for i in range(len(c.oe_moduli))]
        if c.oe_moduli:
            width = c.d_model // len(c.oe_moduli)
            self.tables = nn.Embedding(sum(c.oe_moduli), width)
            self.proj = nn.Linear(len(c.oe_moduli) * width, c.d_model, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        if not hasattr(self, "tables"):
            return x
        cols = [idx] + [F.pad(idx, (i, 0))[:, : idx.shape[1]] for i in range(1, self.order)]
        stacked = torch.stack(cols, dim=-1)  # (B, T, n): x_t, x_{t-1}, ...
        w, mods, offsets = (torch.tensor(v, dtype=torch.long, device=idx.device)
                            for v in (self.hash_w, self.moduli, self.offsets))
        ids = ((stacked.unsqueeze(-2) * w) % mods.unsqueeze(-1)).sum(-1) % mods + offsets
        ngram = self.proj(self.tables(ids).flatten(-2))
        return (x + ngram) / self.divisor if self.divisor != 1 else x + ngram


class _Decoder(nn.Module):
    """overtok's Transformer (without extra heads), under overtok's parameter names."""

    def __init__(self, c):
        super().__init__()
        hidden = c.mlp_hidden
        self.embed = _Embedding(c)
        self.pos = nn.Parameter(torch.zeros(c.seq_len + 1, c.d_model)) if c.pos_encoding == "learned" else None
        self.blocks = nn.ModuleList(_Block(c, hidden) for _ in range(c.n_layers))
        self.norm = _Norm(c.d_model, c.norm_eps)
        self.head = None if c.tied else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head_dim, self.rope_theta = c.d_model // c.n_heads, c.rope_theta

    def forward(self, idx):
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos[: idx.shape[1]]
        hd, dev = self.head_dim, idx.device  # RoPE tables as overtok.model.rope_tables makes them
        inv = 1.0 / self.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=dev) / hd)
        freqs = torch.outer(torch.arange(idx.shape[1], dtype=torch.float32, device=dev), inv)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        h = self.norm(x)
        return F.linear(h, self.embed.wte.weight if self.head is None else self.head.weight)


class OvertokForCausalLM(PreTrainedModel):
    config_class = OvertokConfig
    base_model_prefix = "decoder"

    def __init__(self, config):
        super().__init__(config)
        self.decoder = _Decoder(config)
        self.post_init()

    def _init_weights(self, module):
        pass  # weights always come from the checkpoint

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.decoder(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


__all__ = ["OvertokConfig", "OvertokForCausalLM"]
