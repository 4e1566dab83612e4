"""Triton kernel of the loss against a sparse (captured) teacher: the ``triton`` backend's ``sparse_kd``.

What is fused, per row: pass 1 is one sweep over the student giving the complement's log-sum-exp
(stored ids masked to −inf, as the CPU kernel does, never 1 − Q_I by subtraction) and the τ = 1
statistics of the hard term; the stored ids' logits are gathered. Pass 2 writes the dense gradient
c_tail·q/τ (+ hard term), then, after a barrier, overwrites the K stored entries with (q − w)/τ.

Never materialised: softmax(z/τ), a float32 copy of any row. Memory traffic that sets the goal: the
loss reads the student's N·V·b bytes twice and writes the gradient once, 3 N·V·b against the dense
forward-KL loss's 5 (z and t twice, ∂z once).

Preconditions: (N, V) logits with a unit column stride and any row stride; float32/bf16/fp16; ids
< 2^31; the divisor a 0-d tensor on the device. Importing this module needs Triton (not a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _INTERPRET, _check_dtype, _device_ctx, _inv_temperature, _next_pow2


# ============================================================================================
# sparse KD loss
# ============================================================================================
@triton.jit
def _log1p_unit(x):
    """log(1 + x) for 0 <= x <= 1, accurate for tiny x (log(u)·x/(u − 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


def _loss_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK": 128}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1)
            for b in (1024, 2048, 4096) for w in (4, 8, 16) if not (b == 1024 and w == 16)]


@triton.autotune(configs=_loss_configs(), key=["V", "K", "TAIL", "HAS_TARGET", "USE_HARD", "TAU_ONE", "NEED_SUM"])
@triton.jit(do_not_specialize=["V", "K", "ignore_index"])
def _sparse_kd_kernel(
    z_ptr, sid_ptr, sw_ptr, y_ptr, div_ptr, loss_ptr, g_ptr,
    V, K, stride_z, stride_g, stride_y,
    inv_t, soft_scale, hard, eps, ignore_index,
    TAIL: tl.constexpr, HAS_TARGET: tl.constexpr, USE_HARD: tl.constexpr, TAU_ONE: tl.constexpr,
    NEED_SUM: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
):
    BIG: tl.constexpr = 0x7FFFFFFFFFFFFFFF
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    sid_row = sid_ptr + row * K
    sw_row = sw_ptr + row * K
    cols = tl.arange(0, BLOCK)
    kk = tl.arange(0, KB)
    n_chunks = tl.cdiv(V, BLOCK)

    y = -1
    keep = True
    if HAS_TARGET:
        y = tl.load(y_ptr + row * stride_y)
        keep = y != ignore_index
    if keep:
        n_bad = 0  # a target out of range, an id out of range or repeated: NaN, never an OOB access
        if HAS_TARGET:
            n_bad = ((y < 0) | (y >= V)).to(tl.int32)
        inv_div = 1.0 / tl.load(div_ptr).to(tl.float32)

        # ---- the stored entries (ids sorted ascending, −1 padding first) ----
        m_in = float("-inf")
        p_sum = tl.zeros([KB], dtype=tl.float64)
        n_in = 0
        n_nan = 0
        for k0 in range(0, K, KB):
            kpos = k0 + kk
            ids = tl.load(sid_row + kpos, mask=kpos < K, other=-1)
            nxt = tl.load(sid_row + kpos + 1, mask=kpos + 1 < K, other=-1)
            valid = ids >= 0
            n_bad += tl.sum(((ids >= V) | (valid & (nxt == ids))).to(tl.int32), axis=0)
            ok = valid & (ids < V)
            s_in = tl.load(z_row + ids, mask=ok, other=0.0).to(tl.float32) * inv_t
            n_nan += tl.sum((ok & (s_in != s_in)).to(tl.int32), axis=0)
            s_in = tl.where(ok, s_in, float("-inf"))
            m_in = tl.maximum(m_in, tl.max(s_in, axis=0))
            w = tl.load(sw_row + kpos, mask=ok, other=0.0)
            p_sum += w.to(tl.float64)
            n_in += tl.sum(ok.to(tl.int32), axis=0)
        p_tot = tl.sum(p_sum, axis=0)

        # ---- pass 1: complement lse of s = z/τ (stored ids masked), τ = 1 stats of the hard term ----
        m_c = -3.0e38  # finite: exp(m_old − m_new) stays defined while a chunk is all −inf
        d_c = tl.zeros([BLOCK], dtype=tl.float32)
        m_1 = -3.0e38
        d_1 = tl.zeros([BLOCK], dtype=tl.float32)
        sum_z = tl.zeros([BLOCK], dtype=tl.float32)
        p = 0
        nid = tl.load(sid_row + p, mask=p < K, other=BIG)
        while nid < 0:  # skip the padding
            p += 1
            nid = tl.load(sid_row + p, mask=p < K, other=BIG)
        for c in range(0, n_chunks):
            c0 = c * BLOCK
            offs = c0 + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.where(mask, z * inv_t, float("-inf"))
            # the chunk's stored ids (a run of the sorted list): K·BLOCK compares per row in all
            while nid < c0 + BLOCK:
                s = tl.where(offs == nid, float("-inf"), s)
                p += 1
                nid = tl.load(sid_row + p, mask=p < K, other=BIG)
            new_m = tl.maximum(m_c, tl.max(s, axis=0))
            d_c = d_c * tl.exp(m_c - new_m) + tl.exp(s - new_m)
            m_c = new_m
            if USE_HARD:
                if not TAU_ONE:
                    z1 = tl.where(mask, z, float("-inf"))
                    new_1 = tl.maximum(m_1, tl.max(z1, axis=0))
                    d_1 = d_1 * tl.exp(m_1 - new_1) + tl.exp(z1 - new_1)
                    m_1 = new_1
                if NEED_SUM:
                    sum_z += z
        dc = tl.sum(d_c, axis=0)
        bad = n_bad > 0
        lse_c = m_c + tl.log(dc)

        d_in = 0.0
        if m_in > float("-inf"):
            for k0 in range(0, K, KB):
                kpos = k0 + kk
                ids = tl.load(sid_row + kpos, mask=kpos < K, other=-1)
                ok = (ids >= 0) & (ids < V)
                s_in = tl.load(z_row + ids, mask=ok, other=0.0).to(tl.float32) * inv_t
                d_in += tl.sum(tl.where(ok, tl.exp(s_in - m_in), 0.0), axis=0)
        lse_in = m_in + tl.log(d_in)
        hi = tl.maximum(lse_in, lse_c)
        lo = tl.minimum(lse_in, lse_c)
        lse_z = hi
        if hi > float("-inf"):
            lse_z = hi + _log1p_unit(tl.exp(lo - hi))

        # ---- the row's loss ----
        wscale = 1.0
        if TAIL == 1:
            wscale = 1.0 / p_tot.to(tl.float32)
        soft = 0.0
        for k0 in range(0, K, KB):
            kpos = k0 + kk
            ids = tl.load(sid_row + kpos, mask=kpos < K, other=-1)
            ok = (ids >= 0) & (ids < V)
            s_in = tl.load(z_row + ids, mask=ok, other=0.0).to(tl.float32) * inv_t
            w = tl.load(sw_row + kpos, mask=ok, other=0.0) * wscale
            pos_w = ok & (w > 0.0)
            term = w * (tl.log(tl.where(pos_w, w, 1.0)) - (s_in - lse_z))
            soft += tl.sum(tl.where(pos_w, term, 0.0), axis=0)
        c_tail = 1.0
        if TAIL == 0:
            if n_in < V:
                tail_p = tl.maximum(1.0 - p_tot, 0.0).to(tl.float32)
                if tail_p > 0.0:
                    log_tail_q = lse_c - lse_z
                    soft += tail_p * (tl.log(tail_p) - log_tail_q)
                    c_tail = 1.0 - tl.exp(tl.log(tail_p) - log_tail_q)
        row_loss = soft_scale * soft
        lse_1 = lse_z
        y_safe = tl.minimum(tl.maximum(y, 0), V - 1)
        if USE_HARD:
            if not TAU_ONE:
                lse_1 = m_1 + tl.log(tl.sum(d_1, axis=0))
            z_y = tl.load(z_row + y_safe).to(tl.float32)
            ce = (1.0 - eps) * (lse_1 - z_y)
            if NEED_SUM:
                ce += eps * (lse_1 - tl.sum(sum_z, axis=0) / V)
            row_loss += hard * ce
        row_loss = tl.where((n_nan > 0) | (dc != dc) | bad, float("nan"), row_loss)
        tl.store(loss_ptr + row, row_loss * inv_div)

        # ---- pass 2: the dense gradient, walking the row backwards (its tail is still in L2) ----
        gs = soft_scale * inv_t * inv_div
        gc = gs * c_tail
        gh = hard * inv_div
        eps_v = eps / V
        for i in range(0, n_chunks):
            offs = (n_chunks - 1 - i) * BLOCK + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.exp(z * inv_t - lse_z)
            g = q * gc
            if USE_HARD:
                if TAU_ONE:
                    q1 = q
                else:
                    q1 = tl.exp(z - lse_1)
                g += gh * (q1 - eps_v)
                g = tl.where(offs == y, g - gh * (1.0 - eps), g)
            g = tl.where(bad, float("nan"), g)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        # ---- the stored ids: (q − w)/τ instead of the complement's c_tail·q/τ ----
        tl.debug_barrier()  # the dense values above are written before these overwrite them
        if n_bad == 0:
            for k0 in range(0, K, KB):
                kpos = k0 + kk
                ids = tl.load(sid_row + kpos, mask=kpos < K, other=-1)
                ok = (ids >= 0) & (ids < V)
                z_in = tl.load(z_row + ids, mask=ok, other=0.0).to(tl.float32)
                w = tl.load(sw_row + kpos, mask=ok, other=0.0) * wscale
                q = tl.exp(z_in * inv_t - lse_z)
                g = gs * (q - w)
                if USE_HARD:
                    if TAU_ONE:
                        q1 = q
                    else:
                        q1 = tl.exp(z_in - lse_1)
                    g += gh * (q1 - eps_v)
                    g = tl.where(ids == y, g - gh * (1.0 - eps), g)
                tl.store(g_row + ids, g.to(g_ptr.dtype.element_ty), mask=ok)
    else:  # an ignored row contributes nothing, not even NaN
        tl.store(loss_ptr + row, 0.0)
        for c in range(0, n_chunks):
            offs = c * BLOCK + cols
            tl.store(g_row + offs, tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty), mask=offs < V)


