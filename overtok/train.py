"""Training: the one loop behind `overtok train`, every sweep trial and every pack of trials.

``train_pack(cfgs, sinks)`` trains P >= 1 configs at once: it builds the data and the models, hands the models to
the engine (overtok/engine.py: packing, kernels, compilation, CUDA graphs, DDP and table optimizers are applied
there, from outside the model code), resumes from the newest valid checkpoint, and runs the schedule: the learning
rate, evaluation (held-out loss, bits per byte, generation accuracy), checkpoints, stop requests, failure
injection, and logging through each config's sink with step = base tokens seen. ``train(cfg, sink)`` is a pack of
one; it raises :class:`TrainingDiverged` on a NaN/inf loss (callers record the status), while in a pack of several a
diverging slice is reported in its summary and the others train on.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch

from overtok import accounting
from overtok.checkpoint import check_checkpoint_config, default_checkpoint_dir, load_latest_checkpoint, save_checkpoint
from overtok.config import RunConfig, to_dict
from overtok.data.batches import Batches, group_ngrams, split_ngrams
from overtok.data.cfg import Grammar, accepts, sample_sentence
from overtok.engine import build_engine, compiled_eval, data_parallel
from overtok.model import Transformer
from overtok.optim import lr_at
from overtok.tracking import Sink

STOP_FILE = "STOP"
"""A file of this name in a run's checkpoint directory asks the run to checkpoint and stop (``overtok stop``)."""


