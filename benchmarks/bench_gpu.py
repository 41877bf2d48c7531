"""GPU benchmarks of the trainer's step, side by side in one process. Every model is made into what `overtok train`
steps by ``overtok.engine`` (benchmarks/common.py: ``Bench``), so a variant is a set of config keys, mostly of the
``runtime`` section (VARIANTS):

1. trainer throughput (MFU) of the baseline model at 25M / 124M / 350M body sizes, V = 50,304, seq 1024;
2. Over-Encoding at paper scale (n = 3, k = 4, d = 768): step time and peak memory vs the same model without OE,
   for dense tables with AdamW and row-sparse bf16 tables; with --rounds N the model without OE stays alive and
   its timed blocks alternate with each OE variant's for N rounds;
3. packed trials at the step level: one tiny model (d 256, 4 layers, seq 512) vs 8 of them packed into one
   (overtok.packed), each under the same variants.

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

from benchmarks.common import Bench, Rows, format_categories, interleaved, time_training  # noqa: E402

V = 50304
SIZES = {"25M": (512, 8, 8), "124M": (768, 12, 12), "350M": (1024, 24, 16)}


def body(d, L, H, T=1024, v=V):
    return {"model.vocab_size": v, "model.d_model": d, "model.n_layers": L, "model.n_heads": H, "model.seq_len": T,
            "model.tie_embeddings": False, "runtime.compile": True}


# variants: config keys on top of the benchmark's model; "trainer" is what `overtok train` runs with
# runtime.compile on (on CUDA: the loss, SwiGLU and RoPE kernels, the whole step as one CUDA graph)
VARIANTS = {
    "trainer": {},
    "no-kernels": {"runtime.loss_kernel": "torch", "runtime.mlp_kernel": "torch", "runtime.rope_kernel": "torch"},
    "compiled-graphs": {"runtime.cuda_graph_scope": "compiled"},
    "no-graphs": {"runtime.cuda_graphs": False},
    "bf16res": {"train.residual_dtype": "bfloat16"},
}


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
                r = time_training(body(d, L, H, T=args.seq) | VARIANTS[variant], args.batch, args.steps, args.warmup,
                                  profile=profile)
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


def oe_variants(args) -> list[tuple[int, bool]]:
    """(m, row-sparse) of each OE variant: dense tables with AdamW up to --dense-max-m, then row-sparse bf16 tables
    (their row update compiled on CUDA, as the trainer)."""
    return [(m, False) for m in args.m if m <= args.dense_max_m] + [(m, True) for m in args.m]


def oe_sets(args, m: int, sparse: bool) -> dict:
    d, L, H = SIZES["124M"]
    sets = body(d, L, H, T=args.seq) | VARIANTS[args.oe_variant] | {"model.oe.n": 3, "model.oe.k": 4, "model.oe.m": m}
    if sparse:
        sets |= {"model.oe.sparse_update": True, "model.oe.table_dtype": "bfloat16"}
    return sets


def oe_name(m: int, sparse: bool) -> str:
    return f"OE-{m / 1e6:g}M " + ("row-sparse bf16" if sparse else "dense AdamW")


def oe_rounds(args, rows):
    """The model without OE stays alive next to each OE variant in turn; their timed blocks alternate for
    ``--rounds`` rounds, and the ratio is taken within each round (a drift of the machine hits both alike)."""
    d, L, H = SIZES["124M"]
    base = Bench(body(d, L, H, T=args.seq) | VARIANTS[args.oe_variant], args.oe_batch)
    base.warm(args.warmup)
    resident = torch.cuda.memory_allocated() if base.dev.type == "cuda" else 0  # the base's weights and moments
    profiled = False
    for m, sparse in oe_variants(args):
        t0 = time.time()
        try:
            v = Bench(oe_sets(args, m, sparse), args.oe_batch)
            v.warm(args.warmup)
            per_round = interleaved({"base": base, "oe": v}, args.steps, args.rounds)
            r = v.result(v.time(1), profile=args.profile)
            v.close()
        except Exception as e:  # noqa: BLE001 - OOM of a naive variant is a result, not a crash
            r, per_round = {"config": oe_sets(args, m, sparse), "error": f"{type(e).__name__}: {str(e)[:200]}"}, None
        r["name"] = oe_name(m, sparse)
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
    base = time_training(body(d, L, H, T=args.seq) | VARIANTS[args.oe_variant], args.oe_batch, args.steps, args.warmup)
    base["name"] = "no OE"
    rows.append(base)
    print(f"{'no OE':>44}  {base['step_ms']:8.1f} ms  mem {base['peak_mem_gib']:.1f} GiB", flush=True)
    for m, sparse in oe_variants(args):
        sets = oe_sets(args, m, sparse)
        t0 = time.time()
        try:
            r = time_training(sets, args.oe_batch, args.steps, args.warmup)
        except Exception as e:  # noqa: BLE001 - OOM of a naive variant is a result, not a crash
            r = {"config": sets, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        r["name"] = oe_name(m, sparse)
        r["ratio_vs_no_oe"] = r.get("step_ms", float("nan")) / base["step_ms"]
        rows.append(r)
        print(f"{r['name']:>44}  {r.get('step_ms', float('nan')):8.1f} ms  x{r['ratio_vs_no_oe']:.3f}  "
              f"mem {r.get('peak_mem_gib', float('nan')):.1f} GiB  ({time.time() - t0:.0f}s) {r.get('error', '')}", flush=True)


def packed(args, rows):
    """Step-level packing: one tiny model's step vs one packed step of 8 such models, under each variant."""
    d, L, H = (64, 2, 2) if args.smoke else (256, 4, 4)
    sets = body(d, L, H, T=args.packed_seq, v=args.packed_vocab)
    for variant in args.packed_variants:
        single = time_training(sets | VARIANTS[variant], args.packed_batch, args.steps * 5, args.warmup)
        single["name"], single["variant"] = f"one tiny model, {variant}", variant
        rows.append(single)
        print(f"{single['name']:>40}  {single['step_ms']:8.2f} ms  {single['tokens_per_s']:>12,.0f} tok/s  "
              f"MFU {single['mfu']:.3f}  back to back {single['step_ms_back_to_back']:.2f} ms  "
              f"loss {single['first_loss']:.4f} -> {single['last_step_loss']:.4f}", flush=True)
        r = time_training(sets | VARIANTS[variant], args.packed_batch, args.steps * 2, args.warmup,
                          profile=args.profile, P=8)
        r["name"], r["variant"] = f"8 packed, {variant}", variant
        r["vs_one_model"] = r["tokens_per_s"] / single["tokens_per_s"]
        rows.append(r)
        print(f"{r['name']:>40}  {r['step_ms']:8.2f} ms  {r['tokens_per_s']:>12,.0f} tok/s  MFU {r['mfu']:.3f}  "
              f"x{r['vs_one_model']:.2f} vs one model  host issue {r['host_issue_ms']:.1f} ms  "
              f"back to back {r['step_ms_back_to_back']:.2f} ms  mem {r['peak_mem_gib']:.1f} GiB  "
              f"warm-up {r['warmup_s']:.1f} s  loss0 {r['first_loss']:.4f}", flush=True)
        show_profile(r)


def main():
    global SIZES
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--only", choices=["trainer", "oe", "packed"], nargs="+", default=["trainer", "oe", "packed"])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="trainer sizes to time")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["no-kernels", "trainer"],
                    help="trainer variants timed side by side for each size")
    ap.add_argument("--packed-variants", nargs="+", choices=list(VARIANTS), default=["trainer"],
                    help="variants of the packed comparison (one model and a pack of 8 under each)")
    ap.add_argument("--profile", action="store_true", help="kernel profile of the first size / the packed step")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--oe-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--m", type=float, nargs="+", default=[1e6, 4e6, 12.8e6])
    ap.add_argument("--dense-max-m", type=float, default=4.1e6)
    ap.add_argument("--rounds", type=int, default=1,
                    help="oe: keep the no-OE model alive and alternate timed blocks with each OE variant for this many rounds")
    ap.add_argument("--oe-variant", choices=list(VARIANTS), default="trainer",
                    help="the variant both the no-OE and the OE models run under")
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
