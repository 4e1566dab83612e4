"""Triton kernels of teacher capture: the ``triton`` backend's ``capture_topk`` and ``capture_sample``.

What is fused, per row:

* top-k: the full-vocabulary log-sum-exp of t/τ and the k largest entries come out of ONE sweep over
  the teacher logits. Entries are packed as int64 keys (orderable float bits of t/τ, then the
  complement of the id), so one integer order is "value descending, ties to the smaller id", the CPU
  kernel's order. A threshold entry that at least k kept entries beat filters each chunk (one compare
  per entry); the chunk's few candidates go by one scan and scatter into a small per-row candidate
  buffer (L2-resident scratch), which is cut back to its k best (``tl.topk``) when it fills, raising
  the threshold to their k-th. When a chunk alone would overflow the buffer (the first chunk always
  does), the threshold is first raised to the k-th largest of the chunk's group maxima (k of its
  entries are at least that large), so no sort ever covers more than CAP keys.
* sample: pass 1 writes per-sub-block (max, Σ e^(s − max)) of t/τ (one exp per element); the draw
  kernel turns them into a float64 cdf over sub-blocks, locates each sorted uniform's sub-block, and
  re-reads only the sub-blocks where draws land (float64 ``tl.cumsum`` there).

Never materialised: softmax(t/τ), a sorted or float32 copy of any row. Memory traffic that sets the
goal (N rows of V entries, b bytes each): capture reads N·V·b once, the time of one read being its
floor (plus O(N·CAP) keys of scratch; sampling adds N·V/SUB·8 bytes of statistics and re-reads at
most num_samples sub-blocks of SUB entries per row).

Preconditions: (N, V) logits with a unit column stride and any row stride; float32/bf16/fp16; ids
< 2^31; k <= 512 for the one-sweep top-k (beyond, torch.topk over the same keys: two reads).
Importing this module needs Triton (not a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _INTERPRET, _check_dtype, _device_ctx, _inv_temperature, _next_pow2

# Largest next_pow2(k) the one-sweep top-k kernel takes: its candidate buffer (2·KP keys) is cut
# back with a register tl.topk. Larger k runs a row-chunked torch fallback (two reads of the logits).
_TOPK_KP_MAX = 512
# Smallest candidate buffer of the interpreter, in keys (the compiled configs: _topk_configs).
_TOPK_CAP_MIN = 32


def _selection_network(tl_module, interpret: bool) -> bool:
    """Whether the top-k kernel selects with ``tl.topk``'s bitonic network (compiled kernels) or by
    repeated max extraction: the interpreter runs the latter (the network's xor reductions are slow
    there; tests switch it on for small k), and so does a Triton older than 3.4, which has no
    ``tl.topk`` (torch 2.4-2.7 bring Triton 3.0-3.3)."""
    return hasattr(tl_module, "topk") and not interpret


_TOPK_NETWORK = _selection_network(tl, _INTERPRET)


# ============================================================================================
# capture, top-k
# ============================================================================================
@triton.jit
def _encode_keys(s, ids):
    """(value, id) -> int64 key: larger value first, equal values the smaller id first. ±0 are one
    value (as for the CPU kernel's float compare)."""
    s = tl.where(s == 0.0, 0.0, s)
    b = s.to(tl.int32, bitcast=True)
    o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return (o.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _key_value(key):
    o = (key >> 32).to(tl.int32)
    b = tl.where(o >= 0, o, o ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _key_id(key):
    return (0x7FFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _kth_of_sorted(top, k, KP: tl.constexpr):
    """The k-th entry (1-based) of a descending [KP] tensor, as a scalar."""
    return tl.max(tl.where(tl.arange(0, KP) == k - 1, top, -0x7FFFFFFFFFFFFFFF - 1), axis=0)


@triton.jit
def _top_keys(keys, KP: tl.constexpr, NET: tl.constexpr):
    """The KP largest of distinct int64 keys (padding may repeat the minimum), descending."""
    if NET:
        top = tl.topk(keys, KP)
    else:  # repeated max extraction: the interpreter runs this far faster than the bitonic network
        kp = tl.arange(0, KP)
        top = tl.full([KP], -0x7FFFFFFFFFFFFFFF - 1, tl.int64)
        for i in range(0, KP):
            mx = tl.max(keys, axis=0)
            top = tl.where(kp == i, mx, top)
            keys = tl.where(keys == mx, -0x7FFFFFFFFFFFFFFF - 1, keys)
    return top


@triton.jit
def _kth_value(x, k, KP: tl.constexpr, NET: tl.constexpr):
    """The k-th largest of a 1-D float tensor, counting repeats (k <= KP <= x.numel)."""
    if NET:
        kth = tl.max(tl.where(tl.arange(0, KP) == k - 1, tl.topk(x, KP), float("-inf")), axis=0)
    else:
        idx = tl.arange(0, x.numel)
        kth = float("-inf")
        for _ in range(0, k):
            kth = tl.max(x, axis=0)
            j = tl.min(tl.where(x == kth, idx, x.numel), axis=0)
            x = tl.where(idx == j, float("-inf"), x)
    return kth


@triton.jit
def _cut_back(buf_row, cnt, k, W: tl.constexpr, KP: tl.constexpr, NET: tl.constexpr):
    """Keep the k best of the cnt keys at buf_row (cnt <= W), in place; returns the k-th key."""
    tl.debug_barrier()  # the appends of every thread are visible before they are read back
    pos = tl.arange(0, W)
    keys = tl.load(buf_row + pos, mask=pos < cnt, other=-0x7FFFFFFFFFFFFFFF - 1)
    top = _top_keys(keys, KP, NET)
    tl.debug_barrier()  # every read is done before the kept keys are written over them
    kp = tl.arange(0, KP)
    tl.store(buf_row + kp, top, mask=kp < k)
    return _kth_of_sorted(top, k, KP)


@triton.jit
def _beats(s, offs, thr_val, thr_id):
    """Entries at least as good as the threshold entry (value desc, then id asc)."""
    return (s > thr_val) | ((s == thr_val) & (offs <= thr_id))


@triton.jit
def _raise_thr(thr_val, thr_id, kth_val, kth_id):
    """The better of two thresholds (both are valid: k kept or pending entries beat each)."""
    better = (kth_val > thr_val) | ((kth_val == thr_val) & (kth_id < thr_id))
    return tl.where(better, kth_val, thr_val), tl.where(better, kth_id, thr_id)


@triton.jit(do_not_specialize=["V", "K"])
def _topk_kernel(
    t_ptr, buf_ptr, ids_ptr, vals_ptr, lse_ptr,
    V, K, stride_t, stride_buf, inv_t,
    KP: tl.constexpr, NET: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr,
    NG: tl.constexpr, SUBC: tl.constexpr, FEW: tl.constexpr,
):
    NEG: tl.constexpr = -0x7FFFFFFFFFFFFFFF - 1
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    buf_row = buf_ptr + row * stride_buf
    cols = tl.arange(0, BLOCK)
    sub = tl.arange(0, SUBC)

    m = -3.0e38  # finite, so exp(m_old − m_new) is defined while every entry is −inf
    d = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = 0
    # Threshold entry (value, id): an entry is a candidate when it beats it (_beats). At least k
    # entries kept in the buffer, or still pending in the current chunk, beat it, so nothing that
    # fails can be in the top k. Until k entries were kept, everything passes.
    thr_val = float("-inf")
    thr_id = 0x7FFFFFFF
    for c in range(0, tl.cdiv(V, BLOCK)):
        c0 = c * BLOCK
        offs = c0 + cols
        mask = offs < V
        s = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        cmax = tl.max(s, axis=0)
        new_m = tl.maximum(m, cmax)
        d = d * tl.exp(m - new_m) + tl.exp(s - new_m)
        m = new_m
        if cmax >= thr_val:
            if thr_id < c0:  # the usual case: the threshold entry precedes the chunk, so ties lose
                sel = s > thr_val
            else:
                sel = _beats(s, offs, thr_val, thr_id) & mask
            nsel = tl.sum(sel.to(tl.int32), axis=0)
            if (nsel <= FEW) & (cnt + nsel <= CAP):
                # At most FEW candidates: append them best first, a reduction pair each (no scan).
                for _ in range(0, nsel):
                    bv = tl.max(tl.where(sel, s, float("-inf")), axis=0)
                    bi = tl.min(tl.where(sel & (s == bv), offs, 0x7FFFFFFF), axis=0)
                    tl.store(buf_row + cnt, _encode_keys(bv, bi))
                    cnt += 1
                    sel = sel & (offs != bi)
            elif nsel > 0:
                if G > 0:
                    if cnt + nsel > CAP:
                        # k of the chunk's group maxima are at least its k-th largest group maximum
                        # (ties included, up to the chunk's last id): a threshold, if higher.
                        gmax = tl.max(tl.reshape(tl.where(mask, s, float("-inf")), [NG, G]), axis=1)
                        kth_val = _kth_value(gmax, K, KP, NET)
                        if K <= tl.cdiv(tl.minimum(V - c0, BLOCK), G):  # k groups hold entries
                            thr_val, thr_id = _raise_thr(thr_val, thr_id, kth_val, c0 + BLOCK - 1)
                            sel = _beats(s, offs, thr_val, thr_id) & mask
                            nsel = tl.sum(sel.to(tl.int32), axis=0)
                if (cnt + nsel > CAP) & (cnt > K):
                    # make room: the buffer's k best stay, their k-th is a threshold (if higher)
                    kth = _cut_back(buf_row, cnt, K, CAP, KP, NET)
                    cnt = K
                    thr_val, thr_id = _raise_thr(thr_val, thr_id, _key_value(kth), _key_id(kth))
                    sel = _beats(s, offs, thr_val, thr_id) & mask
                    nsel = tl.sum(sel.to(tl.int32), axis=0)
                if cnt + nsel <= CAP:
                    # the usual way in: positions by a scan, one scatter of the chunk's candidates
                    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
                    tl.store(buf_row + cnt + rank, _encode_keys(s, offs), mask=sel)
                    cnt += nsel
                else:
                    # Still more candidates than room (adversarial orders, heavy ties): re-read
                    # the chunk (from L1/L2) in SUBC-wide pieces, appending what fits and cutting
                    # back whenever the buffer is full.
                    for p0 in range(0, BLOCK, SUBC):
                        po = c0 + p0 + sub
                        pm = po < V
                        ps = tl.load(t_row + po, mask=pm, other=float("-inf")).to(tl.float32) * inv_t
                        psel = _beats(ps, po, thr_val, thr_id) & pm
                        pn = tl.sum(psel.to(tl.int32), axis=0)
                        rank = tl.cumsum(psel.to(tl.int32), axis=0) - 1
                        while pn > 0:
                            room = CAP - cnt
                            tl.store(buf_row + cnt + rank, _encode_keys(ps, po), mask=psel & (rank < room))
                            taken = tl.minimum(pn, room)
                            cnt += taken
                            pn -= taken
                            if pn > 0:
                                kth = _cut_back(buf_row, cnt, K, CAP, KP, NET)
                                cnt = K
                                thr_val, thr_id = _raise_thr(thr_val, thr_id, _key_value(kth), _key_id(kth))
                                psel = psel & (rank >= room) & _beats(ps, po, thr_val, thr_id)
                                rank = tl.cumsum(psel.to(tl.int32), axis=0) - 1
                                pn = tl.sum(psel.to(tl.int32), axis=0)

    lse = m + tl.log(tl.sum(d, axis=0))
    tl.store(lse_ptr + row, lse)

    # The k best candidates, sorted. (cnt < k only when NaNs were skipped: the row is NaN anyway.)
    tl.debug_barrier()
    kp = tl.arange(0, KP)
    if cnt <= 2 * KP:
        p2 = tl.arange(0, 2 * KP)
        top = _top_keys(tl.load(buf_row + p2, mask=p2 < cnt, other=NEG), KP, NET)
    else:
        pc = tl.arange(0, CAP)
        top = _top_keys(tl.load(buf_row + pc, mask=pc < cnt, other=NEG), KP, NET)
    have = kp < cnt
    out_id = tl.where(have, _key_id(top), kp)
    out_val = tl.where(have, _key_value(top) - lse, float("nan"))
    tl.store(ids_ptr + row * K + kp, out_id.to(tl.int64), mask=kp < K)
    tl.store(vals_ptr + row * K + kp, out_val, mask=kp < K)


def _topk_configs(kp: int):
    """Launch settings for KP = kp. BLOCK: entries per chunk. CAP: candidate buffer, in keys (a
    smaller one is cut back more often, which keeps the threshold closer to the running k-th). G:
    group size of the threshold raise (NG = BLOCK/G >= KP groups; 0 turns it off). SUBC: piece width
    of the overflow path. FEW: at most this many candidates are appended without a scan. Register
    use of the rare paths bounds occupancy, hence the maxnreg variant."""
    def cfg(block, warps, cap, maxnreg=None):
        g = 8 if _INTERPRET else 32
        while g > 1 and block // g < 2 * kp:
            g //= 2
        g = g if block // g >= kp else 0
        meta = dict(BLOCK=block, CAP=max(cap, 2 * kp), G=g, NG=block // g if g else 1,
                    SUBC=32 if _INTERPRET else 256, FEW=2 if _INTERPRET else 1)
        return triton.Config(meta, num_warps=warps, num_stages=1, maxnreg=maxnreg)

    if _INTERPRET:  # small blocks: the tests cover several chunks, raises, scans, pieces and cut-backs
        return [cfg(128, 4, _TOPK_CAP_MIN)]
    return [cfg(2048, 8, 512), cfg(2048, 8, 256), cfg(1024, 4, 256), cfg(2048, 8, 512, maxnreg=80)]


def _topk_buf_keys(kp: int) -> int:
    return max(c.kwargs["CAP"] for c in _topk_configs(kp))


_TOPK_TUNED: dict = {}


def _topk_launcher(kp: int):
    fn = _TOPK_TUNED.get(kp)
    if fn is None:
        fn = _TOPK_TUNED[kp] = triton.autotune(configs=_topk_configs(kp), key=["V", "KP"])(_topk_kernel)
    return fn


def _topk_torch_fallback(teacher, k, temperature, ids, values, lse):
    """k > _TOPK_KP_MAX: torch.topk over the same int64 keys (two reads of the logits), in row chunks."""
    n, v = teacher.shape
    inv_t = torch.tensor(_inv_temperature(temperature), dtype=torch.float32, device=teacher.device)
    rows = max(1, (1 << 25) // max(v, 1))
    col = torch.arange(v, device=teacher.device, dtype=torch.int64)
    for r0 in range(0, n, rows):
        s = teacher[r0:r0 + rows].float() * inv_t
        lse_c = torch.logsumexp(s, dim=-1)
        s = torch.where(s == 0, torch.zeros_like(s), s)
        b = s.view(torch.int32)
        o = torch.where(b >= 0, b, b ^ 0x7FFFFFFF).to(torch.int64)
        keys = torch.where(torch.isnan(s), torch.iinfo(torch.int64).min, (o << 32) | (0x7FFFFFFF - col))
        top = torch.topk(keys, k, dim=-1).values
        idx = (0x7FFFFFFF - (top & 0xFFFFFFFF)).clamp_max(v - 1)  # (NaN keys: the row is NaN anyway)
        ids[r0:r0 + rows] = idx
        values[r0:r0 + rows] = s.gather(1, idx) - lse_c.unsqueeze(-1)
        lse[r0:r0 + rows] = lse_c


def triton_capture_topk(teacher, k, temperature, ids, values, lse) -> None:
    """Fills ids (N, k) int64, values (N, k) float32 log-probabilities, lse (N,) float32."""
    _check_dtype(teacher, "teacher logits")
    n, v = teacher.shape
    if n == 0:
        return
    kp = _next_pow2(k)
    if kp > _TOPK_KP_MAX:
        _topk_torch_fallback(teacher, k, temperature, ids, values, lse)
        return
    buf = torch.empty((n, _topk_buf_keys(kp)), dtype=torch.int64, device=teacher.device)
    with _device_ctx(teacher):
        _topk_launcher(kp)[(n,)](
            teacher, buf, ids, values, lse,
            v, k, teacher.stride(0), buf.stride(0), _inv_temperature(temperature),
            KP=kp, NET=_TOPK_NETWORK,
        )


# ============================================================================================
# capture, sample
# ============================================================================================
@triton.jit(do_not_specialize=["V", "NSB"])
def _sample_stats_kernel(
    t_ptr, m_ptr, d_ptr,
    V, NSB, stride_t, inv_t,
    SUB: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per sub-block of SUB entries: max of t/τ and Σ e^(t/τ − max) (0 and −inf for a block without mass)."""
    NS: tl.constexpr = BLOCK // SUB
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK
    sb = tl.arange(0, NS)
    offs = c0 + sb[:, None] * SUB + tl.arange(0, SUB)[None, :]
    s = tl.load(t_ptr + row * stride_t + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
    mx = tl.max(s, axis=1)
    shift = tl.where(mx == float("-inf"), 0.0, mx)  # a block of −inf: e = 0, not exp(−inf + inf)
    dsum = tl.sum(tl.exp(s - shift[:, None]), axis=1)
    bidx = tl.program_id(1) * NS + sb
    out = row * NSB + bidx
    tl.store(m_ptr + out, mx, mask=bidx < NSB)
    tl.store(d_ptr + out, dsum, mask=bidx < NSB)


@triton.jit
def _pick(x, ar, i):
    """x[i] of a 1-D tensor as a scalar (0 when i is out of range)."""
    return tl.sum(tl.where(ar == i, x, 0), axis=0)


@triton.jit(do_not_specialize=["V", "NSB", "S", "W"])
def _sample_draw_kernel(
    t_ptr, m_ptr, d_ptr, u_ptr, ids_ptr, cnt_ptr, lse_ptr,
    V, NSB, S, W, stride_t, stride_u, inv_t,
    SUB: tl.constexpr, NSB_P: tl.constexpr, WB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    u_row = u_ptr + row * stride_u
    ids_row = ids_ptr + row * W
    cnt_row = cnt_ptr + row * W

    # float64 cdf over the sub-blocks, in units of e^(s − M), M the row max
    bi = tl.arange(0, NSB_P)
    bmask = bi < NSB
    mb = tl.load(m_ptr + row * NSB + bi, mask=bmask, other=float("-inf"))
    db = tl.load(d_ptr + row * NSB + bi, mask=bmask, other=0.0).to(tl.float64)
    mrow = tl.max(mb, axis=0)
    mrow_s = tl.where(mrow == float("-inf"), 0.0, mrow)
    wb = tl.exp((mb - mrow_s).to(tl.float64))  # scale of sub-block b's own units e^(s − m_b)
    mass = db * wb
    cdf = tl.cumsum(mass, axis=0)
    total = tl.sum(mass, axis=0)
    lse = mrow_s.to(tl.float64) + tl.log(total)
    tl.store(lse_ptr + row, lse.to(tl.float32))
    last_b = tl.max(tl.where(bmask & (mass > 0.0), bi, -1), axis=0)
    cdf_search = tl.where(bmask, cdf, float("inf"))
    # NaN, +inf or no mass: every draw goes to the last id, as in the CPU kernel
    degenerate = ~((total > 0.0) & (total < float("inf")))

    si = tl.arange(0, SUB)
    out = 0
    if degenerate:
        tl.store(ids_row, (V - 1).to(tl.int64))
        tl.store(cnt_row, S.to(tl.int32))
        out = 1
    else:
        cur_b = -1
        cur_hi = tl.full([], -1.0, tl.float64)  # cdf at the end of the current sub-block
        cur_lo = cur_hi
        cur_w = cur_hi
        cur_last = 0
        cum = tl.zeros([SUB], dtype=tl.float64)
        prev = -1
        run = 0
        for j in range(0, S):
            x = tl.load(u_row + j) * total  # uniforms are sorted: x never decreases
            if x >= cur_hi:
                b = tl.sum((cdf_search <= x).to(tl.int32), axis=0)  # smallest b with cdf_b > x
                b = tl.minimum(b, last_b)  # x past the total (rounding): the last block with mass
                if b != cur_b:
                    cur_b = b
                    cur_hi = _pick(cdf, bi, b)
                    cur_lo = _pick(cdf, bi, b - 1)
                    cur_w = _pick(wb, bi, b)
                    m_b = _pick(mb, bi, b)
                    offs = b * SUB + si
                    s = tl.load(t_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
                    e = tl.exp(s - m_b)
                    cum = tl.cumsum(e.to(tl.float64), axis=0)
                    cur_last = tl.max(tl.where(e > 0.0, si, -1), axis=0)
            # smallest i with cum_i > r: an id with mass; past the block's own sum, its last such id
            r = (x - cur_lo) / cur_w
            i = tl.minimum(tl.sum((cum <= r).to(tl.int32), axis=0), cur_last)
            idx = cur_b * SUB + i
            if idx != prev:
                if run > 0:
                    tl.store(ids_row + out, prev.to(tl.int64))
                    tl.store(cnt_row + out, run)
                    out += 1
                prev = idx
                run = 1
            else:
                run += 1
        tl.store(ids_row + out, prev.to(tl.int64))
        tl.store(cnt_row + out, run)
        out += 1
    # padding after the unique ids
    for w0 in range(0, W, WB):
        pos = w0 + tl.arange(0, WB)
        pad = (pos >= out) & (pos < W)
        tl.store(ids_row + pos, tl.full([WB], -1, tl.int64), mask=pad)
        tl.store(cnt_row + pos, tl.zeros([WB], dtype=tl.int32), mask=pad)


def _sample_sub(v: int) -> int:
    """Sub-block width of the sampled capture: small (a draw re-reads SUB entries), but at most
    ~2048 sub-blocks per row (the draw kernel holds their cdf in registers)."""
    base = 32 if _INTERPRET else 256
    return max(base, _next_pow2(-(-v // 2048)))


def triton_capture_sample(teacher, uniforms, temperature, ids, counts, lse) -> None:
    """Fills ids (N, W) int64 (unique ids ascending, then −1), counts (N, W) int32, lse (N,) float32."""
    _check_dtype(teacher, "teacher logits")
    n, v = teacher.shape
    s_num = uniforms.shape[1]
    width = ids.shape[1]
    if n == 0:
        return
    sub = _sample_sub(v)
    block = max(sub, 128 if _INTERPRET else 4096)
    nsb = -(-v // sub)
    stats_m = torch.empty((n, nsb), dtype=torch.float32, device=teacher.device)
    stats_d = torch.empty((n, nsb), dtype=torch.float32, device=teacher.device)
    # sorted per row: the draw kernel walks the cdf forward once
    us = torch.sort(uniforms.to(torch.float64), dim=1).values
    inv_t = _inv_temperature(temperature)
    with _device_ctx(teacher):
        _sample_stats_kernel[(n, triton.cdiv(v, block))](
            teacher, stats_m, stats_d, v, nsb, teacher.stride(0), inv_t,
            SUB=sub, BLOCK=block, num_warps=4 if _INTERPRET else 8,
        )
        _sample_draw_kernel[(n,)](
            teacher, stats_m, stats_d, us, ids, counts, lse,
            v, nsb, s_num, width, teacher.stride(0), us.stride(0), inv_t,
            SUB=sub, NSB_P=_next_pow2(nsb), WB=min(_next_pow2(width), 1024), num_warps=4,
        )
