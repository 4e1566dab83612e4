"""fused_linear_kd_loss against the unfused float64 reference: loss and every gradient."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from fastkd._reference.kd import kd_loss_rows
from fastkd._reference.sparse_kd import sparse_kd_rows
from fastkd.linear import fused_linear_kd_loss, pick_chunk_size

CPU = torch.device("cpu")
BACKENDS = ["torch", "cpu"]
DIVS = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
REDS = ["mean", "sum", "none"]
# subprocesses import the same fastkd as this process, installed or not
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))


def _child_env(**extra):
    path = os.pathsep.join(p for p in (_PKG_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
         "teacher_bias")


def make_problem(n, hs_dim, ht_dim, v_s, v_t=None, *, dtype=torch.float32, seed=0, scale=1.0,
                 bias=True, teacher_grad=False, ignore_every=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    v_t = v_s if v_t is None else v_t

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    shape = (n,) if lead is None else lead
    hs = r(*shape, hs_dim, s=scale).requires_grad_()
    ws = r(v_s, hs_dim, s=hs_dim ** -0.5).requires_grad_()
    bs = r(v_s, s=0.5).requires_grad_() if bias else None
    ht = r(*shape, ht_dim, s=scale).requires_grad_(teacher_grad)
    wt = r(v_t, ht_dim, s=ht_dim ** -0.5).requires_grad_(teacher_grad)
    bt = r(v_t, s=0.5).requires_grad_(teacher_grad) if bias else None
    y = torch.randint(0, min(v_s, v_t), shape, generator=g)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    return [hs, ws, bs, ht, wt, bt], y


def reference(tensors, y, vocab=None, grad_out=None, **kw):
    """Unfused float64 oracle: the reference rows of the materialised logits, reduced here; returns
    the loss and the six gradients."""
    leaves = [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in tensors]
    hs, ws, bs, ht, wt, bt = leaves
    v = ws.shape[0] if vocab is None else vocab
    zs = hs @ ws[:v].T + (0 if bs is None else bs[:v])
    zt = ht @ wt[:v].T + (0 if bt is None else bt[:v])
    loss = reduce_rows(kd_loss_rows, zs, zt, y, **kw)
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    g = torch.ones_like(loss) if grad_out is None else grad_out.double()
    grads = iter(torch.autograd.grad(loss, wrt, g))
    return loss, [next(grads) if (x is not None and x.requires_grad) else None for x in leaves]


def reduce_rows(rows_fn, z, teacher, y, *, reduction="mean", num_items=None, ignore_index=-100, **kw):
    """``rows_fn`` (a reference of ``fastkd/_reference/``) per row of the leading shape, reduced here."""
    lead = z.shape[:-1]
    flat_y = None if y is None else y.reshape(-1)
    teacher = teacher.reshape(-1, teacher.shape[-1]) if isinstance(teacher, torch.Tensor) else teacher
    rows = rows_fn(z.reshape(-1, z.shape[-1]), teacher, flat_y, ignore_index=ignore_index, **kw)
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    if num_items is not None:
        return rows.sum() / float(num_items)
    count = rows.shape[0] if flat_y is None else int((flat_y != ignore_index).sum())
    return rows.sum() / max(count, 1)


def fused(tensors, y, grad_out=None, **kw):
    hs, ws, bs, ht, wt, bt = tensors
    loss = fused_linear_kd_loss(hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt, **kw)
    wrt = [x for x in tensors if x is not None and x.requires_grad]
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    grads = iter(torch.autograd.grad(loss, wrt, g))
    return loss, [next(grads) if (x is not None and x.requires_grad) else None for x in tensors]


def assert_matches(got, ref, rtol=2e-5, what=""):
    loss, grads = got
    rloss, rgrads = ref
    scale = rloss.abs().max().item() + 1e-12
    assert loss.shape == rloss.shape, what
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=rtol * scale, msg=f"loss {what}")
    for name, gr, rg in zip(NAMES, grads, rgrads):
        assert (gr is None) == (rg is None), f"{name} {what}"
        if gr is None:
            continue
        assert gr.dtype == torch.float32 or gr.dtype == torch.float64
        tol = rtol * (rg.abs().max().item() + 1e-12)
        torch.testing.assert_close(gr.double(), rg, rtol=rtol, atol=tol, msg=f"grad {name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, divergence, reduction):
    # odd N, a chunk that does not divide it, trainable teacher, scattered ignored rows
    tensors, y = make_problem(37, 24, 20, 101, seed=10 * DIVS.index(divergence) + REDS.index(reduction),
                              teacher_grad=True, ignore_every=4, scale=3.0)
    kw = dict(temperature=1.7, soft_weight=0.8, hard_weight=0.35, divergence=divergence, beta=0.3, skew=0.25,
              label_smoothing=0.05, reduction=reduction)
    g = torch.randn(37, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    got = fused(tensors, y, grad_out=g, chunk_size=13, backend=backend, **kw)
    assert got[0].dtype == torch.float32
    assert_matches(got, reference(tensors, y, grad_out=g, **kw), what=f"{backend} {divergence} {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, 7])
@pytest.mark.parametrize("reduction, num_items", [("mean", None), ("mean", 5), ("sum", None), ("none", None)])
def test_custom_ignore_index_under_every_reduction(backend, ignore_index, reduction, num_items):
    """Rows whose target is ``ignore_index`` (not -100) contribute nothing and are not counted, in
    a chunk loop whose chunks do not divide the batch."""
    tensors, y = make_problem(23, 12, 10, 41, seed=65 + ignore_index, teacher_grad=True)
    y[[1, 4, 6, 20]] = ignore_index
    kw = dict(hard_weight=0.5, temperature=1.5, ignore_index=ignore_index, reduction=reduction)
    if num_items is not None:
        kw["num_items"] = num_items
    g = torch.rand(23, dtype=torch.float64, generator=torch.Generator().manual_seed(66)) + 0.5 \
        if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    got = fused(tensors, y, grad_out=g, chunk_size=5, backend=backend, **kw)
    assert_matches(got, reference(tensors, y, grad_out=g, **kw), what=f"{backend} {ignore_index} {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunk_sizes_and_frozen_teacher(backend, chunk):
    tensors, y = make_problem(45, 16, 12, 67, seed=chunk, ignore_every=3)
    kw = dict(temperature=2.0, hard_weight=0.5)
    got = fused(tensors, y, chunk_size=chunk, backend=backend, **kw)
    assert got[1][3:] == [None, None, None]  # frozen teacher: no teacher gradients at all
    assert_matches(got, reference(tensors, y, **kw), what=f"chunk={chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_chunks(backend):
    tensors, y = make_problem(40, 16, 16, 53, seed=3, teacher_grad=True)
    y[:24] = -100  # the first three chunks of 8 are entirely ignored
    kw = dict(temperature=1.3, hard_weight=0.4)
    got = fused(tensors, y, chunk_size=8, backend=backend, **kw)
    assert_matches(got, reference(tensors, y, **kw))
    assert torch.count_nonzero(got[1][0][:24]) == 0 and torch.count_nonzero(got[1][3][:24]) == 0

    y[:] = -100  # nothing counted: loss 0 and zero gradients, as kd_loss
    loss, grads = fused(tensors, y, chunk_size=8, backend=backend, **kw)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(gr) == 0 for gr in grads if gr is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["softcap", "no_t2", "num_items_int", "num_items_tensor", "soft_only",
                                  "hard_only", "no_target", "no_bias_lead_shape"])
def test_kd_arguments(backend, case):
    kw = dict(temperature=1.5, hard_weight=0.25)
    prob = dict(bias=True, lead=None)
    if case == "softcap":
        kw.update(softcap=3.0, divergence="reverse_kl")
    elif case == "no_t2":
        kw.update(t2_scale=False, temperature=3.0)
    elif case == "num_items_int":
        kw.update(num_items=100)
    elif case == "num_items_tensor":
        kw.update(num_items=torch.tensor(77.0))
    elif case == "soft_only":
        kw.update(hard_weight=0.0)
    elif case == "hard_only":
        kw.update(soft_weight=0.0, hard_weight=1.0, label_smoothing=0.2)
    elif case == "no_target":
        kw.update(hard_weight=0.0, divergence="jsd", beta=0.7)
    elif case == "no_bias_lead_shape":
        prob.update(bias=False, lead=(3, 11))
    tensors, y = make_problem(33, 16, 8, 71, seed=len(case), ignore_every=5, scale=4.0, **prob)
    if case == "no_target":
        y = None
    got = fused(tensors, y, chunk_size=10, backend=backend, **kw)
    assert_matches(got, reference(tensors, y, **kw), what=case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_heads_vocab_size(backend):
    # student head 103 rows, teacher 110 rows (padded); the shared vocabulary is the first 100
    tensors, y = make_problem(29, 16, 12, 103, 110, seed=11, teacher_grad=True)
    y = y.clamp_max(99)
    kw = dict(temperature=2.0, hard_weight=0.3, divergence="jsd")
    got = fused(tensors, y, chunk_size=9, vocab_size=100, backend=backend, **kw)
    assert_matches(got, reference(tensors, y, vocab=100, **kw))
    grads = got[1]
    for i in (1, 2, 4, 5):  # padded rows of both heads get exactly zero gradient
        assert torch.count_nonzero(grads[i][100:]) == 0
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_kd_loss(tensors[0], tensors[1], tensors[3], tensors[4], y)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_kd_loss(tensors[0], tensors[1], tensors[3], tensors[4], y, vocab_size=104)
    with pytest.raises(ValueError, match="target"):
        fused_linear_kd_loss(tensors[0], tensors[1], tensors[3], tensors[4], y.clamp_min(100),
                             vocab_size=100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # reduction="none": its backward recomputes the chunks, so gradcheck may call it repeatedly
    # (the "mean"/"sum" backward scales its stored gradients in place and allows one call only).
    tensors, y = make_problem(7, 5, 4, 9, dtype=torch.float64, seed=5, teacher_grad=True)
    y[2] = -100
    hs, ws, bs, ht, wt, bt = tensors

    def f(*xs):
        return fused_linear_kd_loss(xs[0], xs[1], xs[3], xs[4], y, student_bias=xs[2], teacher_bias=xs[5],
                                    chunk_size=3, temperature=1.5, hard_weight=0.5, divergence="jsd",
                                    reduction="none", backend=backend)

    # the cpu kernel's float64 path is accurate to ~1e-9 relative, not to the last bit
    tol = dict(eps=1e-6, atol=1e-5, rtol=1e-4) if backend == "cpu" else {}
    assert torch.autograd.gradcheck(f, tuple(tensors), fast_mode=True, **tol)


def test_no_grad_and_frozen_student_head():
    tensors, y = make_problem(20, 8, 8, 31, seed=2, teacher_grad=True)
    hs, ws, bs, ht, wt, bt = tensors
    with torch.no_grad():
        loss = fused_linear_kd_loss(hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt, chunk_size=6)
    assert not loss.requires_grad
    ref, _ = reference(tensors, y)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=0)
    # frozen head (e.g. LoRA elsewhere): only the hidden state gets a gradient
    ws.requires_grad_(False)
    bs.requires_grad_(False)
    ht.requires_grad_(False)
    wt.requires_grad_(False)
    bt.requires_grad_(False)
    got = fused(tensors, y, chunk_size=6)
    assert [g is None for g in got[1]] == [False, True, True, True, True, True]
    assert_matches(got, reference(tensors, y))


def test_backward_twice_raises_and_grad_accumulates():
    tensors, y = make_problem(12, 8, 8, 17, seed=9)
    hs, ws, bs, ht, wt, bt = tensors
    loss = fused_linear_kd_loss(hs, ws, ht, wt, y, student_bias=bs, chunk_size=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    # parameters used twice in a graph (two losses) accumulate like any autograd leaf
    ws.grad = None
    l1 = fused_linear_kd_loss(hs, ws, ht, wt, y, chunk_size=5)
    l2 = fused_linear_kd_loss(hs, ws, ht, wt, y, chunk_size=4, temperature=2.0)
    (l1 + 3 * l2).backward()
    r1 = reference([hs, ws, None, ht, wt, None], y)[1][1]
    r2 = reference([hs, ws, None, ht, wt, None], y, temperature=2.0)[1][1]
    torch.testing.assert_close(ws.grad.double(), r1 + 3 * r2, rtol=2e-5, atol=1e-6)


def test_bad_inputs():
    tensors, y = make_problem(10, 8, 6, 13)
    hs, ws, bs, ht, wt, bt = tensors
    with pytest.raises(ValueError, match="student_hidden"):
        fused_linear_kd_loss(hs[:, :5], ws, ht, wt, y)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_kd_loss(hs, ws, ht, wt[:, :5], y)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_linear_kd_loss(hs, ws, ht[:9], wt, y[:10])
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_kd_loss(hs, ws[0], ht, wt, y)
    with pytest.raises(ValueError, match="student_bias"):
        fused_linear_kd_loss(hs, ws, ht, wt, y, student_bias=bs[:3])
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_kd_loss(hs.double(), ws, ht, wt, y)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd_loss(hs, ws, ht, wt, y, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_kd_loss(hs, ws, ht, wt, y, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        fused_linear_kd_loss(hs, ws, ht, wt, y, divergence="kl")
    with pytest.raises(ValueError, match="target"):
        fused_linear_kd_loss(hs, ws, ht, wt, y[:5])
    with pytest.raises(ValueError, match="hard_weight"):
        fused_linear_kd_loss(hs, ws, ht, wt, None, hard_weight=1.0)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_kd_loss(hs, ws, ht, None, y)


def test_pick_chunk_size():
    assert pick_chunk_size(100, 1000, memory_budget=10**9) == 100
    c = pick_chunk_size(10_000, 32_000, n_buffers=2, memory_budget=64 * 2**20)
    assert c % 16 == 0 and c * 2 * 4 * 32_000 <= 64 * 2**20 < (c + 16) * 2 * 4 * 32_000
    assert pick_chunk_size(10_000, 10**9, memory_budget=1) == 16  # never below 16 rows


def test_autocast_bf16():
    # Under CPU autocast the head GEMMs run in bf16 (as F.linear would); the error against the float64
    # reference must be no worse than twice that of the unfused idiom under the same autocast.
    tensors, y = make_problem(48, 32, 32, 97, seed=4, bias=False, scale=2.0)
    hs, ws, _, ht, wt, _ = tensors
    kw = dict(temperature=2.0, hard_weight=0.5)
    ref_loss, ref_grads = reference(tensors, y, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_kd_loss(hs, ws, ht, wt, y, chunk_size=20, **kw)
        idiom = fastkd.kd_loss(torch.nn.functional.linear(hs, ws), torch.nn.functional.linear(ht, wt),
                               y, backend="torch", **kw)
    g_f = torch.autograd.grad(loss, [hs, ws])
    g_i = torch.autograd.grad(idiom, [hs, ws])
    assert loss.dtype == torch.float32 and g_f[1].dtype == torch.float32
    err_f = (loss.double() - ref_loss).abs().item()
    err_i = (idiom.double() - ref_loss).abs().item()
    assert err_f <= 2 * err_i + 1e-6 * ref_loss.abs().item()
    for gf, gi, gr in zip(g_f, g_i, ref_grads[:2]):
        ef = (gf.double() - gr).norm().item()
        ei = (gi.double() - gr).norm().item()
        assert ef <= 2 * ei + 1e-6 * gr.norm().item()


def test_torch_compile_eager_backend():
    tensors, y = make_problem(21, 8, 8, 19, seed=8)
    hs, ws, bs, ht, wt, bt = tensors

    @torch.compile(backend="eager")
    def step(h):
        return fused_linear_kd_loss(torch.tanh(h), ws, ht, wt, y, chunk_size=8, hard_weight=0.5) * 2

    loss = step(hs)
    loss.backward()
    hs2 = hs.detach().requires_grad_()
    ref = fused_linear_kd_loss(torch.tanh(hs2), ws.detach(), ht, wt, y, chunk_size=8, hard_weight=0.5) * 2
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hs.grad, hs2.grad)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("tail,mode,reduction", [("bucket", "topk", "mean"), ("renorm", "topk", "none"),
                                                 ("sampled", "sample", "sum")])
def test_sparse_teacher(backend, tail, mode, reduction):
    """A cached SparseTeacher in place of the teacher head equals sparse_kd_loss on full logits."""
    from fastkd.cache import capture

    tensors, y = make_problem(26, 16, 16, 83, seed=6, ignore_every=4, scale=2.0, lead=(2, 13))
    hs, ws, bs, ht, wt, bt = tensors
    with torch.no_grad():
        zt = ht @ wt.T + bt
    st = capture(zt, k=8, temperature=1.5, mode=mode, num_samples=20,
                 generator=torch.Generator().manual_seed(1))
    kw = dict(hard_weight=0.3, tail=tail, reduction=reduction, backend=backend)
    loss = fused_linear_kd_loss(hs, ws, st, None, y, student_bias=bs, chunk_size=7, **kw)
    g = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad(loss, [hs, ws, bs], g)
    hs64, ws64, bs64 = (x.detach().double().requires_grad_() for x in (hs, ws, bs))
    flat = st.flatten()

    def rows(z, _teacher, y_, *, ignore_index, hard_weight, tail):
        return sparse_kd_rows(z, flat.ids, flat.teacher_probs(torch.float64), y_, tail=tail,
                              temperature=1.5, soft_scale=1.5 ** 2, hard_weight=hard_weight,
                              ignore_index=ignore_index, label_smoothing=0.0)

    ref = reduce_rows(rows, hs64 @ ws64.T + bs64, None, y, hard_weight=0.3,
                      tail="sampled" if mode == "sample" else tail, reduction=reduction)
    refg = torch.autograd.grad(ref, [hs64, ws64, bs64], g.double())
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    for a, b in zip(grads, refg):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * b.abs().max().item())
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_kd_loss(hs, ws, st, wt, y)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_kd_loss(hs, ws, st, None, y, temperature=1.0)


_DDP_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fastkd

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Linear(12, 12)
            self.lm_head = torch.nn.Linear(12, 41)

        def forward(self, x, th, tw, y):
            h = torch.tanh(self.body(x))
            return fastkd.fused_linear_kd_loss(h, self.lm_head.weight, th, tw, y,
                                               student_bias=self.lm_head.bias, chunk_size=5,
                                               hard_weight=0.5)

    def data(rank):
        g = torch.Generator().manual_seed(100 + rank)
        x, th = torch.randn(2, 9, 12, generator=g), torch.randn(2, 9, 10, generator=g)
        return x, th, torch.randn(41, 10, generator=g), torch.randint(0, 41, (2, 9), generator=g)

    def run(rank, world, init):
        from datetime import timedelta

        # a bounded timeout: a peer that dies must fail the test, not hang it
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=90))
        model = DDP(Student())
        model(*data(rank)).backward()
        return {n: p.grad.clone() for n, p in model.module.named_parameters()}

    if __name__ == "__main__":
        import os

        torch.set_num_threads(1)
        grads = run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
        torch.save(grads, sys.argv[4])
        dist.barrier()
        # Exit without destructors: tearing down the gloo group behind a DDP Reducer can hang in
        # ProcessGroupGloo's destructor (seen in CI); the gradients are already saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
""")


