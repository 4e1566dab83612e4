"""Fused linear KD: distillation through the LM heads without materialising the (N, V) logits.

What is fused, per chunk of ``chunk`` token rows: the student and teacher head GEMMs (float32 output),
the fused kd kernel (loss rows and the gradient of the logits in one call, through the op layer's
registered impl), and the backward GEMMs dH_s = dZ @ W_s, dW_s += dZᵀ @ H_s, db_s += Σ dZ (teacher side
likewise when it requires grad). Gradients are accumulated in float32 (float64 for float64 inputs).

Never materialised: logits, probabilities or logit gradients of more than ``chunk`` rows; only two
(three with a trainable teacher) chunk×V float32 buffers live at once, reused across chunks.

Preconditions: 2-D heads ``weight (V, H)`` as in ``nn.Linear``; hidden states ``(..., H)``; all on one
device. Backward of "mean"/"sum" only rescales the gradients stored by forward; "none" recomputes the
chunks in backward with the per-row upstream gradient (storing per-row weight gradients is impossible).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import _inputs
from ._backends import registry
from .cache.teacher import SparseTeacher
from ._settings import KDSettings, KernelParams, acc_dtype, check, check_hard_target, kd_settings

# Bytes of chunk×V work buffers when chunk_size is None. A GPU needs a few hundred rows per GEMM to
# stay efficient (256 MiB is 256 rows at V=128k); a CPU GEMM is already efficient at tens of rows, so
# there the smaller budget only lowers the peak.
_DEFAULT_BUDGET = {"cuda": 256 * 1024 * 1024, "cpu": 64 * 1024 * 1024}
_MIN_CHUNK = 16


@dataclass(frozen=True)
class _Cfg:
    """Static settings of one call; everything the chunk loop needs besides tensors."""

    vocab: int
    chunk: int
    backend: str
    student_cdt: torch.dtype  # dtype the student GEMMs run in (autocast dtype under autocast)
    teacher_cdt: torch.dtype
    acc: torch.dtype  # logits / accumulation dtype: float32, or float64 for float64 students
    reduce: bool  # "mean"/"sum" (scalar loss) versus "none" (per-row loss)
    settings: KDSettings  # the loss settings (temperature resolved)
    params: KernelParams  # the same, as the fused kernels take them
    sparse: bool = False  # teacher given as a SparseTeacher (no teacher head)
    grad_enabled: bool = True  # False under no_grad: forward skips every gradient GEMM
    entropy: bool = False  # forward also returns each row's student entropy


def default_budget(device_type: str = "cpu") -> int:
    raw = os.environ.get("FASTKD_LINEAR_CHUNK_BYTES")
    if raw:
        return int(raw)
    return _DEFAULT_BUDGET.get(device_type, _DEFAULT_BUDGET["cuda"])


def pick_chunk_size(n_rows: int, vocab: int, *, n_buffers: int = 2, itemsize: int = 4,
                    memory_budget: Optional[int] = None, device_type: str = "cpu") -> int:
    """Rows per chunk so that ``n_buffers`` chunk×vocab work buffers fit in ``memory_budget`` bytes
    (default: :func:`default_budget` of ``device_type``).

    The result is a multiple of 16 (GEMM-friendly) unless it covers all rows, and never below 16.
    """
    budget = default_budget(device_type) if memory_budget is None else int(memory_budget)
    per_row = max(1, n_buffers * itemsize * vocab)
    rows = max(_MIN_CHUNK, budget // per_row)
    if rows >= n_rows:
        return max(1, n_rows)
    return max(_MIN_CHUNK, (rows // _MIN_CHUNK) * _MIN_CHUNK)


# ----------------------------------------------------------------------------------------------
# GEMM helpers: low-precision inputs, float32 outputs
# ----------------------------------------------------------------------------------------------
def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns a @ b in out.dtype, written into ``out`` where the dtypes allow it."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype and out.dtype == torch.float32:
        try:  # tensor-core GEMM with a float32 result (torch >= 2.8 on CUDA)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            pass
    # CPU bf16/fp16, or an older torch: GEMM in the input dtype (float32 accumulate), then upcast.
    if a.dtype != b.dtype:
        a, b = a.to(out.dtype), b.to(out.dtype)
        return torch.mm(a, b, out=out)
    out.copy_(torch.mm(a, b))
    return out


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc += a @ b (acc = a @ b when ``first``: no zero-fill pass over a V×H buffer).

    acc is float32/float64; a is a logit gradient in acc.dtype; b holds hidden rows (any float dtype).
    """
    if b.dtype != acc.dtype and acc.is_cuda and acc.dtype == torch.float32:
        try:  # low-precision tensor-core GEMM with a float32 accumulator
            if first:
                torch.mm(a.to(b.dtype), b, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, a.to(b.dtype), b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    # The hidden chunk is small (chunk×H): upcasting it keeps the whole sum in acc's precision.
    b = b if b.dtype == acc.dtype else b.to(acc.dtype)
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def _logits(buf: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    z = _mm_into(buf, h, w.t())
    if b is not None:
        z.add_(b)
    return z


def _as_compute(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x if x.dtype == dtype else x.to(dtype)


def _head_grad(param: torch.Tensor, vocab: int, acc: torch.dtype) -> torch.Tensor:
    grad = torch.empty(param.shape, dtype=acc, device=param.device)
    if param.shape[0] > vocab:
        grad[vocab:].zero_()
    return grad


def _colsum_acc(acc: torch.Tensor, d: torch.Tensor, first: bool) -> None:
    if first:
        torch.sum(d, 0, out=acc)
    else:
        acc.add_(d.sum(0))


def _entropy_rows(cfg: _Cfg, z: torch.Tensor) -> torch.Tensor:
    """H(q) = logsumexp(s) − Σ softmax(s)·s per row, with s = softcap(z)/τ: the entropy of the student
    softmax the soft term uses. Read before the kd kernel overwrites ``z`` with its gradient."""
    st = cfg.settings
    x = (z if st.softcap is None else torch.tanh(z / st.softcap) * st.softcap) / st.temperature
    lse = torch.logsumexp(x, -1, keepdim=True)
    return lse.squeeze(-1) - (torch.exp(x - lse) * x).sum(-1)


# ----------------------------------------------------------------------------------------------
# The chunk loop (shared by forward and the recomputing backward of reduction="none")
# ----------------------------------------------------------------------------------------------
def _kd_chunk(cfg: _Cfg, z, t, y, divisor, loss_out, need_dz: bool, need_dt: bool):
    """Fills loss_out (rows / divisor) and returns (dz, dt): gradients of Σ loss_out w.r.t. z and t.

    With a fused backend dz overwrites z's buffer (the kernels allow grad_z to alias z).
    """
    impl = registry.implementation("kd", cfg.backend)
    if "autograd" in impl.caps:
        with torch.enable_grad():
            zr = z.detach().requires_grad_(need_dz)
            tr = t.detach().requires_grad_(need_dt)
            rows = impl.fn(zr, tr, y, divisor, cfg.params)
            loss_out.copy_(rows.detach())
            wrt = [x for x, need in ((zr, need_dz), (tr, need_dt)) if need]
            if not wrt:
                return None, None
            grads = list(torch.autograd.grad(rows.sum(), wrt))
        dz = grads.pop(0) if need_dz else None
        dt = grads.pop(0) if need_dt else None
        return dz, dt
    dt = torch.empty_like(t) if need_dt else None
    impl.fn(z, t, y, divisor, loss_out, z, dt, cfg.params)
    return z, dt


def _sparse_chunk(cfg: _Cfg, z, sparse_rows, y, divisor, loss_out, need_dz: bool):
    """A chunk against a SparseTeacher: fastkd.sparse_kd_loss on the chunk's logits (its kernel, its
    checks), divided by the whole batch's divisor; the gradient comes from its fused backward."""
    from .losses import sparse_kd_loss

    st = cfg.settings
    with torch.enable_grad():
        zr = z.detach().requires_grad_(need_dz)
        rows = sparse_kd_loss(zr, sparse_rows, y, reduction="none", tail=st.tail, temperature=st.temperature,
                              soft_weight=st.soft_weight, hard_weight=st.hard_weight, divergence=st.divergence,
                              ignore_index=st.ignore_index, label_smoothing=st.label_smoothing,
                              t2_scale=st.t2_scale, backend=st.backend) / divisor.to(z.dtype)
        loss_out.copy_(rows.detach())
        if not need_dz:
            return None
        (dz,) = torch.autograd.grad(rows.sum(), [zr])
    return dz


def _run(cfg: _Cfg, hs, ws, bs, teacher, wt, bt, y, divisor, *, grad_rows=None,
         need=(True, True, True, False, False, False), entropy_out=None):
    """One sweep over the row chunks.

    Returns (loss_rows, dHs, dWs, dbs, dHt, dWt, dbt); a gradient is None unless ``need`` asks for it.
    With ``grad_rows`` (N,), every row's gradient is multiplied by it (the backward of "none").
    With ``entropy_out`` (N,), each row's student entropy (:func:`_entropy_rows`) is written into it.
    """
    n = hs.shape[0]
    V, acc, chunk = cfg.vocab, cfg.acc, cfg.chunk
    dev = hs.device
    need_hs, need_ws, need_bs, need_ht, need_wt, need_bt = need
    need_dz = need_hs or need_ws or need_bs
    need_dt = need_ht or need_wt or need_bt

    # GEMM operands in their compute dtypes (autocast); heads restricted to the shared vocabulary.
    hs_c = _as_compute(hs, cfg.student_cdt)
    ws_c = _as_compute(ws[:V], cfg.student_cdt)
    bs_c = _as_compute(None if bs is None else bs[:V], cfg.student_cdt)
    if not cfg.sparse:
        ht_c = _as_compute(teacher, cfg.teacher_cdt)
        wt_c = _as_compute(wt[:V], cfg.teacher_cdt)
        bt_c = _as_compute(None if bt is None else bt[:V], cfg.teacher_cdt)

    loss_rows = torch.empty(n, dtype=acc, device=dev)
    d_hs = torch.empty(n, hs.shape[1], dtype=acc, device=dev) if need_hs else None
    d_ht = torch.empty(n, teacher.shape[1], dtype=acc, device=dev) if need_ht else None
    # The first chunk writes the head gradients (no zero-fill pass); rows past V stay exactly zero.
    d_ws = _head_grad(ws, V, acc) if need_ws else None
    d_bs = _head_grad(bs, V, acc) if need_bs else None
    d_wt = _head_grad(wt, V, acc) if need_wt else None
    d_bt = _head_grad(bt, V, acc) if need_bt else None

    zbuf = torch.empty(min(chunk, n), V, dtype=acc, device=dev)
    tbuf = None if cfg.sparse else torch.empty(min(chunk, n), V, dtype=acc, device=dev)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        m = e - s
        z = _logits(zbuf[:m], hs_c[s:e], ws_c, bs_c)
        if entropy_out is not None:
            entropy_out[s:e] = _entropy_rows(cfg, z)
        yc = None if y is None else y[s:e]
        if cfg.sparse:
            dz = _sparse_chunk(cfg, z, teacher[s:e], yc, divisor, loss_rows[s:e], need_dz)
            dt = None
        else:
            t = _logits(tbuf[:m], ht_c[s:e], wt_c, bt_c)
            dz, dt = _kd_chunk(cfg, z, t, yc, divisor, loss_rows[s:e], need_dz, need_dt)
        if grad_rows is not None:
            g = grad_rows[s:e].to(acc).unsqueeze(-1)
            dz = dz.mul_(g) if dz is not None else None
            dt = dt.mul_(g) if dt is not None else None
        if need_hs:
            _mm_into(d_hs[s:e], dz if ws_c.dtype == acc else dz.to(ws_c.dtype), ws_c)
        first = s == 0
        if need_ws:
            _addmm_acc(d_ws[:V], dz.t(), hs_c[s:e], first)
        if need_bs:
            _colsum_acc(d_bs[:V], dz, first)
        if need_ht:
            _mm_into(d_ht[s:e], dt if wt_c.dtype == acc else dt.to(wt_c.dtype), wt_c)
        if need_wt:
            _addmm_acc(d_wt[:V], dt.t(), ht_c[s:e], first)
        if need_bt:
            _colsum_acc(d_bt[:V], dt, first)
    return loss_rows, d_hs, d_ws, d_bs, d_ht, d_wt, d_bt


class _LinearKD(torch.autograd.Function):
    """Loss of the chunked linear KD; backward scales what forward stored (or recomputes, for "none")."""

    @staticmethod
    def forward(ctx, cfg: _Cfg, hs, ws, bs, teacher, wt, bt, y, divisor):
        inputs = (hs, ws, bs, teacher, wt, bt)
        need = tuple(bool(x is not None and torch.is_tensor(x) and ctx.needs_input_grad[i + 1])
                     for i, x in enumerate(inputs))
        if cfg.sparse:
            need = need[:3] + (False, False, False)
        if not cfg.grad_enabled:
            need = (False,) * 6
        ctx.cfg = cfg
        ctx.need = need
        ctx.spent = False
        ctx.in_dtypes = tuple(x.dtype if torch.is_tensor(x) else None for x in inputs)
        # Each row's student entropy when asked for (a metric: no gradient), else an empty tensor.
        entropy = torch.empty(hs.shape[0] if cfg.entropy else 0, dtype=cfg.acc, device=hs.device)
        ctx.mark_non_differentiable(entropy)
        ent_out = entropy if cfg.entropy else None
        with torch.autocast(hs.device.type, enabled=False):
            if cfg.reduce:
                out = _run(cfg, hs, ws, bs, teacher, wt, bt, y, divisor, need=need, entropy_out=ent_out)
                ctx.save_for_backward(*out[1:])
                return out[0].sum(), entropy
            loss_rows, *_ = _run(cfg, hs, ws, bs, teacher, wt, bt, y, divisor,
                                 need=(False,) * 6, entropy_out=ent_out)
        ctx.sparse_teacher = teacher if cfg.sparse else None
        ctx.save_for_backward(hs, ws, bs, None if cfg.sparse else teacher, wt, bt, y, divisor)
        return loss_rows, entropy

    @staticmethod
    def backward(ctx, g, _entropy_grad=None):
        cfg = ctx.cfg
        if ctx.spent:
            raise RuntimeError("fastkd.fused_linear_kd_loss: backward through the same graph twice is "
                               "not supported (the stored gradients are scaled in place)")
        if cfg.reduce:
            ctx.spent = True
            grads = ctx.saved_tensors
            scale = g.to(cfg.acc)
            # In place: these are this call's private buffers, so no second V×H buffer is needed.
            grads = tuple(None if x is None else x.mul_(scale) for x in grads)
        else:
            hs, ws, bs, teacher, wt, bt, y, divisor = ctx.saved_tensors
            if cfg.sparse:
                teacher = ctx.sparse_teacher
            with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):
                out = _run(cfg, hs, ws, bs, teacher, wt, bt, y, divisor, grad_rows=g, need=ctx.need)
            grads = out[1:]
        grads = tuple(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.in_dtypes))
        return (None,) + grads + (None, None)


def _check_head(name_h: str, name_w: str, name_b: str, h, w, b):
    _inputs.check_logits(name_h, h)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name_w} must be a torch.Tensor of shape (V, H), got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name_w} must have shape (V, H) like nn.Linear.weight, got {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{name_w} must be float32, bfloat16, float16 or float64, got {w.dtype}")
    if h.shape[-1] != w.shape[1]:
        raise ValueError(f"{name_h} must have shape (..., {w.shape[1]}) to match {name_w} of shape "
                         f"{tuple(w.shape)}, got {tuple(h.shape)}")
    if w.device != h.device:
        raise ValueError(f"{name_w} must be on {h.device} like {name_h}, got {w.device}")
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name_b} must be a torch.Tensor of shape ({w.shape[0]},) or None")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name_b} must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        if b.device != h.device:
            raise ValueError(f"{name_b} must be on {h.device} like {name_h}, got {b.device}")


