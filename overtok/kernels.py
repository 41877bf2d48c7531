"""Triton kernels: the fused output head + cross-entropy (below), and SwiGLU's pointwise part (``swiglu``, at the
end of this file).

Fused output head + cross-entropy: the loss and the logits' gradient in one kernel over the logits.

The stock path (``F.cross_entropy(logits.float(), ...)``, compiled by inductor) makes several full passes over the
N x V logits: an fp32 log-softmax forward, then a reduction and an elementwise pass backward (profiled on an H200:
15 of 39 ms of a packed tiny-model step, roughly 2 TB/s). Here one Triton program per row reads the bf16 logits
(online max / sum of exponentials), writes the row's loss, then reads the row again and overwrites the logits with
their gradient ``softmax - onehot`` in place (H200, 124M model: 2.35 ms per step against 4.9 ms for the stock loss's
two largest kernels; benchmarks/RESULTS.md). The head's backward is then just the two matmuls, with the upstream
scale (1/N times the loss's gradient) applied to their small outputs instead of to the N x V gradient.
The logits' rows are padded to a multiple of 64 columns (zero rows appended to w; the padding is left out of the
softmax): with a real vocabulary such as the OLMo tokenizer's 50,280, unpadded rows start at addresses Triton cannot
prove 16-byte aligned, and the kernel's loads are no longer vectorised. Same loss and gradients as the stock path
up to summation order; the logits are never returned.

``linear_cross_entropy(h, w, target)`` takes h (P, N, d), w (P, V, d), target (P, N) and returns the mean loss of
each of the P slices (P = 1 for one model, P > 1 for packed trials). It runs the Triton kernel on CUDA, and on the
CPU under Triton's interpreter (``TRITON_INTERPRET=1``, which the tests use); ``available`` says whether it can.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the model keeps the stock loss
    triton = None


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on this device (CUDA with triton, or the CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _ce_rows(logits_ptr, target_ptr, loss_ptr, V, VP, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        # rows are VP apart, VP a multiple of ROW_ALIGN (Triton then knows every row start is 16-byte aligned and
        # vectorises the loads); columns V..VP are padding: left out of the softmax, given a zero gradient
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * VP
        offs = tl.arange(0, BLOCK)
        m = float("-inf")  # running max and sum of exp(x - m) over the row (online softmax)
        s = 0.0
        for start in range(0, VP, BLOCK):
            col = start + offs
            x = tl.load(base + col, mask=col < VP, other=float("-inf")).to(tl.float32)
            x = tl.where(col < V, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(target_ptr + row)
        tl.store(loss_ptr + row, lse - tl.load(base + t).to(tl.float32))
        if WRITE_GRAD:
            for start in range(0, VP, BLOCK):
                col = start + offs
                x = tl.load(base + col, mask=col < VP, other=0.0).to(tl.float32)
                g = tl.where(col < V, tl.exp(x - lse) - tl.where(col == t, 1.0, 0.0), 0.0)
                tl.store(base + col, g.to(logits_ptr.dtype.element_ty), mask=col < VP)


ROW_ALIGN = 64  # the logits' row length is padded to a multiple of this (a real vocabulary, e.g. 50,280, is not)


def _launch(logits: torch.Tensor, target: torch.Tensor, V: int, write_grad: bool) -> torch.Tensor:
    """logits (R, VP) contiguous with V real columns, target (R,) -> per-row loss (R,) fp32; with write_grad,
    logits become the gradient (zero in the padding columns)."""
    R, VP = logits.shape
    assert V <= VP and logits.is_contiguous()
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    block = min(4096, triton.next_power_of_2(VP))
    _ce_rows[(R,)](logits, target, loss, V, VP, BLOCK=block, WRITE_GRAD=write_grad,
                   num_warps=8 if block >= 2048 else 4)
    return loss


def _pad_rows(w: torch.Tensor, align: int) -> torch.Tensor:
    """w (P, V, d) with zero rows appended up to a multiple of align (the padded logits are then exactly 0)."""
    pad = -w.shape[1] % align
    return torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w


@torch.library.custom_op("overtok::linear_ce", mutates_args=())
def _linear_ce(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, need_grad: bool,
               align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h (P, N, d), w (P, V, d), target (P, N) -> (mean loss per slice (P,) fp32, d(sum of row losses)/d logits
    (P, N, VP) in h's dtype with V padded to a multiple of align, or an empty tensor without need_grad)."""
    P, N, _ = h.shape
    logits = torch.bmm(h, _pad_rows(w, align).transpose(1, 2))
    loss = _launch(logits.view(P * N, -1), target.reshape(-1).contiguous(), w.shape[1], need_grad).view(P, N).mean(1)
    return loss, logits if need_grad else logits.new_empty(0)


@_linear_ce.register_fake
def _(h, w, target, need_grad, align):
    P, N, _ = h.shape
    grad = h.new_empty(P, N, w.shape[1] + -w.shape[1] % align) if need_grad else h.new_empty(0)
    return h.new_empty(P, dtype=torch.float32), grad