def test_ddp_lm_head(tmp_path):
    """nn.Linear weights under DDP (gloo, both ranks in subprocesses): after backward every rank holds
    the mean over ranks of the unfused gradients."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_WORKER)
    init = f"file://{tmp_path / 'store'}"
    outs = [tmp_path / f"grads{rank}.pt" for rank in range(2)]
    peers = [subprocess.Popen([sys.executable, str(script), str(rank), "2", init, str(outs[rank])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
             for rank in range(2)]
    errs = []
    try:
        for peer in peers:
            errs.append(peer.communicate(timeout=240)[1])
    except subprocess.TimeoutExpired:
        for peer in peers:
            peer.kill()
        pytest.fail("DDP workers hung past 240 s")
    for peer, err in zip(peers, errs):
        assert peer.returncode == 0, err[-3000:]
    got_all = [torch.load(out) for out in outs]
    for n in got_all[0]:
        torch.testing.assert_close(got_all[0][n], got_all[1][n])  # DDP: every rank holds the same
    got = got_all[0]
    ns = {"__name__": "fastkd_ddp_worker"}
    exec(compile(_DDP_WORKER, str(script), "exec"), ns)

    model = ns["Student"]()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for rank in range(2):
        x, th, tw, y = ns["data"](rank)
        logits = model.lm_head(torch.tanh(model.body(x)))
        loss = fastkd.kd_loss(logits, th @ tw.T, y, hard_weight=0.5, backend="torch")
        for n, gr in zip(params, torch.autograd.grad(loss, list(params.values()))):
            expected[n] += gr / 2
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


_MEM_WORKER = textwrap.dedent("""
    import resource, sys, torch, fastkd
    torch.set_num_threads(1)
    n, h, v = 1024, 32, 12000
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    # warm-up on a tiny problem so that lazily loaded code and thread pools are resident
    fastkd.fused_linear_kd_loss(hs[:4], ws[:8], ht[:4], wt[:8], y[:4] % 8).backward()
    fastkd.kd_loss(hs[:4] @ ws[:8].T, ht[:4] @ wt[:8].T, y[:4] % 8, backend="torch").backward()

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def reset():
        ws.grad = hs.grad = None
        try:  # Linux: reset the peak resident set (VmHWM) to the current one
            open("/proc/self/clear_refs", "w").write("5")
            return lambda: status("VmHWM") - base
        except OSError:  # ru_maxrss never resets: this relies on measuring the smaller peak first
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start

    base = status("VmRSS")
    peak = reset()
    fastkd.fused_linear_kd_loss(hs, ws, ht, wt, y, hard_weight=0.5, memory_budget=4 * 2**20).backward()
    fused = peak()
    base = status("VmRSS")
    peak = reset()
    zs, zt = hs @ ws.T, ht @ wt.T  # the unfused idiom: both logits materialised, autograd through them
    fastkd.kd_loss(zs, zt, y, hard_weight=0.5, backend="torch").backward()
    print("PEAKS", fused, peak())
