"""Triton kernels: the fused output head + cross-entropy (below), SwiGLU's pointwise part (``swiglu``) and RoPE of
the queries and keys (``rope_qkv``), the last two at the end of this file.

Fused output head + cross-entropy: the loss and the logits' gradient in one kernel over the logits.

The stock path (``F.cross_entropy(logits.float(), ...)``, compiled by inductor) makes several full passes over the
N x V logits: an fp32 log-softmax forward, then a reduction and an elementwise pass backward. Here one Triton
program per row reads the bf16 logits (online max / sum of exponentials), writes the row's loss, then reads the row
again and overwrites the logits with their gradient ``softmax - onehot`` in place (docs/performance.md). The head's
backward is then just the two matmuls, with the upstream
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
# Compiled by inductor, its backward writes the two halves of d(gate_up) as a concatenation, well below the memory
# bandwidth. Here one program reads gate, up and the
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
    """(grid, block): one program per row and block of up to 1024 columns, 4 warps (smaller blocks, which leave fewer
    masked-off columns, were slower)."""
    block = min(1024, triton.next_power_of_2(H))
    return (rows, triton.cdiv(H, block)), block


# On CUDA a triton_op: torch.compile sees the kernels and launches them from its own generated code, as its own
# kernels (a custom_op's Python dispatch and Triton's launcher cost the host time per call, which a step that is
# not a CUDA graph pays). Triton's CPU interpreter (the tests) cannot be traced that way: there
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


# Rotary position embedding of the queries and keys, over the qkv projection's output (B, T, 3 * H * hd) = [q | k | v]
# per token. Compiled by inductor, the forward rotates q and k in one kernel and copies v in another, and the
# backward writes d(qkv) in two passes (rotating one gradient into a temporary, then assembling all three). Here a
# program reads a
# token's q, k and v once and writes the three attention inputs; backward, it reads dq, dk and dv once and writes the
# token's row of d(qkv). As ``apply_rope``: pairs (first half, second half) of each head, cos and sin rounded to
# the activations' dtype, computed in fp32 and rounded once (as inductor's fused kernels compute).

if triton is not None:

    @triton.jit
    def _rope_pair(src_ptr, src, dst_ptr, dst, c, s, half, mask, SIGN: tl.constexpr):
        # (x1, x2) -> (x1 c - SIGN x2 s, SIGN x1 s + x2 c): SIGN 1 rotates, -1 rotates back (the gradient)
        x1 = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + src + half, mask=mask, other=0.0).to(tl.float32)
        dty = dst_ptr.dtype.element_ty
        tl.store(dst_ptr + dst, (x1 * c - SIGN * x2 * s).to(dty), mask=mask)
        tl.store(dst_ptr + dst + half, (SIGN * x1 * s + x2 * c).to(dty), mask=mask)

    @triton.jit
    def _rope_cos_sin(cos_ptr, sin_ptr, t, j, half, mask, dty):
        c = tl.load(cos_ptr + t * half + j, mask=mask, other=0.0).to(dty).to(tl.float32)
        s = tl.load(sin_ptr + t * half + j, mask=mask, other=0.0).to(dty).to(tl.float32)
        return c, s

    @triton.jit
    def _rope_index(NT, T, H, half, TOK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
        # TOK tokens (flat b * T + t) per program, x heads x the first half of each head's columns
        tok = tl.program_id(0).to(tl.int64) * TOK + tl.arange(0, TOK)[:, None, None]
        h = tl.arange(0, BLOCK_H)[None, :, None]
        j = tl.arange(0, BLOCK_J)[None, None, :]
        return tok, tok // T, tok % T, h, j, (tok < NT) & (h < H) & (j < half)

    @triton.jit
    def _rope_fwd(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, NT, T, H, half, o_b, o_h, o_t,
                  TOK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
        # qkv (B, T, 3, H, 2 half) contiguous -> q, k, v (B, H, T, 2 half) at strides (o_b, o_h, o_t, 1)
        tok, b, t, h, j, mask = _rope_index(NT, T, H, half, TOK, BLOCK_H, BLOCK_J)
        c, s = _rope_cos_sin(cos_ptr, sin_ptr, t, j, half, (tok < NT) & (j < half), q_ptr.dtype.element_ty)
        src = tok * 3 * H * 2 * half + h * 2 * half + j
        dst = b * o_b + h * o_h + t * o_t + j
        _rope_pair(qkv_ptr, src, q_ptr, dst, c, s, half, mask, 1.0)
        _rope_pair(qkv_ptr, src + H * 2 * half, k_ptr, dst, c, s, half, mask, 1.0)
        v_src = src + 2 * H * 2 * half
        tl.store(v_ptr + dst, tl.load(qkv_ptr + v_src, mask=mask), mask=mask)
        tl.store(v_ptr + dst + half, tl.load(qkv_ptr + v_src + half, mask=mask), mask=mask)

    @triton.jit
    def _rope_bwd(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, NT, T, H, half, q_b, q_h, q_t, k_b, k_h, k_t,
                  v_b, v_h, v_t, TOK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
        # dq, dk, dv (B, H, T, 2 half), each at its own strides (last 1) -> d(qkv) (B, T, 3, H, 2 half)
        tok, b, t, h, j, mask = _rope_index(NT, T, H, half, TOK, BLOCK_H, BLOCK_J)
        c, s = _rope_cos_sin(cos_ptr, sin_ptr, t, j, half, (tok < NT) & (j < half), dqkv_ptr.dtype.element_ty)
        dst = tok * 3 * H * 2 * half + h * 2 * half + j
        _rope_pair(dq_ptr, b * q_b + h * q_h + t * q_t + j, dqkv_ptr, dst, c, s, half, mask, -1.0)
        _rope_pair(dk_ptr, b * k_b + h * k_h + t * k_t + j, dqkv_ptr, dst + H * 2 * half, c, s, half, mask, -1.0)
        v_src = b * v_b + h * v_h + t * v_t + j
        v_dst = dst + 2 * H * 2 * half
        tl.store(dqkv_ptr + v_dst, tl.load(dv_ptr + v_src, mask=mask), mask=mask)
        tl.store(dqkv_ptr + v_dst + half, tl.load(dv_ptr + v_src + half, mask=mask), mask=mask)


# tokens per program: on a GPU enough for about 512 (head, column) pairs (one at a 124M model's 12 heads of 64, four
# at a tiny model's 4 heads); under Triton's interpreter (the tests), where programs are costly, at most this many
ROPE_TOKENS_INTERPRETED = 64


def _rope_launch(NT: int, H: int, half: int) -> tuple[tuple[int], dict]:
    """(grid, block sizes) for NT tokens of H heads of 2 half columns."""
    bh, bj = triton.next_power_of_2(H), triton.next_power_of_2(half)
    if _PLAIN_OPS:
        tok = min(ROPE_TOKENS_INTERPRETED, triton.next_power_of_2(NT))
    else:
        tok = max(1, 512 // (bh * bj))
    return (triton.cdiv(NT, tok),), {"TOK": tok, "BLOCK_H": bh, "BLOCK_J": bj, "num_warps": 4}


def _rope_outputs(qkv: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """Three (B, H, T, hd) tensors for q, k, v, each a view of (B, T, H, hd) memory: the attention's output then comes
    back in the layout the output projection reads, with no transpose copy."""
    B, T, C3 = qkv.shape
    hd = C3 // (3 * n_heads)
    return [qkv.new_empty(B, T, n_heads, hd).transpose(1, 2) for _ in range(3)]


@_define("overtok::rope_qkv", mutates_args=())
def _rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, 3 H hd) contiguous, cos and sin (T, hd / 2) float32 contiguous -> rotated q, rotated k and v,
    each (B, H, T, hd) in qkv's dtype (laid out as ``_rope_outputs``)."""
    q, k, v = _rope_outputs(qkv, n_heads)
    B, H, T, hd = q.shape
    grid, blocks = _rope_launch(B * T, H, hd // 2)
    _wrap(_rope_fwd)[grid](qkv, cos, sin, q, k, v, B * T, T, H, hd // 2, *q.stride()[:3], **blocks)
    return q, k, v


@_define("overtok::rope_qkv_backward", mutates_args=())
def _rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """d(qkv) (B, T, 3 H hd) from the gradients of the three outputs (B, H, T, hd), each with a last stride of 1."""
    B, H, T, hd = dq.shape
    dqkv = dq.new_empty(B, T, 3 * H * hd)
    grid, blocks = _rope_launch(B * T, H, hd // 2)
    _wrap(_rope_bwd)[grid](dq, dk, dv, cos, sin, dqkv, B * T, T, H, hd // 2, *dq.stride()[:3], *dk.stride()[:3],
                           *dv.stride()[:3], **blocks)
    return dqkv


if _PLAIN_OPS:
    _rope_qkv.register_fake(lambda qkv, cos, sin, n_heads: tuple(_rope_outputs(qkv, n_heads)))
    _rope_qkv_backward.register_fake(
        lambda dq, dk, dv, cos, sin: dq.new_empty(dq.shape[0], dq.shape[2], 3 * dq.shape[1] * dq.shape[3]))


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rope_grad(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))  # (SDPA's are)
    return _rope_qkv_backward(dq, dk, dv, cos, sin), None, None, None


_rope_qkv.register_autograd(_rope_grad, setup_context=_rope_setup)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated as ``overtok.model.apply_rope`` (positions 0..T-1), and v, from the qkv projection's output
    (B, T, 3 H hd) = [q | k | v] per token, by the Triton kernels (see ``available``). Returns three (B, H, T, hd)
    tensors; cos and sin: (at least T, hd / 2) tables."""
    B, T, C3 = qkv.shape
    if C3 % (3 * n_heads) or (C3 // (3 * n_heads)) % 2:
        raise ValueError(f"rope_qkv: width {C3} is not 3 x {n_heads} heads x an even head size")
    cos, sin = (x[:T].float().contiguous() for x in (cos, sin))
    return _rope_qkv(qkv.contiguous(), cos, sin, n_heads)
