"""The Over-Tokenized Transformer: one decoder-only model, every variant a config field.

Body: RMSNorm, RoPE, SDPA causal attention, SwiGLU MLP (Llama-style, as OLMo2 in the paper).
Input side: token embedding, optionally Over-Encoding (hashed n-gram tables, Alg. 1 of the paper) or
an n-gram tokenizer (V^n ids). Output side: next-token head, optionally Over-Decoding (extra linear
heads for t+2..t+n, paper App. C), parallel MTP heads (Gloeckle et al. 2024), or DeepSeek-V3 MTP
modules (sequential; with OE this is OT), or an n-gram output head (V^n classes).
Pure torch: no tracking or orchestration imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from overtok.config import ModelConfig
from overtok.ngram import hash_stacked, hash_weights, shifted_stack
from overtok.sharded import ShardedRowSparseTable, ShardedTable
from overtok.sparse import RowSparseTable


def packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (P*B, ..., in), w (P, out, in) -> (P*B, ..., out): slice p of the batch times w[p] (packed models,
    overtok.packed)."""
    P = w.shape[0]
    y = torch.bmm(x.reshape(P, -1, x.shape[-1]), w.transpose(1, 2))
    return y.view(*x.shape[:-1], w.shape[1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int = 0) -> torch.Tensor:
    # x: (B, H, T, hd) at positions pos..pos+T-1; rotate pairs (first half, second half)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[pos : pos + x.shape[-2]].to(x.dtype), sin[pos : pos + x.shape[-2]].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.rope = cfg.pos_encoding == "rope"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kernel = False  # RoPE by overtok.kernels.rope_qkv in training (the trainer sets it: runtime.rope_kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        pos = cache["pos"] if cache is not None else 0
        if self.kernel and self.rope and cache is None:
            from overtok.kernels import rope_qkv

            q, k, v = rope_qkv(self.qkv(x), cos, sin, self.n_heads)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
            if self.rope:
                q, k = apply_rope(q, cos, sin, pos), apply_rope(k, cos, sin, pos)
        if cache is not None:  # generation: keys/values of earlier positions are kept, not recomputed
            cache["k"][:, :, pos : pos + T], cache["v"][:, :, pos : pos + T] = k, v
            k, v = cache["k"][:, :, : pos + T], cache["v"][:, :, : pos + T]
        # a single new query attends to every cached position; a prompt (pos 0) is causal as in training
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.mlp_hidden_size
        self.gate_up = nn.Linear(cfg.d_model, 2 * h, bias=False)
        self.down = nn.Linear(h, cfg.d_model, bias=False)
        self.kernel = False  # silu(gate) * up by overtok.kernels.swiglu (the trainer sets it: runtime.mlp_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        if self.kernel:
            from overtok.kernels import swiglu

            return self.down(swiglu(gu))
        gate, up = gu.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP: d -> hidden -> d with GELU (model.mlp: gelu); ``down`` gets the scaled residual init."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class OverEncoding(nn.Module):
    """Token embedding plus hashed n-gram tables; the output is the mean of the 1-gram embedding and
    the k*(n-1) projected slices (paper Alg. 1).

    All slices live in one table (rows offset per slice) so a batch is one gather; the per-slice
    projections (width w -> d_model) are stacked into one (S*w -> d_model) linear, which equals the
    sum of the separate projections applied to the concatenated slices.
    """

    def __init__(self, cfg: ModelConfig, eos_id: int | None = None):
        super().__init__()
        V, d = cfg.input_vocab_size, cfg.d_model
        self.vocab_size = V
        self.wte = nn.Embedding(V, d)
        moduli = cfg.oe_moduli()
        self.num_slices = len(moduli)
        self.stop_at_eos = cfg.oe.stop_at_eos and eos_id is not None
        self.eos_id = eos_id
        self.divisor = 1 + len(moduli) if cfg.oe.combine == "mean" else 1
        if not moduli:
            return
        self.order = cfg.oe.n
        self.width = d // self.num_slices
        w = torch.tensor([hash_weights(V, o, m) + [0] * (self.order - o) for o, m in moduli], dtype=torch.long)
        mods = torch.tensor([m for _, m in moduli], dtype=torch.long)
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), mods[:-1]]), 0)
        self.register_buffer("hash_w", w, persistent=False)
        self.register_buffer("moduli", mods, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        rows = int(mods.sum())
        # dense and sharded tables are filled by init_table_rows from this seed (drawn from the global RNG, so it
        # follows the run's seed and is the same on every rank)
        self.table_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        sharded = cfg.oe.shard and _world_size() > 1
        if cfg.oe.sparse_update and not sharded and cfg.oe.sparse_mode == "lazy":
            # lazy tables keep their own initialisation, as the runs before shards had
            self.tables = RowSparseTable(rows, self.width, cfg.oe.table_dtype, cfg.oe.sparse_mode)
            self.tables.reset_parameters(cfg.oe.table_init_std)
        else:
            if cfg.oe.sparse_update and not sharded:  # exact mode: initialised as the dense table it follows
                self.tables = RowSparseTable(rows, self.width, cfg.oe.table_dtype, cfg.oe.sparse_mode)
            elif cfg.oe.sparse_update:
                self.tables = ShardedRowSparseTable(rows, self.width, cfg.oe.table_dtype, cfg.oe.sparse_mode)
            elif sharded:
                self.tables = ShardedTable(rows, self.width)
            else:
                self.tables = nn.Embedding(rows, self.width, _weight=torch.empty(rows, self.width))
            # seeded by row chunk, so a sharded table is the same table cut into pieces
            init_table_rows(self.tables.weight, getattr(self.tables, "lo", 0), self.table_seed, cfg.oe.table_init_std)
        self.proj = nn.Linear(self.num_slices * self.width, d, bias=False)

    def slice_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, S) row ids into the fused table."""
        doc_ids = None
        if self.stop_at_eos:
            is_eos = (idx == self.eos_id).long()
            doc_ids = torch.cumsum(is_eos, dim=1) - is_eos  # EOS ends its document
        stacked = shifted_stack(idx, self.order, doc_ids)
        return hash_stacked(stacked, self.hash_w, self.moduli) + self.offsets

    def lookup(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lookups: the 1-gram embedding (B, T, d) and the n-gram table rows (B, T, S, w), None without OE.
        They stay eager (row-sparse and sharded tables work through autograd hooks and collectives); the n-gram
        ids may be compiled (:meth:`compile_ids`)."""
        x = self.wte(idx)
        if self.num_slices == 0:
            return x, None
        return x, self.tables(self.slice_ids(idx))

    def mix(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Mean (or sum: model.oe.combine) of the 1-gram embedding and the projected slices (the trainer compiles
        this with the body)."""
        if rows is None:
            return x
        ngram = self.proj(rows.flatten(-2))  # (B, T, d) = sum of per-slice projections
        return (x + ngram) / self.divisor if self.divisor != 1 else x + ngram

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.mix(*self.lookup(idx))

    def compile_ids(self) -> None:
        """Compile the n-gram ids (shift, hash, offsets: about ten small kernels eager, one or two compiled)."""
        if self.num_slices:
            self.slice_ids = torch.compile(self.slice_ids)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_table_rows(weight: torch.Tensor, first_row: int, seed: int, std: float = 0.02, chunk: int = 1 << 16) -> None:
    """Fill rows [first_row, first_row + len(weight)) of a virtual table from a seed, in fixed chunks of rows
    that each have their own generator: a shard of a row-sharded table gets exactly the rows the whole table
    would have, at the cost of its own rows only."""
    n, w = weight.shape
    with torch.no_grad():
        row = first_row
        while row < first_row + n:
            c = row // chunk
            lo, hi = c * chunk, (c + 1) * chunk
            g = torch.Generator(device=weight.device).manual_seed(seed * 1_000_003 + c)
            block = torch.randn(hi - lo, w, generator=g, device=weight.device) * std
            end = min(hi, first_row + n)
            weight[row - first_row : end - first_row].copy_(block[row - lo : end - lo])
            row = end


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, eos_id: int | None = None):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.pack = 1  # > 1 after overtok.packed.pack_models: P models in one, losses of shape (P,)
        # the trainer turns this on where overtok.kernels runs (runtime.loss_kernel); training then returns no logits
        self.fused_loss = False
        # None: the residual stream keeps the embedding's dtype (float32); bfloat16 (train.residual_dtype) casts it
        # under autocast only (``_residual``)
        self.residual_dtype: torch.dtype | None = None
        d = cfg.d_model
        self.embed = OverEncoding(cfg, eos_id)
        # learned absolute positions (model.pos_encoding: learned), added to the embedding before the first block
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len + cfg.lookahead, d)) if cfg.pos_encoding == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.tied = cfg.tie_embeddings and cfg.input_vocab_size == cfg.output_vocab_size
        self.head = None if self.tied else nn.Linear(d, cfg.output_vocab_size, bias=False)
        n_extra = cfg.od_depth - 1
        if cfg.od_mode == "linear":
            r = cfg.od_rank
            self.extra = nn.ModuleList(
                (nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)) if r else nn.Linear(d, d, bias=False))
                for _ in range(n_extra)
            )
        elif cfg.od_mode == "mtp":
            self.extra = nn.ModuleList(Block(cfg) for _ in range(n_extra))
        else:  # mtp_ds: DeepSeek-V3 sec. 2.2
            self.extra = nn.ModuleList(MTPModule(cfg) for _ in range(n_extra))
        self.extra_norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in range(n_extra if cfg.od_mode != "linear" else 0))
        cos, sin = rope_tables(cfg.seq_len + cfg.lookahead, d // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        tables = getattr(self.embed, "tables", None)
        for mod in self.modules():
            if mod is not tables:  # OE tables were filled by OverEncoding (init_table_rows)
                self._init(mod, cfg.embed_init_std if mod is self.embed.wte else 0.02)
        if self.pos is not None:
            nn.init.normal_(self.pos, std=cfg.pos_init_std)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("proj.weight") and "embed" not in name or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(mod: nn.Module, embedding_std: float) -> None:
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=embedding_std)

    def head_weight(self) -> torch.Tensor:
        """The shared output head's weight (V, d), or (P, V, d) packed: the 1-gram embedding when tied."""
        return self.embed.wte.weight if self.tied else self.head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Shared output head (tied to the 1-gram embedding when vocabularies agree)."""
        w = self.head_weight()
        if w.dim() == 3:  # packed (P, V, d)
            return packed_linear(h, w)
        return F.linear(h, w)

    def _residual(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding in the residual stream's dtype: ``residual_dtype`` under autocast, else unchanged."""
        if self.residual_dtype is None or not torch.is_autocast_enabled(emb.device.type):
            return emb
        return emb.to(self.residual_dtype)

    def _add_positions(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x (B, T, d) at positions pos..pos+T-1 plus the learned position embedding (per slice when packed)."""
        T = x.shape[1]
        if self.pos.dim() == 3:  # packed (P, positions, d): slice p of the batch gets pos[p]
            P = self.pos.shape[0]
            return (x.view(P, -1, T, x.shape[-1]) + self.pos[:, None, pos : pos + T].to(x.dtype)).view(x.shape)
        return x + self.pos[pos : pos + T].to(x.dtype)

    def trunk(self, emb: torch.Tensor, pos: int = 0) -> torch.Tensor:
        """The blocks over embeddings (B, T, d) of positions pos..pos+T-1 (learned positions added first)."""
        x = emb if self.pos is None else self._add_positions(emb, pos)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return x  # (B, T, d), before the final norm

    def forward(self, tokens: torch.Tensor, targets: bool = True):
        """tokens: (B, T + L) with L = cfg.lookahead (targets appended) or (B, T) for inference.

        Returns (logits of the main head for the first T positions, dict of losses or None).
        """
        cfg = self.cfg
        L = cfg.lookahead if targets else 0
        T = tokens.shape[1] - L
        # embed once over every position any head needs; causal, so the first T rows equal embed(tokens[:, :T])
        return self.body_and_loss(self.embed.lookup(tokens[:, : T + max(L - 1, 0)]), tokens, T, targets)

    def set_mlp_kernel(self, on: bool) -> None:
        """Every SwiGLU (trunk and extra heads) computes silu(gate) * up with overtok.kernels.swiglu (on) or torch."""
        self._set_kernel(SwiGLU, on)

    def set_rope_kernel(self, on: bool) -> None:
        """Every attention layer (trunk and extra heads) rotates its queries and keys with overtok.kernels.rope_qkv
        (on; training and full-sequence forwards) or torch (off, and always for cached generation)."""
        self._set_kernel(Attention, on)

    def _set_kernel(self, kind: type[nn.Module], on: bool) -> None:
        for m in self.modules():
            if isinstance(m, kind):
                m.kernel = on

    def sparse_tables(self) -> list[RowSparseTable]:
        return [m for m in self.modules() if isinstance(m, RowSparseTable)]

    def sharded_tables(self) -> list[ShardedTable | ShardedRowSparseTable]:
        return [m for m in self.modules() if isinstance(m, (ShardedTable, ShardedRowSparseTable))]

    def body_and_loss(self, looked_up: tuple[torch.Tensor, torch.Tensor | None], tokens: torch.Tensor, T: int,
                      targets: bool):
        """Everything after the embedding's lookups (``OverEncoding.lookup``): the OE mix, the trunk, the heads and
        losses. The trainer compiles this part."""
        cfg = self.cfg
        emb = self._residual(self.embed.mix(*looked_up))
        h = self.trunk(emb[:, :T])
        if not targets:
            return self.logits(self.norm(h)), None
        logits, loss = self._head_loss(self.norm(h), self._target(tokens, T, 1))
        losses = {"next": loss}
        total = losses["next"]
        h_prev = h
        for j, head in enumerate(self.extra, start=2):
            if cfg.od_mode == "linear":
                hj = self.norm(head(h))
            elif cfg.od_mode == "mtp":
                hj = self.extra_norms[j - 2](head(h, self.rope_cos, self.rope_sin))
            else:
                h_prev = head(h_prev, emb[:, j - 1 : j - 1 + T], self.rope_cos, self.rope_sin)
                hj = self.extra_norms[j - 2](h_prev)
            losses[f"head{j}"] = self._head_loss(hj, self._target(tokens, T, j))[1]
            total = total + cfg.extra_head_lambda * losses[f"head{j}"]
        losses["total"] = total
        return logits, losses

    def _target(self, tokens: torch.Tensor, T: int, j: int) -> torch.Tensor:
        """Target for the head predicting t+j: the token, or the joint next-n-gram id for n-gram output."""
        n = self.cfg.output_ngram
        if n == 1:
            return tokens[:, j : j + T]
        V = self.cfg.vocab_size
        tgt = torch.zeros_like(tokens[:, j : j + T])
        for i in range(n):  # id = sum_i x_{t+1+i} * V^i, first token the least significant digit
            tgt = tgt + tokens[:, j + i : j + i + T] * V**i
        return tgt

    def _head_loss(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits, mean cross-entropy) of the shared head on normed states h; with ``fused_loss`` the logits are
        never materialised for the caller (None) and the loss comes from overtok.kernels."""
        if not self.fused_loss:
            logits = self.logits(h)
            return logits, self._ce(logits, target)
        from overtok.kernels import linear_cross_entropy

        w = self.head_weight()
        P = self.pack
        loss = linear_cross_entropy(h.reshape(P, -1, h.shape[-1]), w if w.dim() == 3 else w[None], target.reshape(P, -1))
        return None, loss if P > 1 else loss[0]

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.pack == 1:
            return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        # packed: the batch is P slices stacked; one mean per slice
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
        return ce.view(self.pack, -1).mean(1)

    def next_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Marginal over the next token: for n-gram output, sum the joint distribution's probability mass."""
        n = self.cfg.output_ngram
        if n == 1:
            return logits
        V = self.cfg.vocab_size
        lp = logits.float().log_softmax(-1).view(*logits.shape[:-1], V ** (n - 1), V)
        return lp.logsumexp(-2)  # first token is the least significant digit

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new: int, stop_id: int | None = None, temperature: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 is_stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Sample continuations of (B, T0) prompts; returns (B, T0 + max_new) (fewer if every row stopped).

        A row stops at ``stop_id`` (or where ``is_stop`` of its new token is true, e.g. an n-gram id holding EOS);
        after that it is padded with ``stop_id``. Stopped rows leave the batch (their caches are compacted once a
        quarter of the rows has stopped), so a few long samples do not keep the whole batch running.
        With ``use_cache`` each new token costs one position (keys/values of earlier positions are kept) while the
        sequence fits the context (seq_len); after that, and without the cache, every step re-runs the window of
        the last seq_len tokens. Both give the same samples.
        """
        if is_stop is None and stop_id is not None:
            is_stop = lambda t: t == stop_id  # noqa: E731
        B, T0 = prompt.shape
        out = torch.full((B, T0 + max_new), stop_id if stop_id is not None else 0, dtype=prompt.dtype,
                         device=prompt.device)
        out[:, :T0] = prompt
        # rows still sampling (indices into out); compaction needs every rank to see the same batch when a
        # row-sharded table makes each lookup a collective, so it is off there
        rows = torch.arange(B, device=prompt.device)
        compact = is_stop is not None and not self.sharded_tables()
        max_pos = self.cfg.seq_len
        caches = None
        if use_cache and T0 <= max_pos and self.pack == 1:
            caches = self._new_caches(B, max_pos, prompt.device)
            logits = self._cached_step(self.embed(prompt), caches)
        # OE hashes the n-1 previous tokens: the embedding of a new token needs a window of n
        window = max(self.cfg.oe.n, 1) if self.embed.num_slices else 1
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        end = T0
        for t in range(T0, T0 + max_new):
            if caches is None:
                logits, _ = self(out[rows, max(0, t - self.cfg.seq_len) : t], targets=False)
            lp = self.next_token_logits(logits[:, -1]).float() / temperature
            nxt = torch.multinomial(lp.softmax(-1), 1, generator=generator)[:, 0]
            if is_stop is not None:
                nxt = torch.where(done, out[rows, t], nxt)  # a stopped row keeps its padding
                done = done | is_stop(nxt)
            out[rows, t] = nxt
            end = t + 1
            if compact:
                n_done = int(done.sum())
                if n_done == len(rows):
                    break
                if n_done * 4 >= len(rows):  # drop stopped rows from the batch and their caches
                    keep = (~done).nonzero()[:, 0]
                    rows, done, logits = rows[keep], done[keep], logits[keep]
                    if caches is not None:
                        for c in caches:
                            c["k"], c["v"] = c["k"][keep], c["v"][keep]
            elif is_stop is not None and self._all_ranks(done.all()):
                break
            if caches is not None:
                if caches[0]["pos"] >= max_pos:
                    caches = None  # past the context: windowed recomputation from here on
                else:
                    new = out[rows, max(0, t + 1 - window) : t + 1]
                    logits = self._cached_step(self.embed(new)[:, -1:], caches)
        return out[:, :end]

    def _all_ranks(self, flag: torch.Tensor) -> bool:
        """A stop decision every rank agrees on: with a row-sharded table each lookup is a collective, so all ranks
        must run the same number of steps."""
        if self.sharded_tables():
            import torch.distributed as dist

            flag = flag.to(torch.int32).clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def _new_caches(self, batch: int, max_pos: int, device) -> list[dict]:
        H = self.cfg.n_heads
        hd = self.cfg.d_model // H
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.rope_cos.dtype
        return [{"k": torch.zeros(batch, H, max_pos, hd, device=device, dtype=dtype),
                 "v": torch.zeros(batch, H, max_pos, hd, device=device, dtype=dtype), "pos": 0} for _ in self.blocks]

    def _cached_step(self, emb: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Run new positions (B, T, d) through the trunk with KV caches; returns their logits."""
        x = self._residual(emb)
        if self.pos is not None:
            x = self._add_positions(x, caches[0]["pos"])
        for block, cache in zip(self.blocks, caches):
            x = block(x, self.rope_cos, self.rope_sin, cache)
            cache["pos"] += emb.shape[1]
        return self.logits(self.norm(x))


class MTPModule(nn.Module):
    """DeepSeek-V3 MTP module k: h_k = Block(W [RMSNorm(h_{k-1}); RMSNorm(Emb(x_{t+k}))]), shared head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_h = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm_e = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.merge = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.merge(torch.cat([self.norm_h(h_prev), self.norm_e(emb_next)], dim=-1))
        return self.block(x, cos, sin)
