"""Parameters by group, FLOPs per token and a memory estimate, from the config alone (no model built).

Groups matter here: OE tables can be 10-100x the transformer body, so scaling fits choose which
count is "N" (body only, with embeddings, with OE tables). tests/test_model.py checks these against
the built model's numel.
"""

from __future__ import annotations

from overtok.config import ModelConfig, RunConfig, flatten, to_dict


def _block_params(cfg: ModelConfig) -> int:
    d, h = cfg.d_model, cfg.mlp_hidden_size
    return 4 * d * d + 3 * d * h + 2 * d  # qkv + out, SwiGLU gate/up/down, two RMSNorm weights


def param_groups(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per group; they sum to the built model's numel."""
    d = cfg.d_model
    moduli = cfg.oe_moduli()
    slices = len(moduli)
    width = d // slices if slices else 0
    n_extra = cfg.od_depth - 1
    tied = cfg.tie_embeddings and cfg.input_vocab_size == cfg.output_vocab_size
    if cfg.od_mode == "linear":
        per_head = 2 * d * cfg.od_rank if cfg.od_rank else d * d
    elif cfg.od_mode == "mtp":
        per_head = _block_params(cfg) + d  # block + its output norm
    else:
        per_head = 2 * d + 2 * d * d + _block_params(cfg) + d  # two norms, merge, block, output norm
    return {
        "embedding": cfg.input_vocab_size * d,
        "oe_tables": sum(m for _, m in moduli) * width,
        "oe_proj": slices * width * d,
        "body": cfg.n_layers * _block_params(cfg) + d,  # + final norm
        "head": 0 if tied else d * cfg.output_vocab_size,
        "extra_heads": n_extra * per_head,
    }


def num_params(cfg: ModelConfig, convention: str = "all") -> int:
    """'body' (non-embedding, the Kaplan N), 'dense' (all but OE tables), 'all'."""
    g = param_groups(cfg)
    if convention == "body":
        return g["body"]
    if convention == "dense":
        return sum(v for k, v in g.items() if k != "oe_tables")
    return sum(g.values())


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per model position: 6 * (matmul parameters touched per token) + 12 * L * d * T attention
    (PaLM appendix B / nanoGPT). Embedding and OE-table lookups are gathers and count zero; the output head
    counts its d x V matmul even when tied, once per head that uses it."""
    g = param_groups(cfg)
    d, T = cfg.d_model, cfg.seq_len
    n_heads_out = cfg.od_depth
    matmul = (g["body"] - (2 * cfg.n_layers + 1) * d) + g["oe_proj"] + g["extra_heads"] + n_heads_out * d * cfg.output_vocab_size
    layers = cfg.n_layers + (cfg.od_depth - 1 if cfg.od_mode != "linear" else 0)
    return 6 * matmul + 12 * layers * d * T


BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet); MFU's denominator


def mfu(tokens_per_s: float, flops_per_token: float, gpus: int = 1) -> float:
    """Model FLOPs utilisation of each GPU when ``gpus`` GPUs together train ``tokens_per_s`` (global) tokens/s."""
    return tokens_per_s / gpus * flops_per_token / BF16_PEAK


# Bytes of activations kept per token, per d_model unit and per layer in a bf16-autocast step on CUDA (SDPA flash
# attention: no T x T scores kept), with the residual stream in float32 / bfloat16 (train.residual_dtype): fitted to
# measured peaks of 25M-350M models at 16-32 sequences of 1,024 (benchmarks/results/gpu_trainer_sizes.json;
# benchmarks/RESULTS.md, section 1).
CUDA_ACT_BYTES = {"float32": 42, "bfloat16": 38}


def memory_estimate_bytes(cfg: ModelConfig, batch_size: int, workers: int = 1, cuda_bf16: bool = False,
                          residual_dtype: str = "float32", fused_loss: bool = True) -> int:
    """Rough peak training memory of one process: fp32 weights, grads and two AdamW moments, plus activations; an
    OE table row-sharded over ``workers`` data-parallel processes (model.oe.shard) counts its share only.

    ``cuda_bf16`` (a bf16-autocast step on a CUDA device): activations are CUDA_ACT_BYTES per token, d_model unit
    and layer, measured, and the logits one bf16 copy per output head with the fused loss (its gradient overwrites
    them), else three fp32 copies besides. Otherwise (float32, e.g. on the CPU): Korthikanti et al. 2022, about
    34*T*B*d + 5*H*T^2*B bytes per layer at 16-bit (attention scores kept), doubled for float32, plus three fp32
    copies of the logits (logits, softmax, gradient) per output head.
    """
    g = param_groups(cfg)
    tables = g["oe_tables"]
    n_other = num_params(cfg, "all") - tables
    if cfg.oe.shard and workers > 1:
        tables = -(-tables // workers)
    # row-sparse tables: table + two moments in table_dtype, no dense gradient
    table_bytes = 3 * (2 if cfg.oe.table_dtype == "bfloat16" else 4) if cfg.oe.sparse_update else 16
    if cuda_bf16:
        act = _cuda_activation_bytes(cfg, batch_size, residual_dtype, fused_loss)
    else:
        act = _fp32_activation_bytes(cfg, batch_size)
    return 16 * n_other + table_bytes * tables + act


def _layers(cfg: ModelConfig) -> int:
    return cfg.n_layers + (cfg.od_depth - 1 if cfg.od_mode != "linear" else 0)


def _fp32_activation_bytes(cfg: ModelConfig, batch_size: int) -> int:
    d, T, B, H = cfg.d_model, cfg.seq_len, batch_size, cfg.n_heads
    act = _layers(cfg) * (34 * T * B * d + 5 * H * T * T * B) * 2
    logits = 3 * 4 * B * T * cfg.output_vocab_size * cfg.od_depth
    return act + logits


def _cuda_activation_bytes(cfg: ModelConfig, batch_size: int, residual_dtype: str, fused_loss: bool) -> int:
    tokens = cfg.seq_len * batch_size
    act = _layers(cfg) * CUDA_ACT_BYTES[residual_dtype] * tokens * cfg.d_model
    logits = (2 if fused_loss else 2 + 3 * 4) * tokens * cfg.output_vocab_size * cfg.od_depth
    return act + logits


def checkpoint_bytes(cfg: ModelConfig) -> int:
    """Size of one checkpoint: fp32 weights + two AdamW moments (row-sparse OE tables: table_dtype, 3 copies).
    Two are kept per trial; with large OE tables this is what fills disks."""
    g = param_groups(cfg)
    dense = sum(g.values()) - (g["oe_tables"] if cfg.oe.sparse_update else 0)
    tables = 3 * (2 if cfg.oe.table_dtype == "bfloat16" else 4) * g["oe_tables"] if cfg.oe.sparse_update else 0
    return 12 * dense + tables


def run_params(cfg: RunConfig) -> dict:
    """The params a run records: flat config (without tracking) plus the accounting every analysis needs (one name
    per concept, as in the Parquet export)."""
    params = flatten(to_dict(cfg))
    params = {k: v for k, v in params.items() if not k.startswith("tracking.")}
    params.update({f"params.{k}": v for k, v in param_groups(cfg.model).items()})
    params["flops_per_token"] = flops_per_token(cfg.model)
    params["tokens_per_step"] = cfg.tokens_per_step
    params["optimizer"] = optimizer_label(cfg)
    return params


def optimizer_label(cfg: RunConfig) -> str:
    """How the OE tables are optimised: dense AdamW, or row-sparse Adam in its exact or lazy mode."""
    oe = cfg.model.oe
    if not (oe.sparse_update and oe.n > 1):
        return "adamw"
    return "adamw+oe_row_adam_exact" if oe.sparse_mode == "exact" else "adamw+oe_lazy_row_adam"
