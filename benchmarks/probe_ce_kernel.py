"""The fused loss kernel (``overtok.kernels._ce_rows``) alone, on logits the size of a real step's (issue 6, target 1):
one program per row (the default) against a persistent grid of G programs that take every G-th row, so that only
about G rows are read at a time and a row's second read (the gradient pass) can come from L2 instead of memory.

Each timed call first gets fresh logits (a copy, not timed: the kernel overwrites them with their gradient); CUDA
events around the kernel alone, median of --repeats calls per variant, variants interleaved round by round. The
losses and gradients of every variant are compared with the default's (same arithmetic per row: equal bit for bit).

    python3 benchmarks/probe_ce_kernel.py --out benchmarks/results/gpu_ce_persistent.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Rows  # noqa: E402
from overtok import kernels  # noqa: E402
from overtok.kernels import tl, triton  # noqa: E402


@triton.jit
def _ce_rows_once(logits_ptr, target_ptr, loss_ptr, V, VP, BLOCK: tl.constexpr):
    # the whole row read once and kept in its 16-bit type (BLOCK >= VP): max, sum of exponentials and the gradient
    # all from the registers (the default kernel reads each row twice; a fp32 copy of a row spilled, RESULTS.md)
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * VP
    col = tl.arange(0, BLOCK)
    x = tl.load(base + col, mask=col < V, other=float("-inf"))
    m = tl.max(x.to(tl.float32), 0)
    s = tl.sum(tl.exp(x.to(tl.float32) - m), 0)
    lse = m + tl.log(s)
    t = tl.load(target_ptr + row)
    tl.store(loss_ptr + row, lse - tl.load(base + t).to(tl.float32))
    g = tl.where(col < V, tl.exp(x.to(tl.float32) - lse) - tl.where(col == t, 1.0, 0.0), 0.0)
    tl.store(base + col, g.to(logits_ptr.dtype.element_ty), mask=col < VP)


def _launch_once(logits, target, V, warps):
    R, VP = logits.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    _ce_rows_once[(R,)](logits, target, loss, V, VP, BLOCK=triton.next_power_of_2(VP), num_warps=warps)
    return loss

# (name, rows, padded columns, real columns): the 124M trainer's step (batch 32 x 1024, V = 50,304) and the packed
# tiny text trials' (8 trials x 16 x 512 rows, the OLMo tokenizer's 50,280 padded to 50,304)
SHAPES = {"124M": (32768, 50304, 50304), "packed8-text": (65536, 50304, 50280)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu_ce_persistent.json")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--programs", nargs="+", default=["rows", "1x", "2x", "4x", "8x"],
                    help="'rows' = one program per row; 'Kx' = K programs per SM; 'once-wN': the row read once, N warps")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="small shapes on the CPU (Triton's interpreter)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
    rows = Rows(args.out, "benchmarks/probe_ce_kernel.py " + " ".join(sys.argv[1:]))
    for shape in args.shapes:
        R, VP, V = (64, 320, 300) if args.smoke else SHAPES[shape]
        gen = torch.Generator(device=dev).manual_seed(0)
        src = (torch.randn(R, VP, device=dev, generator=gen) * 2).to(torch.bfloat16)
        target = torch.randint(0, V, (R,), device=dev, generator=gen)
        logits = torch.empty_like(src)
        grids = {p: (None if p == "rows" or p.startswith("once") else int(p[:-1]) * sms) for p in args.programs}
        ref = None
        times, diffs = {p: [] for p in grids}, {}
        for i in range(args.repeats + 3):
            for p, g in grids.items():
                logits.copy_(src)
                if dev.type == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                if p.startswith("once"):
                    loss = _launch_once(logits, target, V, int(p.split("-w")[1]))
                else:
                    loss = kernels._launch(logits, target, V, True, programs=g)
                if dev.type == "cuda":
                    b.record()
                    torch.cuda.synchronize()
                    if i >= 3:
                        times[p].append(a.elapsed_time(b))
                if i == 0:
                    if ref is None:
                        ref = loss.clone(), logits.clone()
                    if p.startswith("once"):  # another summation order: close, not equal
                        diff = {"loss_max_abs_diff": (loss - ref[0]).abs().max().item(),
                                "grad_max_abs_diff": (logits.float() - ref[1].float()).abs().max().item()}
                        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
                        torch.testing.assert_close(logits, ref[1], rtol=1e-2, atol=1e-6)
                    else:
                        assert torch.equal(loss, ref[0]) and torch.equal(logits, ref[1]), f"{shape} {p}: differs"
                        diff = {}
                    diffs[p] = diff
            if args.smoke:
                break
        gb = 3 * R * VP * src.element_size() / 1e9  # two reads and one write of the logits
        for p, g in grids.items():
            ms = statistics.median(times[p]) if times[p] else float("nan")
            row = {"shape": shape, "rows": R, "columns": VP, "real_columns": V, "programs": p,
                   "grid": g or R, "ms": ms, "ms_min": min(times[p]) if times[p] else None,
                   "effective_tb_s_if_all_from_memory": gb / ms if times[p] else None,
                   "equal_to_default": not diffs.get(p), **diffs.get(p, {})}
            rows.append(row)
            print(f"{shape:13s} {p:5s} grid {g or R:6d}  {ms:7.3f} ms  ({gb / ms if times[p] else 0:.2f} TB/s if "
                  f"three passes came from memory)", flush=True)


if __name__ == "__main__":
    main()