def _compute_dtype(name: str, h, w, b) -> torch.dtype:
    """F.linear's rule: the autocast dtype under autocast, else h, w (and b) must share a dtype."""
    dev = h.device.type
    if h.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise TypeError(f"{name}: hidden, weight and bias must share a dtype outside autocast, got "
                        f"{h.dtype}, {w.dtype}" + ("" if b is None else f", {b.dtype}"))
    return h.dtype


@torch.compiler.disable
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden,  # torch.Tensor (..., H_t) or fastkd.SparseTeacher
    teacher_weight: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    tail: str = "bucket",
    temperature: Optional[float] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    softcap: Optional[float] = None,
    num_items: Union[int, torch.Tensor, None] = None,
    backend: str = "auto",
    return_entropy: bool = False,
):
    r"""KD loss through the LM heads, computed chunk by chunk over tokens so that the full (N, V)
    logits never exist.

    With ``V = vocab_size`` (default: the common head size) it equals, up to float32 rounding and
    gradients included (biases optional)::

        zs = (student_hidden @ student_weight[:V].T + student_bias[:V]).float()
        zt = (teacher_hidden @ teacher_weight[:V].T + teacher_bias[:V]).float()
        fastkd.kd_loss(zs, zt, target, **kd_kwargs)

    and, with a SparseTeacher ``st`` in place of the teacher head,
    ``fastkd.sparse_kd_loss(zs, st, target, tail=tail, **kd_kwargs)``. The student's hidden states,
    weight and bias get gradients; the teacher's tensors only where they require grad. Head rows
    ``>= V`` get exactly zero gradient.

    Args:
        student_hidden: ``(..., H_s)`` hidden states entering the student head.
        student_weight: ``(V_s, H_s)`` student head weight (``nn.Linear.weight``).
        teacher_hidden: ``(..., H_t)`` teacher hidden states with the student's leading shape, or a
            ``fastkd.SparseTeacher`` of the same rows (then ``teacher_weight`` must be None and no
            teacher head is run).
        teacher_weight: ``(V_t, H_t)`` teacher head weight.
        target: ``(...)`` class ids or None, as in :func:`fastkd.kd_loss`; ids must be ``< V``.
        student_bias, teacher_bias: optional ``(V_s,)`` / ``(V_t,)`` head biases.
        chunk_size: token rows per chunk; None picks the largest multiple of 16 whose chunk×V float32
            work buffers fit ``memory_budget`` bytes (default 256 MiB on GPU, 64 MiB on CPU, or the
            environment variable ``FASTKD_LINEAR_CHUNK_BYTES``).
        vocab_size: the shared vocabulary ``V`` when the heads differ in size (padded heads, e.g.
            151936 vs 152064): both heads are restricted to their first ``V`` rows.
        memory_budget: bytes for the chunk work buffers when ``chunk_size`` is None.
        return_entropy: also return each row's student entropy ``H(q) = −Σ q·log q`` with
            ``q = softmax(softcap(zs) / τ)`` (the distribution the soft term uses), float32 (float64 for
            float64 students), shape ``(...)``, without gradient: a training metric (TRL logs it) that
            costs one more pass over each chunk's logits and no GEMM.
        tail: SparseTeacher only: how the mass outside the stored ids is treated, as in
            :func:`fastkd.sparse_kd_loss` (``"bucket"``, ``"renorm"``, ``"sampled"``).
        temperature: τ of the soft term; None means 1.0, or the capture temperature of a SparseTeacher
            (which the stored probabilities fix).
        **kd_kwargs: every other keyword argument of :func:`fastkd.kd_loss`: ``soft_weight``,
            ``hard_weight``, ``divergence``, ``beta``, ``skew``, ``ignore_index``,
            ``label_smoothing``, ``reduction``, ``t2_scale``, ``softcap``, ``num_items``,
            ``backend``); ``inplace_grad`` does not apply (the logits are internal buffers).

    Under autocast the head GEMMs run in the autocast dtype (as ``F.linear`` would) with float32
    logits; gradients are accumulated in float32 and returned in each input's own dtype.

    Returns:
        float32 loss (float64 for float64 students): a scalar, or ``(...)`` for ``reduction="none"``;
        with ``return_entropy=True`` the pair ``(loss, entropy)``.
    """
    settings = kd_settings(allow_default_temperature=True, tail=tail, temperature=temperature,
                           soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta, skew=skew,
                           ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                           t2_scale=t2_scale, softcap=softcap, backend=backend)
    check("vocab_size", vocab_size)
    sparse = isinstance(teacher_hidden, SparseTeacher)
    _check_head("student_hidden", "student_weight", "student_bias", student_hidden, student_weight,
                student_bias)
    lead_shape = student_hidden.shape[:-1]
    device = student_hidden.device
    if sparse:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight and teacher_bias must be None when teacher_hidden is a "
                             "SparseTeacher (the cached teacher needs no head)")
    else:
        if teacher_weight is None:
            raise ValueError("teacher_weight (V, H_t) is required unless teacher_hidden is a "
                             "fastkd.SparseTeacher")
        _check_head("teacher_hidden", "teacher_weight", "teacher_bias", teacher_hidden, teacher_weight,
                    teacher_bias)
        if teacher_hidden.shape[:-1] != lead_shape:
            raise ValueError(f"teacher_hidden must have the student's leading shape "
                             f"{tuple(lead_shape)} + (H_t,), got {tuple(teacher_hidden.shape)}")
        if teacher_hidden.device != device:
            raise ValueError(f"teacher_hidden must be on the student's device {device}, "
                             f"got {teacher_hidden.device}")

    v_s = student_weight.shape[0]
    v_t = None if sparse else teacher_weight.shape[0]
    if sparse:
        if vocab_size is None:
            vocab_size = teacher_hidden.vocab_size
        if vocab_size != teacher_hidden.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} must equal the SparseTeacher's vocab_size "
                             f"{teacher_hidden.vocab_size}")
        if teacher_hidden.device != device:
            raise ValueError(f"the SparseTeacher must be on the student's device {device}, "
                             f"got {teacher_hidden.device}")
    if vocab_size is None:
        if not sparse and v_s != v_t:
            raise ValueError(f"student_weight has {v_s} rows (vocabulary columns) but teacher_weight has {v_t}; if "
                             f"one head is padded past the real vocabulary, pass vocab_size=<the real vocabulary "
                             f"size> (<= {min(v_s, v_t)}) and only the first vocab_size columns of each side count")
        vocab_size = v_s
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    limit = v_s if sparse else min(v_s, v_t)
    if not 1 <= vocab_size <= limit:
        raise ValueError(f"vocab_size must lie in [1, {limit}] (the smaller head), got {vocab_size}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    # τ: the capture temperature of a SparseTeacher (which its stored probabilities fix), else 1.
    settings = settings.with_temperature(settings.temperature if settings.temperature is not None
                                         else (teacher_hidden.temperature if sparse else 1.0))
    check_hard_target(settings, target, what="class ids of shape student_hidden.shape[:-1]")

    if target is not None:
        _inputs.check_target(target, lead_shape, vocab_size, ignore_index, device)

    resolved = registry.resolve("kd", settings.backend, device)
    s_cdt = _compute_dtype("student", student_hidden, student_weight, student_bias)
    t_cdt = s_cdt if sparse else _compute_dtype("teacher", teacher_hidden, teacher_weight, teacher_bias)
    acc = acc_dtype(s_cdt)
    registry.check_dtype("kd", resolved, acc, what="students")

    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hs.shape[0]
    if sparse:
        if math.prod(teacher_hidden.shape) != n:
            raise ValueError(f"the SparseTeacher must hold one row per student row ({n}), got shape "
                             f"{tuple(teacher_hidden.shape)}")
        if softcap is not None:
            raise ValueError("softcap is not supported with a SparseTeacher (its probabilities are fixed "
                             "at capture)")
        teacher = teacher_hidden.flatten()
    else:
        teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    y = _inputs.flat_target(target)
    divisor = _inputs.divisor(y, n, reduction, num_items, ignore_index, device, acc)

    teacher_trains = (not sparse) and any(x is not None and x.requires_grad
                                          for x in (teacher_hidden, teacher_weight, teacher_bias))
    if chunk_size is None:
        chunk_size = pick_chunk_size(n, vocab_size, n_buffers=2 + teacher_trains
                                     + (1 if "autograd" in registry.implementation("kd", resolved).caps
                                        or sparse else 0),
                                     itemsize=torch.finfo(acc).bits // 8, memory_budget=memory_budget,
                                     device_type=device.type)
    chunk_size = max(1, min(chunk_size, max(n, 1)))

    cfg = _Cfg(vocab=vocab_size, chunk=chunk_size, backend=resolved, student_cdt=s_cdt,
               teacher_cdt=t_cdt, acc=acc, reduce=reduction != "none", settings=settings,
               params=settings.kernel_params(), sparse=sparse, grad_enabled=torch.is_grad_enabled(),
               entropy=return_entropy)

    if n == 0:  # nothing to distil: an empty batch gives 0 (or an empty "none"), still differentiable
        rows = (student_hidden.sum(-1) * 0).to(acc)
        out = rows if reduction == "none" else rows.sum()
        return (out, rows.detach().reshape(lead_shape)) if return_entropy else out

    t_arg, wt_arg, bt_arg = (teacher, None, None) if sparse else (teacher, teacher_weight, teacher_bias)
    out, entropy = _LinearKD.apply(cfg, hs, student_weight, student_bias, t_arg, wt_arg, bt_arg, y, divisor)
    out = out.reshape(lead_shape) if reduction == "none" else out
    return (out, entropy.reshape(lead_shape)) if return_entropy else out
