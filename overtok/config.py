"""Typed, strict run configuration.

Dataclasses are the schema; values come from defaults < YAML file < ``--set key=value`` overrides.
Unknown keys, wrong types and impossible shapes raise :class:`ConfigError`, which names the file,
the line when known, the dotted key and the problem. The CLI turns it into one line and exit 2.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a config or sweep file: names the file, line, key and problem."""

    def __init__(self, problem: str, *, file: str | None = None, key: str | None = None, line: int | None = None):
        self.problem, self.file, self.key, self.line = problem, file, key, line
        where = str(file) if file else "<config>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key + ': ' if key else ''}{problem}")


# ----------------------------------------------------------------------------------------------
# YAML: safe loader that reads 1e17 / 3e-4 as floats (PyYAML's YAML 1.1 resolver wants a dot)
# and records the line of every dotted key so errors can point at it.

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_ch] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_ch, []) if tag != "tag:yaml.org,2002:float"
    ]
    _Loader.yaml_implicit_resolvers[_ch].insert(0, ("tag:yaml.org,2002:float", _FLOAT_RE))


MAX_YAML_NODES = 100_000
"""Nodes a config or sweep file may expand to (aliases counted at every use): a few hundred bytes of nested
aliases can otherwise expand to billions of nodes."""


def _check_node(node: yaml.Node, budget: list[int]) -> None:
    """Duplicate keys are refused (naming their line); the expansion is counted against ``budget``."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"expands to more than {MAX_YAML_NODES:,} YAML nodes (nested aliases?)",
                          line=node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = str(k.value)
            if key in seen:
                raise ConfigError("duplicate key", key=key, line=k.start_mark.line + 1)
            seen.add(key)
            _check_node(v, budget)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_node(v, budget)


def _node_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[key] = k.start_mark.line + 1
            _node_lines(v, key, out)


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML mapping with the safe loader; return (data, {dotted key: line})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is not None:
            try:
                _check_node(node, [MAX_YAML_NODES])
            except ConfigError as e:
                raise ConfigError(e.problem, file=str(path), key=e.key, line=e.line) from None
            except RecursionError:
                raise ConfigError("nested too deeply", file=str(path)) from None
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        msg = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error: {msg}", file=str(path), line=line) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", file=str(path), line=1)
    lines: dict[str, int] = {}
    if node is not None:
        _node_lines(node, "", lines)
    return data, lines


def parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value with the same rules as the YAML files (safe loader, expansion limit)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is not None:
            _check_node(node, [MAX_YAML_NODES])
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        msg = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"value {text[:80]!r} is not valid YAML: {msg}") from None
    except RecursionError:
        raise ConfigError(f"value {text[:80]!r} is nested too deeply") from None


# ----------------------------------------------------------------------------------------------
# The schema


@dataclass
class OEConfig:
    """Over-Encoding (Huang et al. 2025, Alg. 1): hashed n-gram input embeddings."""

    n: int = 1
    """Largest n-gram order; 1 turns Over-Encoding off (plain token embedding)."""
    k: int = 1
    """Slices (tables) per order 2..n, each with its own modulus."""
    m: int = 0
    """Rows per table ("OE-m"); slice i uses modulus m + step*i."""
    step: int = 2
    """Modulus step between consecutive slices (the paper uses 2)."""
    odd_moduli: bool = False
    """Round every modulus up to an odd number (avoids moduli sharing a factor 2 with V)."""
    stop_at_eos: bool = False
    """Do not look back across an EOS token (document boundary). Off in the paper."""
    sparse_update: bool = False
    """Row-sparse tables: gather, gradient and update only for the rows a batch touches (overtok/sparse.py), by the
    rule of ``sparse_mode``. False = an nn.Embedding updated by dense AdamW (the reference)."""
    sparse_mode: Literal["lazy", "exact"] = "lazy"
    """With sparse_update: 'exact' follows dense AdamW's trajectory (a row touched after s idle steps first gets, in
    closed form, the momentum tail, moment decay and weight decay dense AdamW would have applied in those steps;
    every row is brought up to date before evaluation and checkpoints); 'lazy' is torch.optim.SparseAdam's rule (idle
    rows stand still, moments of idle rows do not decay). Recorded in every run as the ``optimizer`` param."""
    table_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of row-sparse tables and their Adam moments (bfloat16 halves their memory; row updates are
    rounded stochastically, so updates below half a bf16 ulp still move a row in expectation)."""
    table_init_std: float = 0.02
    """Standard deviation of the normal initialisation of the n-gram table rows (0 = zeros)."""
    combine: Literal["mean", "sum"] = "mean"
    """How the 1-gram embedding and the k*(n-1) projected slices are combined: 'mean' divides their sum by
    1 + k*(n-1) (paper Alg. 1), 'sum' does not."""
    allow_degenerate: bool = False
    """Accept a modulus under which some earlier token of the n-gram collapses (m / gcd(m, V^j) < min(m, V) for a
    j in 1..n-1), e.g. m = 64 V, the paper's Table 4 control. Refused unless this is true."""
    shard: bool = False
    """Data-parallel trials: split the table row-wise over the workers (paper sec. 3.3, overtok/sharded.py), ids
    and rows exchanged all-to-all, so the table grows with the number of GPUs. A single process holds it whole.
    Dense shards get AdamW; with sparse_update, row-sparse shards get lazy Adam from their rows' owners (the only
    way to use row-sparse tables with several workers)."""