""")


def test_memory_peak_cpu(tmp_path):
    """Peak RSS growth of forward+backward: the chunked loss needs a small fraction of the unfused one.

    N=1024, V=12000: one float32 logits tensor is 49 MB; with a 4 MiB chunk budget the fused loss
    holds 4 MiB of chunk buffers plus the weight gradient (1.5 MB).
    """
    script = tmp_path / "mem_worker.py"
    script.write_text(_MEM_WORKER)
    # every allocation >= 128 KiB is mmapped and unmapped on free, so RSS follows live memory
    env = _child_env(MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    fused, unfused = map(int, out.stdout.split("PEAKS")[1].split()[:2])
    logits_bytes = 1024 * 12000 * 4
    assert unfused >= 2 * logits_bytes, (fused, unfused)  # sanity: the idiom materialises the logits
    assert fused <= 0.25 * logits_bytes, (fused, unfused)  # well under one logits tensor
    assert fused >= 2 * 2**20, (fused, unfused)  # sanity: the chunk buffers are seen


def test_empty_batch():
    tensors, y = make_problem(0, 8, 8, 11)
    hs, ws, bs, ht, wt, bt = tensors
    loss = fused_linear_kd_loss(hs, ws, ht, wt, y)
    loss.backward()
    assert loss.item() == 0.0 and hs.grad.shape == hs.shape
    assert fused_linear_kd_loss(hs, ws, ht, wt, y, reduction="none").shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_teacher_grad_and_mixed_dtypes(backend):
    # only the teacher's hidden states train (its head is frozen): dH_t without dW_t
    tensors, y = make_problem(23, 12, 10, 47, seed=12)
    tensors[3].requires_grad_(True)
    kw = dict(temperature=1.2, hard_weight=0.2, divergence="reverse_kl")
    got = fused(tensors, y, chunk_size=6, backend=backend, **kw)
    assert [g is None for g in got[1]] == [False, False, False, False, True, True]
    assert_matches(got, reference(tensors, y, **kw))

    # a bfloat16 teacher (frozen) with a float32 student: the teacher GEMM runs in bf16, and the loss
    # equals kd_loss on those bf16 logits
    hs, ws, bs, ht, wt, bt = tensors
    ht16, wt16, bt16 = (x.detach().bfloat16() for x in (ht, wt, bt))
    loss = fused_linear_kd_loss(hs, ws, ht16, wt16, y, student_bias=bs, teacher_bias=bt16, chunk_size=6,
                                backend=backend, **kw)
    zt = (ht16 @ wt16.T + bt16).double()
    hs64, ws64, bs64 = (x.detach().double() for x in (hs, ws, bs))
    ref = fastkd.kd_loss(hs64 @ ws64.T + bs64, zt, y, backend="torch", **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="teacher"):
        fused_linear_kd_loss(hs, ws, ht16, wt, y)


@pytest.mark.parametrize("backend", ["triton", "cuda_emu"])
def test_gpu_kernels_on_cpu_tensors(use_backend, backend):
    """The chunk loop on the GPU kd kernels (the GPU path's kernel contract, incl. the gradient
    overwriting the logits buffer): Triton under the interpreter, CUDA on the emulation."""
    use_backend(backend)
    for red, div in (("mean", "jsd"), ("none", "forward_kl")):
        tensors, y = make_problem(19, 8, 8, 37, seed=1, teacher_grad=True, ignore_every=3)
        kw = dict(temperature=1.5, hard_weight=0.3, divergence=div, reduction=red)
        got = fused(tensors, y, chunk_size=7, backend=backend, **kw)
        assert_matches(got, reference(tensors, y, **kw), rtol=1e-4, what=red)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    tensors, y = make_problem(300, 64, 48, 5003, seed=21, teacher_grad=True, ignore_every=7, dtype=dtype)
    tensors = [x.detach().cuda().requires_grad_(x.requires_grad) for x in tensors]
    y = y.cuda()
    kw = dict(temperature=2.0, hard_weight=0.4, divergence="jsd")
    got = fused(tensors, y, chunk_size=96, **kw)
    ref = reference([x.cpu() for x in tensors], y.cpu(), **kw)
    got = (got[0].cpu(), [None if g is None else g.float().cpu() for g in got[1]])
    # bf16 inputs: the logits themselves are exact products of bf16 values accumulated in float32
    assert_matches(got, ref, rtol=2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_return_entropy_is_the_student_softmax_entropy(reduction, softcap):
    """return_entropy gives each row's entropy of softmax(softcap(zs)/τ) over the first vocab_size
    logits, with the loss and its gradients unchanged; against a SparseTeacher too."""
    tensors, y = make_problem(23, 16, 12, 41, 45, seed=21, ignore_every=4)
    hs, ws, bs, ht, wt, bt = tensors
    kw = dict(temperature=1.7, hard_weight=0.2, divergence="jsd", beta=0.3, softcap=softcap, vocab_size=40,
              reduction=reduction, chunk_size=7, student_bias=bs, teacher_bias=bt)
    loss, ent = fused_linear_kd_loss(hs, ws, ht, wt, y.clamp_max(39), return_entropy=True, **kw)
    plain = fused_linear_kd_loss(hs, ws, ht, wt, y.clamp_max(39), **kw)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    assert ent.shape == (23,) and not ent.requires_grad and loss.requires_grad
    zs = (hs.detach().double() @ ws.detach().double()[:40].T + bs.detach().double()[:40])
    if softcap is not None:
        zs = softcap * torch.tanh(zs / softcap)
    logq = torch.log_softmax(zs / 1.7, -1)
    want = -(logq.exp() * logq).sum(-1)
    torch.testing.assert_close(ent.double(), want, rtol=1e-5, atol=1e-6)
    st = fastkd.capture((ht.detach() @ wt.detach()[:40].T).float(), k=5, temperature=1.7)
    _, ent_sparse = fused_linear_kd_loss(hs, ws, st, None, y.clamp_max(39), student_bias=bs, chunk_size=7,
                                         temperature=1.7, return_entropy=True)
    logq = torch.log_softmax((hs.detach().double() @ ws.detach().double()[:40].T
                              + bs.detach().double()[:40]) / 1.7, -1)
    torch.testing.assert_close(ent_sparse.double(), -(logq.exp() * logq).sum(-1), rtol=1e-5, atol=1e-6)