def triton_sparse_kd(student, ids, weights, target, divisor, loss, grad, *, tail, temperature, soft_scale,
                     hard_weight, ignore_index, label_smoothing) -> None:
    """Fills loss (N,) float32 (rows already divided by the divisor) and grad (N, V) in the
    student's dtype (the ``sparse_kd`` contract of ``fastkd/_backends/README.md``)."""
    _check_dtype(student, "student logits")
    n, v = student.shape
    k = ids.shape[1]
    if n == 0:
        return
    # sorted ids: pass 1 meets each chunk's stored ids as one run of the list; duplicates are adjacent
    sid, order = torch.sort(ids.to(torch.int64), dim=1)
    sw = weights.to(torch.float32).gather(1, order)
    has_target = target is not None
    if has_target:
        y, stride_y = target, target.stride(0)
    else:  # never read
        y, stride_y = sid, 0
    use_hard = has_target and hard_weight != 0.0
    div = divisor if divisor.dtype == torch.float32 else divisor.to(torch.float32)
    with _device_ctx(student):
        _sparse_kd_kernel[(n,)](
            student, sid, sw, y, div, loss, grad,
            v, k, student.stride(0), grad.stride(0), stride_y,
            _inv_temperature(temperature), float(soft_scale), float(hard_weight), float(label_smoothing),
            int(ignore_index),
            TAIL=int(tail), HAS_TARGET=has_target, USE_HARD=use_hard, TAU_ONE=float(temperature) == 1.0,
            NEED_SUM=use_hard and label_smoothing > 0.0, KB=min(_next_pow2(max(k, 1)), 1024),
        )
