"""Fused Triton kd kernel: the ``triton`` backend's ``kd`` (the dense loss of ``fastkd.kd_loss``).

What is fused: per row, the temperature softmaxes of student and teacher, KL(p‖q), KL(q‖p),
JSD(β), total variation or skew KL(α), the label-smoothed hard cross-entropy, and the gradients
w.r.t. both logits (the row math of ``csrc/common/kd_math.h``).
Never materialised: p, q, m, any log-probability, the softcapped logits, a float32 copy of a
bf16/fp16 row. The only N×V memory written is the gradient, in the input dtype.

Structure: one program per row. Pass 1 reads the row in BLOCK-wide chunks and keeps one running
maximum per chunk (a scalar) and per-lane rescaled sums, reduced once at the end: one exp per
element and distribution. JSD, TVD and skew KL add a pass for their two sums (the table of
``csrc/common/kd_math.h``: their summands need the final normalisers), so they read each row three
times and the KLs twice. The last pass walks the
row backwards (its tail, read last by pass 1, is the most likely to still be in L2) and writes the
gradient. No atomics: results are bitwise reproducible.

Preconditions: (N, V) logits with a unit column stride and any row stride; float32/bf16/fp16;
int64 row offsets. Importing this module needs Triton (not a GPU); the backend registry imports it
only where Triton can run, so ``import fastkd`` never needs Triton.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import _INTERPRET, _device_ctx


# Autotune candidates, (BLOCK, warps, register cap) per element size and softcap, chosen from the
# compiled code for sm_90 (bench/kernel_resources.py --triton prints the table): every one keeps whole
# 16-byte loads per thread (BLOCK / threads elements of 16 or more bytes), spills nothing for the KLs,
# JSD and TVD (JSD with the teacher gradient is their worst case), and keeps 16-40 KB of loads in
# flight per SM; skew KL has its own list below. The caps hold ptxas to
# 80 or 128 registers where it would otherwise take 160-255 for scheduling slack and halve the resident
# blocks; softcap's tanh needs more live values, so its variants get their own list (uncapped 1024/4
# settles at 96 registers and spills under JSD with softcap; 4096/8 at 128 and 8192/8 spill). num_stages
# is left at 1: the row loops have no tl.dot to pipeline, and num_stages=2 builds the same cubin.
_CANDIDATES = {
    (2, False): ((1024, 4, None), (2048, 8, 80), (4096, 8, 128), (8192, 8, None)),
    (2, True): ((1024, 4, 128), (2048, 8, None), (4096, 16, None)),
    (4, False): ((1024, 4, None), (1024, 8, None), (2048, 8, None), (4096, 16, None)),
    (4, True): ((1024, 4, 128), (1024, 8, None), (2048, 8, None), (4096, 16, None)),
}


# Skew KL's candidates: the shared ones that build without spills for it, with and without the
# teacher's gradient (bench/kernel_resources.py --triton; tests/test_kernel_resources.py).
_SKEW_CANDIDATES = {
    (2, False): ((1024, 4, None), (2048, 8, 80)),
    (2, True): ((1024, 4, 128), (4096, 16, None)),
    (4, False): ((1024, 8, None), (4096, 16, None)),
    (4, True): ((1024, 4, 128), (4096, 16, None)),
}


def _configs():
    if _INTERPRET:  # the interpreter is slow: one small block, so that tests cover several chunks
        return [triton.Config({"BLOCK": 128}, num_warps=4)]
    seen, out = set(), []
    for cands in _CANDIDATES.values():
        for cand in map(_as_built, cands):
            if cand not in seen:
                seen.add(cand)
                block, warps, cap = cand
                out.append(triton.Config({"BLOCK": block}, num_warps=warps, num_stages=1, maxnreg=cap))
    return out


def _as_built(cand):
    """A candidate as this platform builds it: maxnreg is a PTX directive, dropped on ROCm."""
    block, warps, cap = cand
    return block, warps, cap if torch.version.hip is None else None


def _prune(configs, named_args, **kwargs):
    """The candidates of the logits' element size and softcap (both are in the autotuner's key), and
    of the divergence: skew KL keeps more values live per element than the others (m, its log and a
    quotient on top of JSD's), and spills in several of the shared candidates, so it has its own."""
    if _INTERPRET:
        return configs
    size = 2 if named_args["z_ptr"].element_size() == 2 else 4
    key = (size, bool(kwargs.get("HAS_CAP", False)))
    if kwargs.get("DIV") in (4, 5):
        cands = _SKEW_CANDIDATES[key]
        if kwargs.get("TEACHER_GRAD"):  # the 80-register cap spills with the teacher's gradient
            cands = tuple((block, warps, None if cap == 80 else cap) for block, warps, cap in cands)
    else:
        cands = _CANDIDATES[key]
    want = set(map(_as_built, cands))
    return [c for c in configs if (c.kwargs["BLOCK"], c.num_warps, c.maxnreg) in want] or configs


@triton.jit
def _softcap(x, cap, inv_cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        # cap·tanh(x/cap) from exp(−2|u|) (argument <= 0), with the odd series near 0 where 1 − e cancels
        u = x * inv_cap
        au = tl.abs(u)
        e = tl.exp(-2.0 * au)
        big = (1.0 - e) / (1.0 + e)
        u2 = au * au
        small = au * (1.0 + u2 * (-0.3333333333 + u2 * (0.1333333333 + u2 * -0.0539682540)))
        th = tl.where(au < 0.0625, small, big)
        th = tl.where(u < 0.0, -th, th)
        x = tl.where(x != x, x, cap * th)
    return x


@triton.jit
def _stats_chunk(zr, tr, mask, inv_t, m_z, m_t, m_1, d_z, d_t, a_z, a_t, d_1, sum_z,
                 DIV: tl.constexpr, USE_HARD: tl.constexpr, TAU_ONE: tl.constexpr, NEED_SUM: tl.constexpr,
                 MASKED: tl.constexpr):
    """Pass 1 over one chunk: the running maxima (scalars) and per-lane sums, updated."""
    if MASKED:
        zr = tl.where(mask, zr, float("-inf"))
        tr = tl.where(mask, tr, float("-inf"))
    sz = zr * inv_t
    st = tr * inv_t
    new_mz = tl.maximum(m_z, tl.max(sz, axis=0))
    new_mt = tl.maximum(m_t, tl.max(st, axis=0))
    fz = tl.exp(m_z - new_mz)
    ft = tl.exp(m_t - new_mt)
    uz = sz - new_mz  # max-shifted, <= 0
    ut = st - new_mt
    ez = tl.exp(uz)
    et = tl.exp(ut)
    # The KL sums hold max-shifted log-ratios (kd_math.h): a_t = Σ e_t·(u_t − u_z). A new maximum
    # rescales them and shifts every old term by the change of (u_t − u_z); the finite initial
    # maxima keep the shift finite, and lanes without mass have d = 0.
    shift = (new_mt - m_t) - (new_mz - m_z)
    # 0·log 0 = 0: entries without mass are skipped (−inf − −inf would be NaN)
    if DIV == 1:
        a_z = fz * (a_z + d_z * shift) + tl.where(ez > 0.0, ez * (uz - ut), 0.0)
    if DIV == 0:
        a_t = ft * (a_t - d_t * shift) + tl.where(et > 0.0, et * (ut - uz), 0.0)
    d_z = d_z * fz + ez
    d_t = d_t * ft + et
    if USE_HARD:
        if not TAU_ONE:
            new_m1 = tl.maximum(m_1, tl.max(zr, axis=0))
            d_1 = d_1 * tl.exp(m_1 - new_m1) + tl.exp(zr - new_m1)
            m_1 = new_m1
        if NEED_SUM:
            if MASKED:
                sum_z += tl.where(mask, zr, 0.0)
            else:
                sum_z += zr
    return new_mz, new_mt, m_1, d_z, d_t, a_z, a_t, d_1, sum_z


@triton.jit
def _jsd_log_m(lq, lp, q, p, w, log_w, log_w1):
    """JSD's log m = log(w·p + (1−w)·q), bounded below by either term's own log (an underflowed m
    would otherwise turn q·(log q − log m) into q·inf)."""
    return tl.maximum(tl.log(w * p + (1.0 - w) * q), tl.maximum(lq + log_w1, lp + log_w))


@triton.jit
def _skew_mixture(q, p, lq, lp, w, log_w, log_w1, DIV: tl.constexpr):
    """Skew KL's sides and mixture: a (the side w multiplies in m: q for skew reverse KL, else p), its
    log, the other side b, m = w·a + (1−w)·b and log m with the same lower bound as JSD's."""
    if DIV == 5:
        a = q
        b = p
        la = lq
        lb = lp
    else:
        a = p
        b = q
        la = lp
        lb = lq
    m = w * a + (1.0 - w) * b
    lm = tl.maximum(tl.log(m), tl.maximum(lb + log_w1, la + log_w))
    return a, b, la, m, lm


@triton.jit
def _sums_chunk(zr, tr, mask, inv_t, m_z, m_t, log_dz, log_dt, w, log_w, log_w1, acc0, acc1,
                DIV: tl.constexpr, MASKED: tl.constexpr):
    """The sums pass over one chunk (DIV 2 JSD, 3 TVD, 4 skew forward KL, 5 skew reverse KL): the two
    sums of kd_math.h's table per lane, updated."""
    lq = (zr * inv_t - m_z) - log_dz
    lp = (tr * inv_t - m_t) - log_dt
    if MASKED:
        lq = tl.where(mask, lq, float("-inf"))
        lp = tl.where(mask, lp, float("-inf"))
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == 3:
        d = p - q
        acc0 += tl.abs(d)
        acc1 += tl.where(d > 0.0, q, tl.where(d < 0.0, -q, 0.0))
    elif DIV == 2:
        lm = _jsd_log_m(lq, lp, q, p, w, log_w, log_w1)
        acc0 += tl.where(q > 0.0, q * (lq - lm), 0.0)
        acc1 += tl.where(p > 0.0, p * (lp - lm), 0.0)
    else:  # skew KL
        a, b, la, m, lm = _skew_mixture(q, p, lq, lp, w, log_w, log_w1, DIV)
        acc0 += tl.where(a > 0.0, a * (la - lm), 0.0)
        # m > 0, not a > 0: w·a can underflow to 0 for a tiny a > 0 (the select drops a/0); the
        # approximate division saves the registers of the IEEE one (2 ulp, like tl.exp)
        acc1 += tl.where(m > 0.0, b * tl.fdiv(a, m), 0.0)
    return acc0, acc1


@triton.jit
def _grad_chunk(zr, tr, col, y_local, inv_t, m_z, m_t, log_dz, log_dt, m_h, log_dh, soft, dsoft, s0, s1, s_c,
                w, log_w, log_w1, hard, eps, eps_over_v, inv_cap, g_scale,
                DIV: tl.constexpr, USE_HARD: tl.constexpr, TAU_ONE: tl.constexpr, HAS_CAP: tl.constexpr):
    """The gradients of one chunk w.r.t. the student (g) and teacher (h) logits, already scaled."""
    lq = (zr * inv_t - m_z) - log_dz
    lp = (tr * inv_t - m_t) - log_dt
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == 0:
        g = soft * (q - p)
        h = tl.where(p > 0.0, soft * p * ((lp - lq) - dsoft), 0.0)
    elif DIV == 1:
        g = tl.where(q > 0.0, soft * q * ((lq - lp) - dsoft), 0.0)
        h = soft * (p - q)
    elif DIV == 2:
        lm = _jsd_log_m(lq, lp, q, p, w, log_w, log_w1)
        g = tl.where(q > 0.0, soft * (1.0 - w) * q * ((lq - lm) - s0), 0.0)
        h = tl.where(p > 0.0, soft * w * p * ((lp - lm) - s1), 0.0)
    elif DIV == 3:  # sgn(0) = 0: the subgradient where p_i = q_i
        d = p - q
        sg = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        g = (-0.5 * soft) * q * (sg - s1)
        h = (0.5 * soft) * p * (sg - (s0 + s1))
    else:  # skew KL: a the side w multiplies in m, b the other one; s_c = 1 − (1−w)·s1 − s0
        a, b, la, m, lm = _skew_mixture(q, p, lq, lp, w, log_w, log_w1, DIV)
        r = tl.where(m > 0.0, tl.fdiv(a, m), 0.0)
        ga = tl.where(a > 0.0, soft * a * ((la - lm) + s_c - w * r), 0.0)
        gb = (soft * (1.0 - w)) * b * (s1 - r)
        if DIV == 5:
            g = ga
            h = gb
        else:
            g = gb
            h = ga
    if USE_HARD:
        if TAU_ONE:
            q1 = q
        else:
            q1 = tl.exp((zr - m_h) - log_dh)
        g += hard * (q1 - eps_over_v)
        g -= tl.where(col == y_local, hard * (1.0 - eps), 0.0)
    if HAS_CAP:  # d(c·tanh(x/c))/dx = 1 − tanh², with tanh = capped/c
        g = g * (1.0 - zr * zr * inv_cap * inv_cap)
        h = h * (1.0 - tr * tr * inv_cap * inv_cap)
    return g * g_scale, h * g_scale


# restore_value: the autotuner runs every config on the same arguments, and with inplace_grad (and in
# the fused linear loss) the gradient is written over the student logits: each benchmark run must see
# the logits, not the previous run's gradient. The copy is taken only while a new key is tuned.
@triton.autotune(configs=_configs(), key=["V", "DIV", "USE_HARD", "TEACHER_GRAD", "WRITE_GRAD", "HAS_CAP"],
                 prune_configs_by={"early_config_prune": _prune}, restore_value=["z_ptr"])
@triton.jit
def _kd_rows_kernel(
    z_ptr, t_ptr, y_ptr, div_ptr, loss_ptr, gz_ptr, gt_ptr,
    V, stride_z, stride_t, stride_gz, stride_gt, stride_y,
    inv_t, soft_scale, soft, hard, eps, eps_over_v, w, log_w, log_w1, cap, inv_cap,
    ignore_index,
    DIV: tl.constexpr, USE_HARD: tl.constexpr, TAU_ONE: tl.constexpr, NEED_SUM: tl.constexpr,
    HAS_CAP: tl.constexpr, TEACHER_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Row starts as element offsets from the (16-byte aligned, when the launcher says so) base pointers.
    ez = row * stride_z
    et = row * stride_t
    egz = row * stride_gz
    egt = row * stride_gt
    cols = tl.arange(0, BLOCK)

    # Each row splits into BLOCK-wide body chunks that start on a 16-byte boundary of every tensor
    # walked (VEC elements: loaded without a mask, so the compiler emits 16-byte vector loads for any
    # V and row stride, V = 50257 included) and a remainder: the h columns before the first boundary
    # and the columns after the last whole chunk, gathered under a mask. When the tensors' rows start
    # at different offsets from a boundary, the whole row is remainder.
    h = (VEC - ez % VEC) % VEC
    same = (et + h) % VEC == 0
    if WRITE_GRAD:
        same = same & ((egz + h) % VEC == 0)
    if TEACHER_GRAD:
        same = same & ((egt + h) % VEC == 0)
    h = tl.where(same & (h < V), h, 0).to(tl.int32)
    nb = tl.where(same, (V - h) // BLOCK, 0).to(tl.int32)
    n_rem = V - nb * BLOCK  # columns [0, h) and [h + nb·BLOCK, V)
    r_chunks = tl.cdiv(n_rem, BLOCK)
    body = nb * BLOCK
    z_row = z_ptr + ez
    t_row = t_ptr + et
    gz_row = gz_ptr + egz
    gt_row = gt_ptr + egt
    # the body's start in each tensor: a multiple of VEC elements from its base pointer
    z_body = z_ptr + tl.multiple_of(ez + h, VEC)
    t_body = t_ptr + tl.multiple_of(et + h, VEC)
    gz_body = gz_ptr + tl.multiple_of(egz + h, VEC)
    gt_body = gt_ptr + tl.multiple_of(egt + h, VEC)

    y = tl.load(y_ptr + row * stride_y)
    keep = y != ignore_index
    if keep:
        valid_y = (y >= 0) & (y < V)
        y_safe = tl.where(valid_y, y, 0)
        y_local = tl.where(valid_y, y, -1)
        y_body = y_local - h  # the target's column counted from the body's start
        inv_div = 1.0 / tl.load(div_ptr).to(tl.float32)
        # z at the target, read before pass 1: the cross-warp reductions of pass 1 then order it
        # before every gradient store, which matters when the gradient overwrites z in place
        # (inplace_grad, the fused linear loss); read after them, a warp already storing gradients
        # could overwrite z[y] before a slower warp loaded it.
        z_y = _softcap(tl.load(z_row + y_safe).to(tl.float32), cap, inv_cap, HAS_CAP)

        # ---- pass 1: online stats (DIV: 0 forward KL, 1 reverse KL, 2 JSD, 3 TVD, 4/5 skew KL) ----
        # running maxima start at a finite "−inf", so exp(m_old − m_new) is defined for all −inf chunks
        m_z = -3.0e38
        m_t = -3.0e38
        m_1 = -3.0e38
        d_z = tl.zeros([BLOCK], dtype=tl.float32)
        d_t = tl.zeros([BLOCK], dtype=tl.float32)
        a_z = tl.zeros([BLOCK], dtype=tl.float32)
        a_t = tl.zeros([BLOCK], dtype=tl.float32)
        d_1 = tl.zeros([BLOCK], dtype=tl.float32)
        sum_z = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, r_chunks):
            q = c * BLOCK + cols
            col = tl.where(q < h, q, q + nb * BLOCK)
            mask = q < n_rem
            zr = _softcap(tl.load(z_row + col, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            tr = _softcap(tl.load(t_row + col, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            m_z, m_t, m_1n, d_z, d_t, a_zn, a_tn, d_1n, sum_zn = _stats_chunk(
                zr, tr, mask, inv_t, m_z, m_t, m_1, d_z, d_t, a_z, a_t, d_1, sum_z,
                DIV, USE_HARD, TAU_ONE, NEED_SUM, True)
            if DIV == 1:
                a_z = a_zn
            if DIV == 0:
                a_t = a_tn
            if USE_HARD and not TAU_ONE:
                m_1 = m_1n
                d_1 = d_1n
            if NEED_SUM:
                sum_z = sum_zn

        for c in range(0, nb):
            zr = _softcap(tl.load(z_body + c * BLOCK + cols, mask=c * BLOCK + cols < body, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            tr = _softcap(tl.load(t_body + c * BLOCK + cols, mask=c * BLOCK + cols < body, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            m_z, m_t, m_1n, d_z, d_t, a_zn, a_tn, d_1n, sum_zn = _stats_chunk(
                zr, tr, cols, inv_t, m_z, m_t, m_1, d_z, d_t, a_z, a_t, d_1, sum_z,
                DIV, USE_HARD, TAU_ONE, NEED_SUM, False)
            # only the sums this configuration updates are carried by the loop (a pass-through
            # would still cost its registers)
            if DIV == 1:
                a_z = a_zn
            if DIV == 0:
                a_t = a_tn
            if USE_HARD and not TAU_ONE:
                m_1 = m_1n
                d_1 = d_1n
            if NEED_SUM:
                sum_z = sum_zn
        dz = tl.sum(d_z, axis=0)
        dt = tl.sum(d_t, axis=0)
        # log q = (s_z − m_z) − log d_z in that order: s_z − lse_z would lose ulp(|s_z|) absolute
        log_dz = tl.log(dz)
        log_dt = tl.log(dt)
        has_nan = (dz != dz) | (dt != dt)
        if DIV == 0:
            dsoft = tl.maximum(tl.sum(a_t, axis=0) / dt - log_dt + log_dz, 0.0)
        elif DIV == 1:
            dsoft = tl.maximum(tl.sum(a_z, axis=0) / dz - log_dz + log_dt, 0.0)
        else:
            dsoft = 0.0
        s0 = 0.0
        s1 = 0.0
        s_c = 0.0

        # ---- JSD, TVD, skew KL: their sums need the final normalisers ----
        if DIV >= 2:
            acc_q = tl.zeros([BLOCK], dtype=tl.float32)
            acc_p = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, nb):
                zr = _softcap(tl.load(z_body + c * BLOCK + cols, mask=c * BLOCK + cols < body, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
                tr = _softcap(tl.load(t_body + c * BLOCK + cols, mask=c * BLOCK + cols < body, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
                acc_q, acc_p = _sums_chunk(zr, tr, cols, inv_t, m_z, m_t, log_dz, log_dt, w, log_w,
                                           log_w1, acc_q, acc_p, DIV, False)
            for c in range(0, r_chunks):
                q = c * BLOCK + cols
                col = tl.where(q < h, q, q + nb * BLOCK)
                mask = q < n_rem
                zr = _softcap(tl.load(z_row + col, mask=mask, other=0.0).to(tl.float32), cap, inv_cap,
                              HAS_CAP)
                tr = _softcap(tl.load(t_row + col, mask=mask, other=0.0).to(tl.float32), cap, inv_cap,
                              HAS_CAP)
                acc_q, acc_p = _sums_chunk(zr, tr, mask, inv_t, m_z, m_t, log_dz, log_dt, w, log_w,
                                           log_w1, acc_q, acc_p, DIV, True)
            s0 = tl.sum(acc_q, axis=0)
            s1 = tl.sum(acc_p, axis=0)
            if DIV == 2:
                dsoft = tl.maximum(w * s1 + (1.0 - w) * s0, 0.0)
            elif DIV == 3:
                dsoft = tl.maximum(0.5 * s0, 0.0)
            else:
                dsoft = tl.maximum(s0, 0.0)
                s_c = 1.0 - (1.0 - w) * s1 - s0  # the row constant of skew KL's gradient

        # ---- the row's loss ----
        row_loss = soft_scale * dsoft
        m_h = m_z
        log_dh = log_dz
        if USE_HARD:
            if not TAU_ONE:
                m_h = m_1
                log_dh = tl.log(tl.sum(d_1, axis=0))
            ce = (1.0 - eps) * ((m_h - z_y) + log_dh)
            if NEED_SUM:
                ce += eps * ((m_h - tl.sum(sum_z, axis=0) / V) + log_dh)
            row_loss += hard * ce
        row_loss = tl.where(has_nan | (~valid_y), float("nan"), row_loss)
        tl.store(loss_ptr + row, row_loss * inv_div)

        # ---- last pass: the gradient (none when no gradient is wanted), walking the row backwards:
        # the remainder (which holds the row's end) first, then the body chunks from the last one ----
        if WRITE_GRAD:
            g_scale = tl.where(valid_y, inv_div, float("nan"))
            for c in range(0, r_chunks):
                q = c * BLOCK + cols
                col = tl.where(q < h, q, q + nb * BLOCK)
                mask = q < n_rem
                zr = _softcap(tl.load(z_row + col, mask=mask, other=0.0).to(tl.float32), cap, inv_cap,
                              HAS_CAP)
                tr = _softcap(tl.load(t_row + col, mask=mask, other=0.0).to(tl.float32), cap, inv_cap,
                              HAS_CAP)
                g, hh = _grad_chunk(zr, tr, col, y_local, inv_t, m_z, m_t, log_dz, log_dt, m_h, log_dh, soft,
                                    dsoft, s0, s1, s_c, w, log_w, log_w1, hard, eps, eps_over_v, inv_cap,
                                    g_scale, DIV, USE_HARD, TAU_ONE, HAS_CAP)
                tl.store(gz_row + col, g.to(gz_ptr.dtype.element_ty), mask=mask)
                if TEACHER_GRAD:
                    tl.store(gt_row + col, hh.to(gt_ptr.dtype.element_ty), mask=mask)
            for i in range(0, nb):
                off = (nb - 1 - i) * BLOCK + cols
                zr = _softcap(tl.load(z_body + off, mask=off < body, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
                tr = _softcap(tl.load(t_body + off, mask=off < body, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
                g, hh = _grad_chunk(zr, tr, off, y_body, inv_t, m_z, m_t, log_dz, log_dt, m_h, log_dh, soft,
                                    dsoft, s0, s1, s_c, w, log_w, log_w1, hard, eps, eps_over_v, inv_cap,
                                    g_scale, DIV, USE_HARD, TAU_ONE, HAS_CAP)
                tl.store(gz_body + off, g.to(gz_ptr.dtype.element_ty), mask=off < body)
                if TEACHER_GRAD:
                    tl.store(gt_body + off, hh.to(gt_ptr.dtype.element_ty), mask=off < body)
    else:  # an ignored row contributes nothing, not even NaN
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for j in range(0, tl.cdiv(V, BLOCK)):
                offs = j * BLOCK + cols
                mask = offs < V
                tl.store(gz_row + offs, tl.zeros([BLOCK], dtype=gz_ptr.dtype.element_ty), mask=mask)
                if TEACHER_GRAD:
                    tl.store(gt_row + offs, tl.zeros([BLOCK], dtype=gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(x_ptr, g_ptr, V, stride_x, stride_g, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(g_ptr + row * stride_g).to(tl.float32)
    if s != 1.0:  # decided on the device: loss.backward() (g == 1) skips the N×V pass
        x_row = x_ptr + row * stride_x
        for c in range(0, tl.cdiv(V, BLOCK)):
            offs = c * BLOCK + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_row + offs, (x * s).to(x_ptr.dtype.element_ty), mask=mask)


def scale_rows_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad.mul_(g.unsqueeze(-1))`` for a (N, V) gradient and (N,) factors, in place; rows whose
    factor is exactly 1 are skipped on the device (no host sync, no N×V pass for loss.backward())."""
    n, v = grad.shape
    if n == 0:
        return grad
    gf = (g if g.dtype == torch.float32 else g.float()).expand(n)
    block = 128 if _INTERPRET else 4096
    with _device_ctx(grad):
        _scale_rows_kernel[(n,)](grad, gf, v, grad.stride(0), gf.stride(0), BLOCK=block,
                                 num_warps=4 if _INTERPRET else 8)
    return grad


def triton_kd(student, teacher, target, divisor, loss, grad_s, grad_t, p) -> None:
    """Fills ``loss`` (N,) float32 and the gradients (the ``kd`` contract of
    ``fastkd/_backends/README.md``)."""
    n, v = student.shape
    if n == 0:
        return
    if target is not None:
        y, stride_y, ignore = target, target.stride(0), p.ignore_index
    else:  # one dummy class id for every row, and an ignore_index it cannot equal
        y, stride_y, ignore = torch.zeros(1, dtype=torch.long, device=student.device), 0, -1
    use_hard = target is not None and p.hard_weight != 0.0
    w = p.beta  # the mixture weight: JSD's β, skew KL's α
    log_w = math.log(w) if w > 0.0 else float("-inf")
    log_w1 = math.log1p(-w) if w < 1.0 else float("-inf")
    write_grad = grad_s is not None
    teacher_grad = write_grad and grad_t is not None
    gz = grad_s if write_grad else loss     # never written when WRITE_GRAD is False (loss only)
    gt = grad_t if teacher_grad else gz      # never written when TEACHER_GRAD is False
    with _device_ctx(student):
        _kd_rows_kernel[(n,)](
            student, teacher, y, divisor, loss, gz, gt,
            v, student.stride(0), teacher.stride(0), gz.stride(0), gt.stride(0), stride_y,
            1.0 / p.temperature, p.soft_scale, p.soft_scale / p.temperature, p.hard_weight,
            p.label_smoothing, p.label_smoothing / v, w, log_w, log_w1,
            p.softcap, (1.0 / p.softcap) if p.softcap > 0.0 else 0.0, ignore,
            DIV=p.divergence, USE_HARD=use_hard, TAU_ONE=p.temperature == 1.0,
            NEED_SUM=use_hard and p.label_smoothing > 0.0, HAS_CAP=p.softcap > 0.0,
            TEACHER_GRAD=teacher_grad, WRITE_GRAD=write_grad, VEC=16 // student.element_size(),
        )

