"""GPU benchmarks for issue 6, side by side in one process:

1. trainer throughput (MFU) of the baseline model at 25M / 124M / 350M body sizes, V = 50,304, seq 1024;
2. Over-Encoding at paper scale (n = 3, k = 4, d = 768): step time and peak memory vs the same model without OE,
   for dense nn.Embedding + AdamW and for row-sparse bf16 tables with lazy row-wise Adam; with --rounds N the
   model without OE stays alive and its timed blocks alternate with each variant's for N rounds;
3. packed trials at the step level: one tiny model (d 256, 4 layers, seq 512) vs 8 of them packed into one
   (overtok.packed), compiled in torch.compile's default mode or with CUDA graphs (reduce-overhead), the body alone
   or the whole forward, plus a kernel profile. The one model can also run its whole step (forward, backward,
   AdamW with its lr in a GPU tensor) as one CUDA graph recorded by hand (--single-variants whole-step-graph);
   each one-model row reports the loss of its last step (same batches and step count in every variant).

Step times: the median of steps timed one at a time (CUDA events), and a block of steps issued back to back as
the trainer issues them. --profile adds the top kernels and every kernel's time per step by category.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json [--only trainer oe packed] [--sizes 25M 124M 350M] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Bench, Rows, format_categories, interleaved, time_packed, time_training  # noqa: E402

V = 50304
SIZES = {"25M": (512, 8, 8), "124M": (768, 12, 12), "350M": (1024, 24, 16)}


def body(d, L, H, T=1024, v=V):
    return {"model.vocab_size": v, "model.d_model": d, "model.n_layers": L, "model.n_heads": H, "model.seq_len": T,
            "model.tie_embeddings": False}


# trainer variants, timed side by side per size: the loss kernel, the attention backend, inductor's mode
VARIANTS = {
    "stock": {"loss_kernel": "torch"},
    "fused": {"loss_kernel": "auto"},
    "fused+cudnn": {"loss_kernel": "auto", "sdpa": "cudnn"},
    "fused+flash": {"loss_kernel": "auto", "sdpa": "flash"},
    "fused+autotune": {"loss_kernel": "auto", "compile_mode": "max-autotune-no-cudagraphs"},
    "fused+bf16res": {"loss_kernel": "auto", "residual_dtype": torch.bfloat16},
    "fused+graphs": {"loss_kernel": "auto", "compile_mode": "reduce-overhead"},
    "fused+bf16res+autotune": {"loss_kernel": "auto", "residual_dtype": torch.bfloat16,
                               "compile_mode": "max-autotune-no-cudagraphs"},
    "fused+bf16res+graphs": {"loss_kernel": "auto", "residual_dtype": torch.bfloat16, "compile_mode": "reduce-overhead"},
    # SwiGLU's pointwise part by overtok.kernels.swiglu (runtime.mlp_kernel); inductor's coordinate-descent tuning of
    # its own kernels' launch configurations
    "fused+swiglu": {"loss_kernel": "auto", "mlp_kernel": "auto"},
    "fused+bf16res+swiglu": {"loss_kernel": "auto", "residual_dtype": torch.bfloat16, "mlp_kernel": "auto"},
    "fused+bf16res+cdt": {"loss_kernel": "auto", "residual_dtype": torch.bfloat16,
                          "compile_options": {"coordinate_descent_tuning": True}},
}
# RoPE by overtok.kernels.rope_qkv (runtime.rope_kernel); ``graph``: the whole step as one CUDA graph, as the trainer
# runs a dense model
_PARTS = {"rope": {"rope_kernel": "auto"}, "graph": {"whole_graph": True},
        "bf16res": {"residual_dtype": torch.bfloat16},
        # without inductor's mix-order reductions (RMSNorm's backward computes d(input) by rows
        # and d(weight) by columns in one kernel, which then cannot take the cast of d(input) to bf16 for the next
        # matmul: a separate kernel, 23 per 124M step)
        "nomix": {"compile_options": {"triton.mix_order_reduction": False}}}


def _parts_variant(name: str) -> dict:
    out = {"loss_kernel": "auto", "mlp_kernel": "auto"}
    for part in name.split("+")[2:]:
        extra = _PARTS[part]
        out = {**out, **extra}
    return out


for _name in ("fused+swiglu+graph", "fused+swiglu+rope", "fused+swiglu+rope+graph", "fused+swiglu+bf16res+graph",
              "fused+swiglu+bf16res+rope", "fused+swiglu+bf16res+rope+graph", "fused+swiglu+rope+graph+nomix",
              "fused+swiglu+bf16res+rope+graph+nomix"):
    VARIANTS[_name] = _parts_variant(_name)


def show_profile(r: dict) -> None:
    if "profile_top_kernels" in r:
        print(r["profile_top_kernels"], flush=True)
    if "profile_categories_ms" in r:
        print(format_categories(r["profile_categories_ms"]), flush=True)


def trainer(args, rows):
    for name, (d, L, H) in SIZES.items():
        if name not in args.sizes and not args.smoke:
            continue
        for variant in args.variants:
            profile = args.profile and name == args.sizes[0]
            try:
                r = time_training(body(d, L, H, T=args.seq), args.batch, args.steps, args.warmup, profile=profile,
                                  **VARIANTS[variant])
            except Exception as e:  # noqa: BLE001 - a backend this GPU lacks is a result, not a crash
                r = {"config": body(d, L, H, T=args.seq), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            r["name"], r["variant"] = f"baseline {name}", variant
            rows.append(r)
            if "error" in r:
                print(f"{r['name']:>16} {variant:>15}  {r['error']}", flush=True)
                continue
            print(f"{r['name']:>16} {variant:>15}  {r['step_ms']:8.1f} ms  {r['tokens_per_s']:>10,.0f} tok/s  "
                  f"MFU {r['mfu']:.3f} (back to back {r['step_ms_back_to_back']:.1f} ms, MFU {r['mfu_back_to_back']:.3f})  loss0 {r['first_loss']:.4f}  mem {r['peak_mem_gib']:.1f} GiB  (warm-up {r['warmup_s']:.0f} s)", flush=True)
            show_profile(r)


def oe_variants(args) -> list[tuple[int, str | None]]:
    """(m, row update) of each OE variant: dense tables with dense AdamW (update None) up to --dense-max-m, then
    row-sparse tables with the row update eager and/or compiled."""
    return [(m, None) for m in args.m if m <= args.dense_max_m] + [(m, upd) for m in args.m for upd in args.oe_updates]


def oe_sets(args, m: int, update: str | None) -> dict:
    d, L, H = SIZES["124M"]
    sets = body(d, L, H, T=args.seq) | {"model.oe.n": 3, "model.oe.k": 4, "model.oe.m": m}
    if update:
        sets |= {"model.oe.sparse_update": True, "model.oe.table_dtype": "bfloat16"}
    return sets


def oe_name(m: int, update: str | None) -> str:
    return f"OE-{m / 1e6:g}M " + (f"row-sparse bf16, {update} row update" if update else "dense AdamW")


def oe_rounds(args, rows):
    """The model without OE stays alive next to each OE variant in turn; their timed blocks alternate for
    ``--rounds`` rounds, and the ratio is taken within each round (a drift of the machine hits both alike)."""
    d, L, H = SIZES["124M"]
    mode = "reduce-overhead" if args.oe_graphs else None
    kernels = {"mlp_kernel": args.oe_kernels, "rope_kernel": args.oe_kernels}  # both models alike
    # the no-OE model as the trainer runs a dense model (its whole step one CUDA graph), or graphed as the OE model
    graphs = {"whole_graph": True} if args.oe_base_step_graph else {"compile_mode": mode}
    base = Bench(body(d, L, H, T=args.seq), args.oe_batch, **graphs, **kernels)
    base.warm(args.warmup)
    base.opt.zero_grad(set_to_none=True)
    resident = torch.cuda.memory_allocated() if base.dev.type == "cuda" else 0  # the base's weights and moments
    profiled = False
    for m, update in oe_variants(args):
        t0 = time.time()
        try:
            v = Bench(oe_sets(args, m, update), args.oe_batch, compile_update=update == "compiled", compile_mode=mode,
                      **kernels)
            v.warm(args.warmup)
            per_round = interleaved({"base": base, "oe": v}, args.steps, args.rounds)
            r = v.result(v.time(1), profile=args.profile)
            v.close()
        except Exception as e:  # noqa: BLE001 - OOM of a naive variant is a result, not a crash
            r, per_round = {"config": oe_sets(args, m, update), "error": f"{type(e).__name__}: {str(e)[:200]}"}, None
        r["name"] = oe_name(m, update)
        if per_round:
            r.update(peak_mem_gib=r["peak_mem_gib"] - resident / 2**30,
                     peak_mem_note="peak while both models were alive, minus the no-OE model's resident memory")
            for how, key in (("per_step", ""), ("back_to_back", "_back_to_back")):
                oe_s, base_s = per_round["oe"][how], per_round["base"][how]
                ratios = [o / b for o, b in zip(oe_s, base_s)]
                r.update({f"step_ms{key}": statistics.median(oe_s) * 1000, f"round_step_ms{key}": [x * 1000 for x in oe_s],
                          f"base_round_step_ms{key}": [x * 1000 for x in base_s], f"round_ratios{key}": ratios,
                          f"ratio_vs_no_oe{key}": statistics.median(ratios)})
        rows.append(r)
        for key, label in (("", "per step"), ("_back_to_back", "back to back")):
            print(f"{r['name']:>44}  {label:>12} {r.get('step_ms' + key, float('nan')):8.2f} ms  "
                  f"x{r.get('ratio_vs_no_oe' + key, float('nan')):.3f} (rounds "
                  f"{' '.join(f'{x:.3f}' for x in r.get('round_ratios' + key, []))})  "
                  f"mem {r.get('peak_mem_gib', float('nan')):.1f} GiB  ({time.time() - t0:.0f}s) {r.get('error', '')}", flush=True)
        show_profile(r)
        if args.profile and not profiled:
            b = base.result(base.time(args.steps), profile=True)
            b["name"] = "no OE (profile, alongside the OE variants)"
            rows.append(b)
            show_profile(b)
            profiled = True
    base.close()


def oe(args, rows):
    if args.rounds > 1:
        return oe_rounds(args, rows)
    d, L, H = SIZES["124M"]
    base = time_training(body(d, L, H, T=args.seq), args.oe_batch, args.steps, args.warmup)
    base["name"] = "no OE"
    rows.append(base)
    print(f"{'no OE':>44}  {base['step_ms']:8.1f} ms  mem {base['peak_mem_gib']:.1f} GiB", flush=True)
    for m, update in oe_variants(args):
        sets = oe_sets(args, m, update)
        t0 = time.time()
        try:
            r = time_training(sets, args.oe_batch, args.steps, args.warmup, compile_update=update == "compiled")
        except Exception as e:  # noqa: BLE001 - OOM of a naive variant is a result, not a crash
            r = {"config": sets, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        r["name"] = oe_name(m, update)
        r["ratio_vs_no_oe"] = r.get("step_ms", float("nan")) / base["step_ms"]
        rows.append(r)
        print(f"{r['name']:>44}  {r.get('step_ms', float('nan')):8.1f} ms  x{r['ratio_vs_no_oe']:.3f}  "
              f"mem {r.get('peak_mem_gib', float('nan')):.1f} GiB  ({time.time() - t0:.0f}s) {r.get('error', '')}", flush=True)


def _kernel_variants(args):
    """(label, loss_kernel, row alignment of the fused kernel's logits) for the packed comparison."""
    out = []
    for k in args.loss_kernels:
        if k == "torch":
            out.append(("torch", "torch", None))
        else:
            out += [(f"fused, rows padded to {a}" if a > 1 else "fused, rows unpadded", "auto", a) for a in args.row_aligns]
    return out


# packed-step variants: torch.compile's mode and what it compiles (the body, or the whole forward with the lookup)
PACKED_VARIANTS = {
    "default": {},
    "graphs": {"compile_mode": "reduce-overhead"},
    "embed": {"whole": True},
    "graphs+embed": {"compile_mode": "reduce-overhead", "whole": True},
    "swiglu": {"mlp_kernel": "auto"},
    "swiglu+rope": {"mlp_kernel": "auto", "rope_kernel": "auto"},
}
# the one tiny model: torch.compile's default mode, reduce-overhead (CUDA graphs of the compiled forward and
# backward, as the trainer), or the default mode with the whole step (forward, backward, AdamW) as one CUDA graph
SINGLE_VARIANTS = {"default": {}, "graphs": {"compile_mode": "reduce-overhead"},
                   "whole-step-graph": {"whole_graph": True},
                   "whole-step-graph+swiglu": {"whole_graph": True, "mlp_kernel": "auto"},
                   "whole-step-graph+swiglu+rope": {"whole_graph": True, "mlp_kernel": "auto", "rope_kernel": "auto"}}


def packed(args, rows):
    """Step-level packing: 8 one-trial steps vs one packed step of the same 8 models (the compute side of target 3)."""
    from overtok import kernels

    default_align = kernels.ROW_ALIGN
    d, L, H = (64, 2, 2) if args.smoke else (256, 4, 4)
    sets = body(d, L, H, T=args.packed_seq, v=args.packed_vocab)
    singles = {}
    for (label, kernel, align), variant in [(k, v) for k in _kernel_variants(args) for v in args.single_variants]:
        kernels.ROW_ALIGN = align or default_align
        single = time_training(sets, args.packed_batch, args.steps * 5, args.warmup, loss_kernel=kernel,
                               **SINGLE_VARIANTS[variant])
        single["name"], single["row_align"], single["variant"] = f"one tiny model, {variant}, loss {label}", align, variant
        singles[label, variant] = single
        rows.append(single)
        print(f"{single['name']:>56}  {single['step_ms']:8.2f} ms  {single['tokens_per_s']:>12,.0f} tok/s  "
              f"MFU {single['mfu']:.3f}  back to back {single['step_ms_back_to_back']:.2f} ms  "
              f"loss {single['first_loss']:.4f} -> {single['last_step_loss']:.4f}", flush=True)
    best = max(s["tokens_per_s"] for s in singles.values())
    for (label, kernel, align), variant in [(k, v) for k in _kernel_variants(args) for v in args.packed_variants]:
        kernels.ROW_ALIGN = align or default_align
        r = time_packed(sets, 8, args.packed_batch, args.steps * 2, args.warmup, profile=args.profile,
                        loss_kernel=kernel, **PACKED_VARIANTS[variant])
        r["name"], r["row_align"], r["variant"] = f"8 packed, {variant}, loss {label}", align, variant
        base = singles.get((label, "default"))
        r["vs_one_model"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_fastest_one_model"] = r["tokens_per_s"] / best
        rows.append(r)
        print(f"{r['name']:>56}  {r['step_ms']:8.2f} ms  {r['tokens_per_s']:>12,.0f} tok/s  MFU {r['mfu']:.3f}  "
              f"x{r['vs_one_model'] or float('nan'):.2f} vs one model (x{r['vs_fastest_one_model']:.2f} vs the fastest)  "
              f"host issue {r['host_issue_ms']:.1f} ms  back to back {r['step_ms_back_to_back']:.2f} ms  "
              f"mem {r['peak_mem_gib']:.1f} GiB  warm-up {r['warmup_s']:.1f} s  loss0 {r.get('first_loss', float('nan')):.4f}",
              flush=True)
        show_profile(r)
    kernels.ROW_ALIGN = default_align


def main():
    global SIZES
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--only", choices=["trainer", "oe", "packed"], nargs="+", default=["trainer", "oe", "packed"])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="trainer sizes to time")
    ap.add_argument("--packed-variants", nargs="*", choices=list(PACKED_VARIANTS), default=["default"],
                    help="packed step: torch.compile mode (graphs = reduce-overhead) and scope (embed = whole forward); "
                         "none: time the one tiny model only")
    ap.add_argument("--single-variants", nargs="+", choices=list(SINGLE_VARIANTS), default=["default"],
                    help="the one tiny model: torch.compile's default mode, reduce-overhead (CUDA graphs) and/or the "
                         "whole step as one CUDA graph (CUDA only)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["stock", "fused"],
                    help="trainer variants timed side by side for each size")
    ap.add_argument("--loss-kernels", nargs="+", choices=["torch", "auto"], default=["torch", "auto"],
                    help="loss kernels for the packed comparison (auto = the fused triton kernel where it runs)")
    ap.add_argument("--row-aligns", type=int, nargs="+", default=[64],
                    help="fused kernel: pad the logits' rows to a multiple of this (1 = unpadded, the kernel before)")
    ap.add_argument("--profile", action="store_true", help="kernel profile of the first size / the packed step")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--oe-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--m", type=float, nargs="+", default=[1e6, 4e6, 12.8e6])
    ap.add_argument("--dense-max-m", type=float, default=4.1e6)
    ap.add_argument("--oe-updates", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                    help="row-sparse variants: the tables' row update eager and/or compiled (the trainer compiles on CUDA)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="oe: keep the no-OE model alive and alternate timed blocks with each OE variant for this many rounds")
    ap.add_argument("--oe-graphs", action="store_true",
                    help="oe rounds: compile the no-OE and OE models with CUDA graphs (reduce-overhead), as the trainer")
    ap.add_argument("--oe-kernels", choices=["torch", "auto"], default="torch",
                    help="SwiGLU and RoPE kernels of both models in --rounds (auto: the trainer's default on CUDA)")
    ap.add_argument("--oe-base-step-graph", action="store_true",
                    help="rounds: the no-OE model's whole step as one CUDA graph, as the trainer runs a dense model")
    ap.add_argument("--packed-batch", type=int, default=16)
    ap.add_argument("--packed-seq", type=int, default=512)
    ap.add_argument("--packed-vocab", type=int, default=50280)  # the OLMo tokenizer's, as in bench_sweep.py
    args = ap.parse_args()
    args.m = [int(m) + 1 if int(m) % 2 == 0 else int(m) for m in args.m]  # odd: never a multiple of V = 50,304
    if args.smoke:
        SIZES = {"tiny": (64, 2, 2)}
        args.seq, args.batch, args.oe_batch, args.steps, args.warmup = 64, 2, 2, 2, 1
        args.m, args.dense_max_m = [151013], 151013  # slices 151013..151027 share no factor with V that collapses a token
        args.packed_batch, args.packed_seq, args.packed_vocab = 2, 64, 512
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = Rows(args.out, " ".join(sys.argv))
    if "trainer" in args.only:
        trainer(args, rows)
    if "oe" in args.only:
        if args.smoke:
            SIZES["124M"] = (64, 2, 2)
        oe(args, rows)
    if "packed" in args.only:
        packed(args, rows)


if __name__ == "__main__":
    main()