class TrialStopped(Exception):
    """The run checkpointed and stopped on request (``overtok stop``); rerunning resumes it."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"stopped on request at step {step}")


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, reason: str):
        self.step = step
        super().__init__(f"loss became {reason} at step {step}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: Transformer, streams: list[Batches], n_batches: int, device: torch.device, autocast,
             compiled: bool = True) -> torch.Tensor:
    """Mean next-token validation loss over n_batches batches, each one batch of every stream concatenated (a packed
    model's slices in order): a float tensor, one value per slice. ``compiled`` False runs the compiled parts of the
    model eagerly (no second compilation for the forward without gradients)."""
    model.eval()
    for s in streams:
        s.rewind()
    total = torch.zeros((), device=device)
    with contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager"):
        for _ in range(n_batches):
            batch = torch.cat([s.next() for s in streams]).to(device)
            with autocast():
                _, losses = model(batch)
            total = total + losses["next"].float()
    model.train()
    return total / n_batches


def eval_loss(model: Transformer, batches: Batches, n_batches: int, device: torch.device, autocast,
              compiled: bool = True) -> float:
    return evaluate(model, [batches], n_batches, device, autocast, compiled).item()


def generation_prompts(g: Grammar, n: int, count: int, seed: int) -> torch.Tensor:
    """(count, 1) prompts for sampling sentences: one model token that ends a sentence, as in the training stream.

    With the 1-gram tokenizer that is EOS. With an n-gram tokenizer it is the n-gram (last n-1 tokens of a sentence,
    EOS), drawn from held-out sentences: a sentence starts after exactly such a token in the training stream, while
    an n-gram of n EOS tokens never occurs there (its embedding is untrained).
    """
    rng = random.Random(seed)
    rows = [(sample_sentence(g, rng)[-(n - 1):] if n > 1 else []) + [g.eos_id] for _ in range(count)]
    return group_ngrams(torch.tensor(rows, dtype=torch.long), g.vocab_size, n)


@torch.no_grad()
def generation_accuracy(model: Transformer, batches: Batches, n_samples: int, device: torch.device, seed: int,
                        batch_size: int = 0) -> float:
    """Fraction of sampled sentences (prompt: a sentence end, stop at EOS) that the grammar accepts (paper sec. 3.1).

    Sampling stops at the grammar's longest sentence plus its EOS: a longer sample cannot be accepted.
    """
    model.eval()
    batch_size = batch_size or (512 if device.type == "cuda" else 64)
    g, n = batches.grammar, model.cfg.tokenizer_ngram
    V = g.vocab_size
    # n-gram tokenizer: a row stops at the first n-gram that holds an EOS and is padded with the all-EOS n-gram
    pad = int(group_ngrams(torch.full((1, n), g.eos_id, dtype=torch.long), V, n))

    def is_stop(ids: torch.Tensor) -> torch.Tensor:
        return (split_ngrams(ids[:, None], V, n) == g.eos_id).any(-1)

    prompts = generation_prompts(g, n, n_samples, seed + 1).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ok = 0
    for start in range(0, n_samples, batch_size):
        prompt = prompts[start : start + batch_size]
        out = model.generate(prompt, max_new=-(-(g.max_len + 1) // n), stop_id=pad, is_stop=is_stop, generator=gen)
        base = split_ngrams(out[:, 1:].cpu(), V, n)
        for row in base.tolist():
            sentence = row[: row.index(g.eos_id)] if g.eos_id in row else None
            ok += bool(sentence) and accepts(g, sentence)
    model.train()
    return ok / n_samples


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, sink: Sink | None = None, device: torch.device | None = None) -> dict:
    """Train one config to cfg.train.max_steps (resuming if a checkpoint exists in its checkpoint directory); return
    its final summary metrics. Data-parallel when torch.distributed is initialised (Ray Train sets it up for
    multi-worker trials): every rank draws its own batches, rank 0 evaluates, checkpoints and logs."""
    (summary,) = train_pack([cfg], [sink], device=device)
    if "diverged" in summary:
        raise TrainingDiverged(*summary["diverged"])
    return summary


def train_pack(cfgs: list[RunConfig], sinks: list[Sink | None], checkpoint_dir: str | Path | None = None,
               device: torch.device | None = None) -> list[dict]:
    """Train P >= 1 configs (several: packable ones, overtok.packed.check_packable) in one process; returns one
    summary per config. ``checkpoint_dir``: the run's directory (default: the one config's own,
    ``overtok.checkpoint.default_checkpoint_dir``). A slice whose loss becomes NaN/inf stops logging and gets
    ``error`` (its message) and ``diverged`` (step, reason) in its summary; the others train on."""
    t_enter = time.time()
    P, cfg0, t = len(cfgs), cfgs[0], cfgs[0].train
    distributed, rank, world = data_parallel()
    hsinks = [HistorySink(s if (s and rank == 0) else Sink()) for s in sinks]
    device = device or pick_device(cfg0.runtime.device)
    train_data = [Batches(c, "train", rank, world) for c in cfgs]
    val_data = [Batches(c, "val") for c in cfgs]
    models = []
    for c in cfgs:  # each slice starts exactly where a separate run with its seed would
        torch.manual_seed(c.seed)
        with torch.device(device):  # build in place: OE tables can be tens of GB
            models.append(Transformer(c.model, eos_id=train_data[0].eos_id))
    draw = train_data[0].next if P == 1 else (lambda: torch.cat([d.next() for d in train_data]))
    engine = build_engine(models, cfgs, device, draw)
    del models
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(cfg0)
    step, tokens_seen, resumed_from = 0, 0, None
    state = load_latest_checkpoint(ckpt_dir)
    if state is not None:
        if P == 1:
            check_checkpoint_config(state, cfg0, ckpt_dir)
        engine.load(state, ckpt_dir)
        data_states = [state["data_ranks"][rank]] if P == 1 else state["data"]
        for d, s in zip(train_data, data_states):
            d.load_state_dict(s)
        torch.set_rng_state(state["rng"])
        step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], state["step"]
        print(f"[overtok] resumed {f'pack of {P} ' if P > 1 else ''}from {ckpt_dir} at step {step}")
        # re-send the curve up to the checkpoint: whatever the tracker missed (a driver killed before it wrote them)
        # fills in, and what it has is dropped there by step, so curves have no gaps
        for s, h in zip(hsinks, [state.get("history", [])] if P == 1 else state["history"]):
            s.replay(h)

    flops_per_token = accounting.flops_per_token(cfg0.model) / cfg0.model.tokenizer_ngram  # per base token
    bytes_per_token = [read_bytes_per_token(c) if c.data.kind == "text" else 0.0 for c in cfgs]  # for val/bpb
    tokens_per_step = cfg0.tokens_per_step * world  # global tokens of each slice
    summaries: list[dict] = [{} for _ in range(P)]
    alive = [True] * P
    t_last, tokens_last = time.time(), tokens_seen
    startup = {"perf/setup_s": t_last - t_enter}  # data, model, optimizer, checkpoint; then the first step
    first_step = step + 1
    # a stop request (`overtok stop`) names one trial: runs of one config in one process honour it
    stoppable = P == 1 and not distributed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def log(p: int, metrics: dict) -> None:
        if alive[p]:
            hsinks[p].log(metrics, tokens_seen)
            summaries[p].update(metrics)

    while True:
        last_step = step >= t.max_steps

        # once in a while: evaluate (and on the last step)
        if engine.evaluates and ((step % t.eval_every == 0 and step > 0) or last_step) and step != resumed_from:
            t_eval = time.time()
            engine.flush()
            val = torch.atleast_1d(evaluate(engine.model, val_data, t.eval_batches, device, engine.autocast,
                                            compiled_eval(cfg0))).tolist()
            eval_s = time.time() - t_eval  # .tolist() waited for the GPU
            for p, c in enumerate(cfgs):
                metrics = {"val/loss": val[p], "perf/eval_s": eval_s}
                if bytes_per_token[p] > 0:
                    metrics["val/bpb"] = val[p] / math.log(2) / bytes_per_token[p]
                if c.data.kind == "cfg" and t.gen_samples and (last_step or (t.gen_every and step % t.gen_every == 0)) \
                        and alive[p]:
                    metrics["val/gen_acc"] = generation_accuracy(engine.generation_model(p), val_data[p], t.gen_samples,
                                                                 device, c.seed)
                if rank == 0:
                    log(p, metrics)

        # a stop request is honoured at a logging step: checkpoint, then stop
        stopping = (stoppable and not last_step and step > 0 and step % t.log_every == 0
                    and (ckpt_dir / STOP_FILE).exists())
        # once in a while: checkpoint (not at step 0; at the end too unless checkpoint_final is off)
        if step > 0 and (step % t.checkpoint_every == 0 or (last_step and t.checkpoint_final) or stopping) \
                and step != resumed_from:
            engine.flush()
            # every rank's stream position, so that a resumed data-parallel run continues each one exactly
            data_states = engine.gather(train_data[0].state_dict()) if P == 1 else [d.state_dict() for d in train_data]
            engine.save_own(ckpt_dir, step)
            if rank == 0:
                state = {**engine.state(), "step": step, "tokens_seen": tokens_seen, "rng": torch.get_rng_state(),
                         "world": world}
                if P == 1:
                    state.update(data_ranks=data_states, config=to_dict(cfg0), history=hsinks[0].history)
                else:
                    state.update(data=data_states, configs=[to_dict(c) for c in cfgs],
                                 history=[s.history for s in hsinks])
                save_checkpoint(ckpt_dir, state)
            for s in hsinks:
                s.flush()

        if stopping:
            (ckpt_dir / STOP_FILE).unlink(missing_ok=True)
            raise TrialStopped(step)
        if last_step:
            break

        if step == cfg0.runtime.fail_at_step:
            raise RuntimeError(f"fail_at_step={step} (deliberate failure for testing)")
        lrs = [lr_at(step, c.train) for c in cfgs]
        parts, grad_norms = engine.step(lrs)
        step += 1
        tokens_seen += tokens_per_step
        if step == first_step:  # compilation happens here: worth knowing apart from the steady rate
            startup["perf/first_step_s"] = synced_since(t_last, device)
            if rank == 0:
                print(f"[overtok] {f'pack of {P}: ' if P > 1 else ''}setup {startup['perf/setup_s']:.1f} s, first "
                      f"step {startup['perf/first_step_s']:.1f} s"
                      + (" (compilation included)" if cfg0.runtime.compile else ""), flush=True)

        # logging (the host reads the device's numbers only here)
        if step % t.log_every == 0 or step == t.max_steps:
            host = {k: torch.atleast_1d(v).tolist() for k, v in parts.items()}
            norms = torch.atleast_1d(grad_norms).tolist()
            now = time.time()
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)  # of each slice, over all ranks
            t_last, tokens_last = now, tokens_seen
            for p in range(P):
                if not alive[p]:
                    continue
                total = host["total"][p]
                if not math.isfinite(total):
                    reason = "nan" if math.isnan(total) else "inf"
                    summaries[p].update(error=f"TrainingDiverged: {TrainingDiverged(step, reason)}",
                                        diverged=(step, reason))
                    hsinks[p].flush()
                    alive[p] = False
                    continue
                # train/loss is the next-token loss in every variant (comparable across OD depths); the objective
                # with the extra heads is train/loss_total
                metrics = {"train/loss": host["next"][p], "train/loss_total": total, "train/lr": lrs[p],
                           "train/grad_norm": norms[p], "perf/tokens_per_s": tps}
                if P > 1:
                    metrics.update({"perf/pack_size": P, "perf/pack_tokens_per_s": tps * P})
                metrics.update(engine.flags)
                metrics.update({f"train/loss_{k}": v[p] for k, v in host.items() if k not in ("total", "next")})
                metrics.update(startup)  # once, with the first logged step
                if train_data[p].epoch_tokens:
                    metrics["train/epochs"] = tokens_seen / train_data[p].epoch_tokens
                if device.type == "cuda":
                    metrics["perf/mfu"] = accounting.mfu(tps * P, flops_per_token, world)  # per GPU
                    metrics["perf/mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                log(p, metrics)
            startup = {}
            if not any(alive):
                break
    for p in range(P):
        summaries[p]["tokens_seen"] = tokens_seen
        hsinks[p].flush()
    return summaries


def synced_since(t0: float, device: torch.device) -> float:
    """Seconds since t0 once the device has finished the work issued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - t0


class HistorySink(Sink):
    """Keeps every logged point (saved in checkpoints) and forwards to the real sink."""

    def __init__(self, inner: Sink):
        self.inner = inner
        self.history: list[tuple[str, float, int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.extend((k, float(v), int(step)) for k, v in metrics.items())
        self.inner.log(metrics, step)

    def replay(self, history: list) -> None:
        for k, v, step in history:
            self.history.append((k, v, step))
            self.inner.log({k: v}, step)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def read_bytes_per_token(cfg: RunConfig) -> float:
    from overtok.data.text import read_meta

    return read_meta(cfg.data.path)["val_bytes_per_token"]