def _setup(ctx, inputs, output):
    h, w, _, _, ctx.align = inputs
    ctx.save_for_backward(h, w, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g_loss, _g_grad):
    h, w, grad = ctx.saved_tensors
    scale = (g_loss / h.shape[1])[:, None, None]  # d mean / d row loss, times the upstream gradient, per slice
    V = w.shape[1]  # the gradient's padding columns are zero: they add nothing to gh, and gw drops their rows
    gh = (torch.bmm(grad, _pad_rows(w, ctx.align)).float() * scale).to(h.dtype)
    gw = (torch.bmm(grad.transpose(1, 2), h)[:, :V].float() * scale).to(w.dtype)
    return gh, gw, None, None, None


_linear_ce.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ w^T) per slice: h (P, N, d), w (P, V, d), target (P, N) -> (P,) fp32.

    Under autocast h and w are cast to the autocast dtype first (as F.linear would be)."""
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dt), w.to(dt)
    else:
        w = w.to(h.dtype)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    return _linear_ce(h.contiguous(), w.contiguous(), target, need_grad, ROW_ALIGN)[0]


# SwiGLU's pointwise part, silu(gate) * up, over the gate_up projection's output (..., 2h) = [gate | up].
# Compiled by inductor, its backward writes the two halves of d(gate_up) as a concatenation: on an H200 that kernel
# ran at about 2.3 TB/s (3.5 ms of a 124M step, benchmarks/RESULTS.md). Here one program reads gate, up and the
# output's gradient once for a block of columns of one row and writes both halves: 3 reads, 2 writes.

if triton is not None:

    @triton.jit
    def _swiglu_fwd(gu_ptr, out_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < H
        g = tl.load(gu_ptr + row * 2 * H + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * H + H + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + col, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(gu_ptr, dout_ptr, dgu_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < H
        g = tl.load(gu_ptr + row * 2 * H + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * H + H + col, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + row * H + col, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dty = dgu_ptr.dtype.element_ty
        tl.store(dgu_ptr + row * 2 * H + col, (d * u * s * (1.0 + g * (1.0 - s))).to(dty), mask=mask)
        tl.store(dgu_ptr + row * 2 * H + H + col, (d * g * s).to(dty), mask=mask)


def _swiglu_grid(rows: int, H: int) -> tuple[tuple[int, int], int]:
    """(grid, block): one program per row and block of up to 1024 columns, 4 warps. (Blocks picked to leave fewer
    masked-off columns, down to 256 columns and 1 warp, measured slower on the H200: benchmarks/RESULTS.md.)"""
    block = min(1024, triton.next_power_of_2(H))
    return (rows, triton.cdiv(H, block)), block


# On CUDA a triton_op: torch.compile sees the kernels and launches them from its own generated code, as its own
# kernels (a custom_op's Python dispatch and Triton's launcher cost the host about 0.2 ms per call on the H200 host,
# which a step that is not a CUDA graph pays). Triton's CPU interpreter (the tests) cannot be traced that way: there
# the same functions are plain custom ops (as without triton, where they are never called: ``available``).
_PLAIN_OPS = os.environ.get("TRITON_INTERPRET") == "1" or triton is None
_define = torch.library.custom_op if _PLAIN_OPS else torch.library.triton_op
_wrap = (lambda kernel: kernel) if _PLAIN_OPS else torch.library.wrap_triton


@_define("overtok::swiglu", mutates_args=())
def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2h) contiguous = [gate | up] -> silu(gate) * up (..., h), computed in fp32, stored in gu's dtype."""
    H = gu.shape[-1] // 2
    out = gu.new_empty(*gu.shape[:-1], H)
    grid, block = _swiglu_grid(gu.numel() // (2 * H), H)
    _wrap(_swiglu_fwd)[grid](gu, out, H, BLOCK=block, num_warps=4)
    return out


@_define("overtok::swiglu_backward", mutates_args=())
def _swiglu_backward(gu: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """d(gate_up) (..., 2h) from gu and the output's gradient dout (..., h), contiguous."""
    H = gu.shape[-1] // 2
    dgu = torch.empty_like(gu)
    grid, block = _swiglu_grid(gu.numel() // (2 * H), H)
    _wrap(_swiglu_bwd)[grid](gu, dout, dgu, H, BLOCK=block, num_warps=4)
    return dgu


if _PLAIN_OPS:  # shapes for tracing (a triton_op traces its own function instead)
    _swiglu.register_fake(lambda gu: gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2))
    _swiglu_backward.register_fake(lambda gu, dout: torch.empty_like(gu))


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


_swiglu.register_autograd(lambda ctx, dout: _swiglu_backward(ctx.saved_tensors[0], dout.contiguous()),
                          setup_context=_swiglu_setup)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gu = [gate | up] along the last dimension, by the Triton kernels (see ``available``)."""
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension ({gu.shape[-1]}) must be even ([gate | up])")
    return _swiglu(gu.contiguous())
