"""Fused Triton kd kernel: the ``triton`` backend's ``kd`` (the dense loss of ``fastkd.kd_loss``).

What is fused: per row, the temperature softmaxes of student and teacher, KL(p‖q), KL(q‖p) or
JSD(β), the label-smoothed hard cross-entropy, and the gradients w.r.t. both logits (the row math
of ``csrc/common/kd_math.h``).
Never materialised: p, q, m, any log-probability, the softcapped logits, a float32 copy of a
bf16/fp16 row. The only N×V memory written is the gradient, in the input dtype.

Structure: one program per row. Pass 1 reads the row in BLOCK-wide chunks and keeps one running
maximum per chunk (a scalar) and per-lane rescaled sums, reduced once at the end: one exp per
element and distribution. JSD adds a pass for S_q = KL(q‖m), S_p = KL(p‖m). The last pass walks the
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


def _configs():
    if _INTERPRET:  # the interpreter is slow: one small block, so that tests cover several chunks
        return [triton.Config({"BLOCK": 128}, num_warps=4)]
    # Up to 16 warps: 1024 threads is the work-group limit on both NVIDIA (32-wide) and AMD (64-wide).
    return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
            for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) for s in (1, 2)
            if not (b == 8192 and w == 4) and not (b == 1024 and w == 16)]


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


@triton.autotune(configs=_configs(), key=["V", "DIV", "USE_HARD", "TEACHER_GRAD"])
@triton.jit
def _kd_rows_kernel(
    z_ptr, t_ptr, y_ptr, div_ptr, loss_ptr, gz_ptr, gt_ptr,
    V, stride_z, stride_t, stride_gz, stride_gt, stride_y,
    inv_t, soft_scale, soft, hard, eps, eps_over_v, beta, log_beta, log_beta1, cap, inv_cap,
    ignore_index,
    DIV: tl.constexpr, USE_HARD: tl.constexpr, TAU_ONE: tl.constexpr, NEED_SUM: tl.constexpr,
    HAS_CAP: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    gz_row = gz_ptr + row * stride_gz
    gt_row = gt_ptr + row * stride_gt
    cols = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(V, BLOCK)

    y = tl.load(y_ptr + row * stride_y)
    keep = y != ignore_index
    if keep:
        valid_y = (y >= 0) & (y < V)
        y_safe = tl.where(valid_y, y, 0)
        y_local = tl.where(valid_y, y, -1)
        inv_div = 1.0 / tl.load(div_ptr).to(tl.float32)
        # z at the target, read before pass 1: the cross-warp reductions of pass 1 then order it
        # before every gradient store, which matters when the gradient overwrites z in place
        # (inplace_grad, the fused linear loss); read after them, a warp already storing gradients
        # could overwrite z[y] before a slower warp loaded it.
        z_y = _softcap(tl.load(z_row + y_safe).to(tl.float32), cap, inv_cap, HAS_CAP)

        # ---- pass 1: online stats (DIV: 0 forward KL, 1 reverse KL, 2 JSD) ----
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
        for c in range(0, n_chunks):
            offs = c * BLOCK + cols
            mask = offs < V
            zr = _softcap(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            tr = _softcap(tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
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
            # The KL sums hold max-shifted log-ratios (kd_math.h): a_t = Σ e_t·(u_t − u_z). A new
            # maximum rescales them and shifts every old term by the change of (u_t − u_z); the
            # finite initial maxima keep the shift finite, and lanes without mass have d = 0.
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
                    sum_z += tl.where(mask, zr, 0.0)
            m_z = new_mz
            m_t = new_mt

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
        s_q = 0.0
        s_p = 0.0

        # ---- JSD: S_q, S_p need the final normalisers ----
        if DIV == 2:
            acc_q = tl.zeros([BLOCK], dtype=tl.float32)
            acc_p = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, n_chunks):
                offs = c * BLOCK + cols
                mask = offs < V
                zr = _softcap(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
                tr = _softcap(tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
                lq = tl.where(mask, (zr * inv_t - m_z) - log_dz, float("-inf"))
                lp = tl.where(mask, (tr * inv_t - m_t) - log_dt, float("-inf"))
                q = tl.exp(lq)
                p = tl.exp(lp)
                # log(βp + (1−β)q), bounded below by either term's own log (an underflowed m would
                # otherwise turn q·(log q − log m) into q·inf)
                lm = tl.maximum(tl.log(beta * p + (1.0 - beta) * q),
                                tl.maximum(lq + log_beta1, lp + log_beta))
                acc_q += tl.where(q > 0.0, q * (lq - lm), 0.0)
                acc_p += tl.where(p > 0.0, p * (lp - lm), 0.0)
            s_q = tl.sum(acc_q, axis=0)
            s_p = tl.sum(acc_p, axis=0)
            dsoft = tl.maximum(beta * s_p + (1.0 - beta) * s_q, 0.0)

        # ---- the row's loss ----
        row_loss = soft_scale * dsoft
        if USE_HARD:
            if TAU_ONE:
                m_h = m_z
                log_dh = log_dz
            else:
                m_h = m_1
                log_dh = tl.log(tl.sum(d_1, axis=0))
            ce = (1.0 - eps) * ((m_h - z_y) + log_dh)
            if NEED_SUM:
                ce += eps * ((m_h - tl.sum(sum_z, axis=0) / V) + log_dh)
            row_loss += hard * ce
        row_loss = tl.where(has_nan | (~valid_y), float("nan"), row_loss)
        tl.store(loss_ptr + row, row_loss * inv_div)

        # ---- last pass: the gradient, walking the row backwards ----
        g_scale = tl.where(valid_y, inv_div, float("nan"))
        for i in range(0, n_chunks):
            offs = (n_chunks - 1 - i) * BLOCK + cols
            mask = offs < V
            zr = _softcap(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            tr = _softcap(tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
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
            else:
                lm = tl.maximum(tl.log(beta * p + (1.0 - beta) * q),
                                tl.maximum(lq + log_beta1, lp + log_beta))
                g = tl.where(q > 0.0, soft * (1.0 - beta) * q * ((lq - lm) - s_q), 0.0)
                h = tl.where(p > 0.0, soft * beta * p * ((lp - lm) - s_p), 0.0)
            if USE_HARD:
                if TAU_ONE:
                    q1 = q
                else:
                    q1 = tl.exp((zr - m_h) - log_dh)
                g += hard * (q1 - eps_over_v)
                g -= tl.where(offs == y_local, hard * (1.0 - eps), 0.0)
            if HAS_CAP:  # d(c·tanh(x/c))/dx = 1 − tanh², with tanh = capped/c
                g = g * (1.0 - zr * zr * inv_cap * inv_cap)
                h = h * (1.0 - tr * tr * inv_cap * inv_cap)
            tl.store(gz_row + offs, (g * g_scale).to(gz_ptr.dtype.element_ty), mask=mask)
            if TEACHER_GRAD:
                tl.store(gt_row + offs, (h * g_scale).to(gt_ptr.dtype.element_ty), mask=mask)
    else:  # an ignored row contributes nothing, not even NaN
        tl.store(loss_ptr + row, 0.0)
        for c in range(0, n_chunks):
            offs = c * BLOCK + cols
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
    beta = p.beta
    log_beta = math.log(beta) if beta > 0.0 else float("-inf")
    log_beta1 = math.log1p(-beta) if beta < 1.0 else float("-inf")
    teacher_grad = grad_t is not None
    gt = grad_t if teacher_grad else grad_s  # never written when TEACHER_GRAD is False
    with _device_ctx(student):
        _kd_rows_kernel[(n,)](
            student, teacher, y, divisor, loss, grad_s, gt,
            v, student.stride(0), teacher.stride(0), grad_s.stride(0), gt.stride(0), stride_y,
            1.0 / p.temperature, p.soft_scale, p.soft_scale / p.temperature, p.hard_weight,
            p.label_smoothing, p.label_smoothing / v, beta, log_beta, log_beta1,
            p.softcap, (1.0 / p.softcap) if p.softcap > 0.0 else 0.0, ignore,
            DIV=p.divergence, USE_HARD=use_hard, TAU_ONE=p.temperature == 1.0,
            NEED_SUM=use_hard and p.label_smoothing > 0.0, HAS_CAP=p.softcap > 0.0,
            TEACHER_GRAD=teacher_grad,
        )