@dataclass
class ModelConfig:
    """Decoder-only transformer; every input/output variant is a field here, never a fork."""

    vocab_size: int = 0
    """Base vocabulary V; 0 = take it from the data (grammar or tokenizer)."""
    d_model: int = 64
    """Width of the residual stream."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (d_model / n_heads must be even)."""
    mlp_hidden: int = 0
    """MLP hidden width; 0 = 8/3 * d_model rounded up to a multiple of 32 (swiglu) or 4 * d_model (gelu)."""
    seq_len: int = 128
    """Context length in model positions."""
    tie_embeddings: bool = True
    """Share the 1-gram input embedding with the output head (only when input and output vocab agree)."""
    pos_encoding: Literal["rope", "learned"] = "rope"
    """Positions: 'rope' (rotary, in attention) or 'learned' (a GPT-2-style absolute position embedding added to the
    input, one row per context position, initialised N(0, pos_init_std))."""
    pos_init_std: float = 0.02
    """With pos_encoding: learned, the standard deviation of the position embedding's initialisation."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP of every block: 'swiglu' (Llama/OLMo2) or 'gelu' (GPT-2: d -> 4d -> d with exact (erf) GELU)."""
    embed_init_std: float = 0.02
    """Standard deviation of the 1-gram token embedding's initialisation (also the head's when tied). PyTorch's
    nn.Embedding default is 1.0."""
    rope_theta: float = 10000.0
    """RoPE base period (pos_encoding: rope)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    oe: OEConfig = field(default_factory=OEConfig)
    od_depth: int = 1
    """Number of future tokens predicted (t+1..t+n); 1 is the plain next-token baseline."""
    od_mode: Literal["linear", "mtp", "mtp_ds"] = "linear"
    """Extra heads: 'linear' (OD, paper App. C), 'mtp' (parallel heads with a block each),
    'mtp_ds' (DeepSeek-V3 sequential modules; with OE this is OT)."""
    od_lambda: float | None = None
    """Weight of each extra head's loss; None = 1.0 for linear/mtp, 0.1 for mtp_ds."""
    od_rank: int = 0
    """Low-rank projection for 'linear' OD heads (0 = full d_model x d_model)."""
    tokenizer_ngram: int = 1
    """n-gram tokenizer baseline: input and output tokens are n-grams of V (V^n ids), n-times shorter sequences."""
    output_ngram: int = 1
    """n-gram output: predict the next n tokens jointly over V^n classes (small V only)."""

    @property
    def mlp_hidden_size(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 32 * -(-(8 * self.d_model // 3) // 32)

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size**self.tokenizer_ngram

    @property
    def output_vocab_size(self) -> int:
        return self.vocab_size ** max(self.tokenizer_ngram, self.output_ngram)

    @property
    def extra_head_lambda(self) -> float:
        if self.od_lambda is not None:
            return self.od_lambda
        return 0.1 if self.od_mode == "mtp_ds" else 1.0

    @property
    def lookahead(self) -> int:
        """Tokens past the context each sample needs (targets for t+1..t+L)."""
        return max(self.od_depth, self.output_ngram)

    def oe_moduli(self) -> list[tuple[int, int]]:
        """(order, modulus) for every OE slice, slices counted across all orders."""
        out = []
        for j in range(2, self.oe.n + 1):
            for _ in range(self.oe.k):
                mod = self.oe.m + self.oe.step * len(out)
                if self.oe.odd_moduli and mod % 2 == 0:
                    mod += 1
                out.append((j, mod))
        return out


@dataclass
class DataConfig:
    kind: Literal["cfg", "text"] = "cfg"
    """'cfg': sentences sampled on the fly from a grammar; 'text': shards made by `overtok data prepare`."""
    grammar: str = "cfg3f"
    """Packaged grammar name (cfg3b..cfg3k) or a path to a Physics-of-LMs JSON rule table."""
    cfg_sampler: Literal["block", "sentence"] = "block"
    """kind: cfg: 'block' draws sentences 64 at a time with numpy (fast enough for a GPU); 'sentence' one at a time in
    Python, the stream of runs made before the block sampler (same distribution, other sentences; ~10x slower)."""
    path: str = ""
    """Directory written by `overtok data prepare` (kind: text); '' = prepared from ``corpus`` into a cache."""
    corpus: str = ""
    """kind: text without ``path``: raw files or a directory (e.g. ../shared/data/text), tokenized once into
    results/data/<hash> before any training starts."""
    tokenizer: str = ""
    """With ``corpus``: an HF tokenizer.json path, or bpe:<V> to train a BPE on the corpus."""
    exclude: str = ""
    """With ``corpus``: comma-separated file-name patterns (fnmatch, e.g. 'sympy-*,cpython-*') of corpus files to
    leave out; '' = every file."""
    max_docs: int = 0
    """With ``corpus``: use N documents drawn at random across all sources (seeded; 0 = all). Documents are the
    corpus's own (a source file, an address) cut into pieces of at most 16K characters (overtok.data.text)."""
    val_fraction: float = 0.01
    """With ``corpus``: fraction of every source's text held out for validation (whole documents, at least one per
    source with two or more)."""
    text_sampler: Literal["epoch", "random"] = "epoch"
    """kind: text, training windows: 'epoch' reads the training split as disjoint windows in a shuffled order, each
    window once per epoch (new order and window offset every epoch), so that before the first epoch ends the training
    loss is measured on text the model has not seen, as in the paper's single-pass runs; 'random' draws every window at
    a uniformly random offset, with replacement (the stream of runs made before this field: after 0.5 epochs about 40%
    of a batch's tokens were already trained on)."""
    batch_size: int = 16
    """Sequences per micro-batch."""


@dataclass
class TrainConfig:
    lr: float = 3e-3
    """Peak learning rate (after warm-up) of every parameter group."""
    min_lr_ratio: float = 0.1
    """Final learning rate of cosine and WSD schedules, as a fraction of lr."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay on matrices; none on norms and biases."""
    embed_weight_decay: float = 0.0
    """Weight decay on the token embedding and OE tables (off by default, as usual for embeddings)."""
    table_weight_decay: float | None = None
    """Weight decay on the OE n-gram tables alone; None = embed_weight_decay."""
    beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""
    warmup_steps: int = 20
    """Optimizer steps of linear warm-up."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warm-up: cosine to min_lr_ratio * lr at max_steps, WSD (constant, then a linear decay over decay_fraction of the steps), or constant."""
    decay_fraction: float = 0.2
    """WSD: fraction of steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (OE tables included) to this; 0 = no clipping."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each data.batch_size sequences)."""
    max_steps: int = 200
    """Optimizer steps of the run (each consumes tokens_per_step base tokens; logged metrics use tokens as their step)."""
    eval_every: int = 50
    """Evaluate every this many optimizer steps (and at the last step)."""
    eval_batches: int = 4
    """Validation batches per evaluation (their windows spread over the whole held-out split)."""
    gen_samples: int = 64
    """CFG only: sentences sampled at the final evaluation for generation accuracy (0 = skip). Where fewer than half
    of the grammar's sentences fit model.seq_len, samples mostly run past the context and can hardly be accepted:
    `overtok plan`, `sweep` and `train` then print a note (overtok.data.generation_note)."""
    gen_every: int = 0
    """CFG only: also measure generation accuracy every this many steps (0 = only at the end)."""
    log_every: int = 10
    """Log training metrics every this many optimizer steps."""
    checkpoint_every: int = 100
    """Checkpoint every this many optimizer steps."""
    checkpoint_dir: str = ""
    """Where checkpoints go; '' = results/checkpoints/<run name>. A run resumes from the latest one there."""
    checkpoint_final: bool = True
    """Also checkpoint at the last step (a finished trial whose status was lost resumes without retraining).
    Turn off for runs with huge OE tables: a checkpoint holds the tables and their optimizer moments."""
    grad_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """Data-parallel trials (resources.workers > 1): the dtype in which DDP all-reduces gradients. 'bfloat16' sends
    half the bytes (gradients rounded to bf16 before averaging, cast back after; the optimizer still sees float32
    gradients), for interconnects slower than NVLink. Changes the numbers by bf16 rounding, so it is part of the
    trial id. Ignored in one process."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """'auto' = bf16 autocast on CUDA, float32 on CPU."""
    residual_dtype: Literal["float32", "bfloat16"] = "float32"
    """The residual stream between blocks under bf16 autocast (ignored without it): 'float32' (the embedding's
    dtype) or 'bfloat16', which halves the memory traffic of norms and residual adds (benchmarks/RESULTS.md,
    section 1) at bf16 rounding of the stream."""


@dataclass
class RuntimeConfig:
    """How a run executes: compilation, kernels, CUDA graphs, placement. Nothing here changes what is trained (at
    most the order of float summations), so the section is not part of the trial id. Numerics choices (train.dtype,
    train.residual_dtype, train.grad_reduce_dtype) stay in ``train``: they round differently."""
    compile: bool = False
    """torch.compile the body, heads and loss (and on CUDA the OE ids and row updates)."""
    loss_kernel: Literal["auto", "triton", "torch"] = "auto"
    """Output head + cross-entropy. 'triton': overtok.kernels, one kernel over the logits that leaves their gradient in
    place (needs triton: CUDA, or the CPU under TRITON_INTERPRET=1); 'torch': the stock loss; 'auto': triton on
    CUDA where it imports, else torch. Same loss and gradients up to summation order."""
    mlp_kernel: Literal["auto", "triton", "torch"] = "auto"
    """SwiGLU's silu(gate) * up. 'triton': overtok.kernels.swiglu, whose backward reads gate, up and the gradient
    once and writes both halves of the projection's gradient (docs/performance.md); same needs as loss_kernel;
    'torch': torch ops (compiled with the body); 'auto': triton on CUDA where it imports, else torch. Both compute in
    fp32 and round once."""
    rope_kernel: Literal["auto", "triton", "torch"] = "auto"
    """Rotary embedding of queries and keys in training forwards. 'triton': overtok.kernels.rope_qkv, one kernel that
    reads the qkv projection's output once and writes the attention's inputs, and one that writes the projection's
    gradient in one pass (inductor took two); same needs as loss_kernel; 'torch': torch ops (compiled with the body);
    'auto': triton on CUDA where it imports, else torch. Both compute in fp32 and round once. Cached generation always
    uses torch."""
    cuda_graphs: bool = True
    """With runtime.compile on a CUDA device, in one process: replay the training step as CUDA graphs (what they hold:
    runtime.cuda_graph_scope), so a step costs the host a few launches instead of one per kernel. Ignored elsewhere
    (CPU, no compile, data-parallel trials, train.grad_accum > 1). Same kernels, same results."""
    cuda_graph_scope: Literal["step", "compiled"] = "step"
    """Where runtime.cuda_graphs applies: what one CUDA graph replays. 'compiled': the compiled body, heads and loss
    (torch.compile's reduce-overhead mode; the host still issues the lookups, clipping and AdamW, and checks the
    graphs' inputs every step). 'step' (the default): the whole training step, recorded by the trainer after a few
    eager steps (overtok.engine.StepGraph): forward, backward, gradient clipping and AdamW, which then reads its learning rates
    from GPU tensors, the host issuing only the copies of the batch and learning rates and one launch; the body
    compiled in torch.compile's default mode. Packed trials too. 'step' needs dense parameters (no row-sparse OE
    tables, which update outside autograd); with them it acts as 'compiled'. The same results up to float rounding;
    perf/step_graph records where it took effect (docs/performance.md)."""
    compile_eval: Literal["auto", "always", "never"] = "auto"
    """With runtime.compile: whether validation forwards run compiled too. Without gradients the forward is a second
    graph, so compiling it costs a second compilation (seconds to tens of seconds on a GPU), while eager costs a few
    milliseconds more per batch. 'auto' compiles it only for runs that evaluate at least
    overtok.engine.EVAL_COMPILE_MIN_BATCHES batches in all. The same losses up to summation order; perf/compiled_eval
    records the choice."""
    ddp_bucket_mb: float = 25.0
    """Data-parallel trials: DDP's gradient bucket size in MiB (torch's default 25). Each bucket is all-reduced as soon
    as its gradients are ready, and under runtime.compile the compiled graph is split at bucket boundaries so that the
    reduction overlaps the rest of the backward pass: larger buckets mean fewer collectives and fewer graph splits,
    less overlap. The same averages."""
    device: str = "auto"
    """'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:<index>'."""
    fail_at_step: int = -1
    """Testing aid: raise at this step (to exercise failure handling). -1 = never."""


@dataclass
class TrackingConfig:
    tracking_uri: str = ""
    """'' = $MLFLOW_TRACKING_URI, else sqlite:///<project>/results/mlflow.db."""
    experiment: str = "overtok"
    """MLflow experiment of `overtok train` runs (sweeps use the sweep name)."""
    run_name: str = ""
    """MLflow run name; '' = the config's name."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: 1-64 ASCII letters, digits, '-' and '_' (a sweep sets it to the sweep name)."""
    seed: int = 0
    """Seed of the model initialisation and the training batches, in [0, 2^32)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def tokens_per_step(self) -> int:
        """Base tokens consumed per optimizer step (n-gram tokenizer: n base tokens per position)."""
        m = self.model
        return self.data.batch_size * self.train.grad_accum * m.seq_len * m.tokenizer_ngram


# ----------------------------------------------------------------------------------------------
# Building dataclasses from dicts, strictly


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args:
        return " | ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"must be one of {_type_name(tp)}, got {value!r}", key=key)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true/false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}", key=key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
            return int(value)  # 1e6 written for a count
        raise ConfigError(f"expected an integer, got {value!r}", key=key)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        if isinstance(value, (int, float)):
            return float(value)
        raise ConfigError(f"expected a number, got {value!r}", key=key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", key=key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", key=key)
        return from_dict(tp, value, prefix=key)
    raise TypeError(f"unsupported config type {tp} at {key}")  # internal: schema uses only the above


def runtime_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RuntimeConfig)}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names and cls is TrainConfig and k in runtime_fields():
            raise ConfigError(f"moved to runtime.{k} (how a run executes, not part of the trial id)", key=key)
        if k not in names:
            raise ConfigError(f"unknown key (allowed: {', '.join(sorted(names))})", key=key)
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def stored_config(data: dict) -> RunConfig:
    """A RunConfig from a config dict that a checkpoint or a run stored, also one written before the ``runtime``
    section existed (its fields then sat in ``train``)."""
    data = {**data, "train": dict(data.get("train", {})), "runtime": dict(data.get("runtime", {}))}
    for k in runtime_fields() & set(data["train"]):
        data["runtime"].setdefault(k, data["train"].pop(k))
    return from_dict(RunConfig, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{p}' is not a section", key=key)
        cur = nxt
    cur[parts[-1]] = value


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def degenerate_modulus(vocab_size: int, order: int, modulus: int) -> str | None:
    """Why ``modulus`` degenerates the n-gram hash of ``order`` over vocabulary V, or None.

    The token j places back enters the hash as ``x * (V^j mod m)``; over the V tokens this takes
    ``m / gcd(m, V^j)`` distinct values, so the token collapses (beyond what a table of m rows must) when that is
    below min(m, V). m a multiple of V (the paper's Table 4 control, m = 64 V) keeps only x_t mod m of an n-gram.
    """
    for j in range(1, order):
        distinct = modulus // math.gcd(modulus, vocab_size**j)
        if distinct < min(modulus, vocab_size):
            return (f"modulus {modulus} (order {order}) shares the factor {modulus // distinct} with V^{j} "
                    f"(V = {vocab_size}): the token {j} back takes only {distinct} of min(m, V) = "
                    f"{min(modulus, vocab_size)} values in the hash")
    return None


# ----------------------------------------------------------------------------------------------
# Validation of shapes: one place, raising errors that name the key


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d{1,2})?")


def cuda_index(device: str) -> int | None:
    """The CUDA device index a runtime.device names ('cuda' is 0), or None for 'auto' and 'cpu'."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float field of the config is a finite number (no .inf / .nan anywhere)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"must be a finite number, got {value}", key=key)


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "required: 1-64 ASCII letters, digits, '-' and '_', starting with a letter or digit"


def validate(cfg: RunConfig) -> RunConfig:
    m, oe, t, d, r = cfg.model, cfg.model.oe, cfg.train, cfg.data, cfg.runtime

    def need(cond: bool, key: str, problem: str) -> None:
        if not cond:
            raise ConfigError(problem, key=key)

    need(NAME_RE.fullmatch(cfg.name) is not None, "name", f"{NAME_RULE}, got {cfg.name!r}")
    need(0 <= cfg.seed < 2**32, "seed", f"must be an integer in [0, 2^32), got {cfg.seed}")
    _check_finite(cfg)
    need(DEVICE_RE.fullmatch(r.device) is not None, "runtime.device",
         f"must be auto, cpu, cuda or cuda:<index>, got {r.device!r}")
    need(0 <= t.beta1 < 1, "train.beta1", f"must be in [0, 1), got {t.beta1}")
    need(0 <= t.beta2 < 1, "train.beta2", f"must be in [0, 1), got {t.beta2}")
    need(t.weight_decay >= 0 and t.embed_weight_decay >= 0, "train.weight_decay" if t.weight_decay < 0
         else "train.embed_weight_decay", "must be >= 0")
    need(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    need(not d.exclude or bool(d.corpus), "data.exclude", "needs data.corpus (it names corpus files to leave out)")
    need(d.max_docs >= 0, "data.max_docs", f"must be >= 0 (0 = all), got {d.max_docs}")
    need(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
    need(m.norm_eps > 0, "model.norm_eps", f"must be > 0, got {m.norm_eps}")
    need(m.od_lambda is None or m.od_lambda >= 0, "model.od_lambda", f"must be >= 0, got {m.od_lambda}")
    need(t.gen_every >= 0, "train.gen_every", f"must be >= 0, got {t.gen_every}")
    need(r.fail_at_step >= -1, "runtime.fail_at_step", f"must be >= -1 (-1 = never), got {r.fail_at_step}")

    for key, val in [
        ("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
        ("model.seq_len", m.seq_len), ("data.batch_size", d.batch_size), ("train.max_steps", t.max_steps),
        ("train.grad_accum", t.grad_accum), ("train.eval_every", t.eval_every), ("train.log_every", t.log_every),
        ("train.checkpoint_every", t.checkpoint_every), ("train.eval_batches", t.eval_batches),
    ]:
        need(val >= 1, key, f"must be >= 1, got {val}")
    need(m.vocab_size >= 0, "model.vocab_size", f"must be >= 0, got {m.vocab_size}")
    need(m.mlp_hidden >= 0, "model.mlp_hidden", f"must be >= 0, got {m.mlp_hidden}")
    need(m.d_model % m.n_heads == 0, "model.d_model", f"{m.d_model} is not divisible by n_heads={m.n_heads}")
    need((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "head dimension d_model/n_heads must be even (RoPE)")
    need(oe.n >= 1, "model.oe.n", f"n-gram order must be >= 1, got {oe.n}")
    need(oe.k >= 1, "model.oe.k", f"must be >= 1, got {oe.k}")
    need(oe.step >= 0, "model.oe.step", f"must be >= 0, got {oe.step}")
    need(m.od_depth >= 1, "model.od_depth", f"OD depth must be >= 1, got {m.od_depth}")
    need(m.od_rank >= 0, "model.od_rank", f"must be >= 0, got {m.od_rank}")
    need(m.tokenizer_ngram >= 1, "model.tokenizer_ngram", f"must be >= 1, got {m.tokenizer_ngram}")
    need(m.output_ngram >= 1, "model.output_ngram", f"must be >= 1, got {m.output_ngram}")
    need(not (m.tokenizer_ngram > 1 and m.output_ngram > 1), "model.output_ngram",
         "n-gram output and n-gram tokenizer cannot be combined")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    need(0 < t.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    need(t.gen_samples >= 0, "train.gen_samples", "must be >= 0")
    need(r.ddp_bucket_mb > 0, "runtime.ddp_bucket_mb", f"must be > 0, got {r.ddp_bucket_mb}")
    for key, val in [("model.embed_init_std", m.embed_init_std), ("model.pos_init_std", m.pos_init_std),
                     ("model.oe.table_init_std", oe.table_init_std)]:
        need(math.isfinite(val) and val >= 0, key, f"must be a finite number >= 0, got {val}")
    need(t.table_weight_decay is None or (math.isfinite(t.table_weight_decay) and t.table_weight_decay >= 0),
         "train.table_weight_decay", f"must be a finite number >= 0, got {t.table_weight_decay}")
    need(oe.table_dtype == "float32" or oe.sparse_update, "model.oe.table_dtype",
         "bfloat16 tables need model.oe.sparse_update: true (dense AdamW keeps fp32 master weights)")
    if oe.n > 1:
        slices = oe.k * (oe.n - 1)
        need(oe.m >= 1, "model.oe.m", f"must be >= 1 when oe.n > 1, got {oe.m}")
        need(m.d_model % slices == 0, "model.d_model",
             f"{m.d_model} is not divisible by k*(n-1)={slices} (OE table width)")
    if m.vocab_size:
        v = m.input_vocab_size
        need(m.output_vocab_size <= 1 << 20, "model.output_ngram",
             f"output vocabulary V^n = {m.output_vocab_size} is too large (n-gram output needs a small V)")
        for order, mod in m.oe_moduli():
            reason = degenerate_modulus(v, order, mod)
            need(reason is None or oe.allow_degenerate, "model.oe.m",
                 f"{reason} (set model.oe.allow_degenerate: true to run it on purpose)")
    return cfg


# ----------------------------------------------------------------------------------------------
# Loading


def build_config(data: dict, *, file: str | None = None, lines: dict[str, int] | None = None) -> RunConfig:
    """Dict -> validated RunConfig; errors carry file and line."""
    try:
        return validate(from_dict(RunConfig, data))
    except ConfigError as e:
        raise ConfigError(e.problem, file=file, key=e.key, line=(lines or {}).get(e.key or "")) from None


def apply_overrides(data: dict, overrides: list[str] | None, flat_sections: tuple[str, ...] = ()) -> dict:
    """Apply ``key=value`` items. Under a section in ``flat_sections`` (a sweep's ``grid``) the rest of the key
    is one dotted name: ``grid.model.oe.n=[1, 2]`` sets ``grid["model.oe.n"]``."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}", file="--set")
        key, val = (x.strip() for x in item.split("=", 1))
        try:
            value = parse_scalar(val)
        except ConfigError as e:
            raise ConfigError(e.problem, file="--set", key=key) from None
        section, _, rest = key.partition(".")
        if section in flat_sections and rest:
            data.setdefault(section, {})[rest] = value
        else:
            set_dotted(data, key, value)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < file < --set overrides."""
    data, lines = (load_yaml(path) if path else ({}, {}))
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as e:
        raise ConfigError(e.problem, file=str(path) if path else "--set", key=e.key) from None
    return build_config(data, file=str(path) if path else "--set", lines=lines)


# ----------------------------------------------------------------------------------------------
# Documentation of every field, read from the schema's source (the string under each field)


def field_docs() -> dict[str, str]:
    """{dotted key: the docstring under the field} for every field of RunConfig, read from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["_"])))
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs: dict[str, str] = {}
            body = node.body
            for a, b in zip(body, body[1:] + [None]):
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
                    doc = ""
                    if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                        doc = " ".join(b.value.value.split())
                    docs[a.target.id] = doc
            by_class[node.name] = docs
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
            else:
                out[key] = by_class.get(cls.__name__, {}).get(f.name, "")

    walk(RunConfig, "")
    return out


def config_reference() -> str:
    """docs/config.md: every field with its type, default and documentation, by section."""
    hints_of: dict[str, Any] = {}

    def types_of(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                types_of(hints[f.name], f"{prefix}{f.name}.")
            else:
                hints_of[f"{prefix}{f.name}"] = hints[f.name]

    types_of(RunConfig, "")
    defaults = flatten(to_dict(RunConfig()))
    docs = field_docs()
    lines = ["# Configuration reference", "",
             "Generated from `overtok/config.py` by `overtok config reference > docs/config.md` (a test checks it is "
             "current). Values come from defaults < YAML file < `--set key=value`; `overtok config show [CONFIG] "
             "[--set ...]` prints a resolved config with these notes.", ""]
    section = None
    for key, doc in docs.items():
        top = key.split(".")[0] if "." in key else "(top level)"
        if top != section:
            section = top
            lines += ([""] if lines[-1] else []) + [f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | {_type_name(hints_of[key]).replace('|', '/')} | `{defaults[key]!r}` | "
                     f"{doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def show_config(cfg: RunConfig) -> str:
    """The resolved config, one ``key: value`` line per field, with its default where it differs and its note."""
    defaults = flatten(to_dict(RunConfig()))
    docs = field_docs()
    lines = []
    for key, value in flatten(to_dict(cfg)).items():
        note = "" if value == defaults.get(key) else f"   (default {defaults.get(key)!r})"
        doc = docs.get(key, "")
        lines.append(f"{key}: {value!r}{note}" + (f"\n    # {doc}" if doc else ""))
    return "\n".join(lines)
