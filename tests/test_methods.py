"""Tests of fastkd.methods against hand-written float64 formulas (fresh random inputs every run).

Besides values, each test checks *where* gradients go: regressors, auxiliary heads and projections
are trained; teachers never are.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd._reference import kd as ref
from fastkd import methods as M

D64 = torch.float64


def _rng_logits(*shape, scale=3.0):
    return torch.randn(*shape, dtype=D64) * scale


def _kl_rows(t_logits, z_logits, T):
    return ref.kl_rows(torch.log_softmax(t_logits / T, -1), torch.log_softmax(z_logits / T, -1))


def _close(a, b, tol=1e-7):
    # Not 1e-12: the fused CPU kernel currently receives temperature and weights as float32
    # (csrc/binding.cpp make_args), about 1e-8 relative in float64. The kernel itself is tested in
    # tests/test_kd.py; here the methods' formulas are.
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _grads(loss, params, g=1.7):
    loss.backward(torch.tensor(g, dtype=loss.dtype))  # grad_output != 1
    return [p.grad.clone() for p in params]


# ------------------------------------------------------------------------------------------ hinton
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
def test_ensemble_logits_softmax_is_mean_of_softened(weights):
    T = 2.5
    t = _rng_logits(3, 7, 13)
    u = M.ensemble_logits(t, temperature=T, weights=weights)
    w = torch.full((3,), 1 / 3, dtype=D64) if weights is None else torch.tensor(weights, dtype=D64)
    expect = (w.view(3, 1, 1) * torch.softmax(t / T, -1)).sum(0)
    _close(torch.softmax(u / T, -1), expect)
    # a list of teachers is the same as the stacked tensor; unnormalised weights are normalised
    _close(M.ensemble_logits(list(t), temperature=T, weights=None if weights is None else [3 * x for x in weights]), u)


def test_ensemble_kd_loss_value_and_gradients():
    T, N, V = 3.0, 11, 17
    z = _rng_logits(N, V).requires_grad_()
    teachers = [_rng_logits(N, V).requires_grad_() for _ in range(4)]
    y = torch.randint(0, V, (N,))
    y[[2, 7]] = -100
    loss = M.ensemble_kd_loss(z, teachers, y, temperature=T, soft_weight=0.8, hard_weight=0.4)

    z2 = z.detach().clone().requires_grad_()
    p_ens = torch.stack([torch.softmax(t.detach() / T, -1) for t in teachers]).mean(0)
    log_q = torch.log_softmax(z2 / T, -1)
    kl = (p_ens * (p_ens.log() - log_q)).sum(-1)
    ce = F.cross_entropy(z2, y, reduction="none", ignore_index=-100)
    keep = y != -100
    expect = (0.8 * T * T * kl + 0.4 * ce)[keep].sum() / keep.sum()
    _close(loss, expect)
    (gz,) = _grads(loss, [z])
    (gz2,) = _grads(expect, [z2])
    _close(gz, gz2)
    assert all(t.grad is None for t in teachers)  # teachers are never trained


def test_ensemble_bad_input():
    with pytest.raises(ValueError, match="teacher_logits"):
        M.ensemble_logits([])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\]"):
        M.ensemble_logits([torch.randn(2, 5), torch.randn(2, 6)])
    with pytest.raises(ValueError, match="weights"):
        M.ensemble_logits(torch.randn(3, 2, 5), weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        M.ensemble_logits(torch.randn(2, 2, 5), weights=[1.0, -2.0])
    with pytest.raises(ValueError, match="temperature"):
        M.ensemble_logits(torch.randn(2, 2, 5), temperature=0.0)


# ------------------------------------------------------------------------------------------ fitnets
def _convnet(c1, c2, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(c2 * 36, 5)).double()


def test_feature_capture_output_input_and_removal():
    net = _convnet(3, 4, 0)
    x = torch.randn(2, 1, 6, 6, dtype=D64)
    with M.FeatureCapture(net, ["1", "3"]) as cap, M.FeatureCapture(net, "5", capture="input") as icap:
        out = net(x)
        _close(cap["1"], torch.relu(net[0](x)))
        _close(icap["5"], net[4](cap["3"]))
        _close(out, net[5](icap["5"]))
        assert cap["3"].requires_grad
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())
    with pytest.raises(ValueError, match="layers='nope'"):
        M.FeatureCapture(net, ["nope"])
    with M.FeatureCapture(net, ["3"], detach=True) as cap:
        net(x)
        assert not cap["3"].requires_grad
        with pytest.raises(KeyError):
            cap["1"]


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
def test_hint_loss_value_and_gradients(reduction):
    student, teacher = _convnet(3, 4, 1), _convnet(6, 8, 2)
    reg = M.HintRegressor(4, 8, kind="conv").double()
    x = torch.randn(5, 1, 6, 6, dtype=D64)
    with M.FeatureCapture(student, "3") as sc, M.FeatureCapture(teacher, "2") as tc:
        student(x)
        teacher(x)  # teacher NOT under no_grad: hint_loss must still not train it
        loss = M.hint_loss(sc["3"], tc["2"], reg, reduction=reduction)
        d = reg(sc["3"]) - tc["2"]
    expect = {"mean": d.pow(2).mean(), "sum": d.pow(2).sum(), "batchmean": d.pow(2).sum() / 5}[reduction]
    _close(loss, expect)
    loss.backward()
    assert reg.proj.weight.grad is not None and reg.proj.weight.grad.abs().sum() > 0
    assert student[2].weight.grad is not None and student[0].weight.grad is not None
    assert student[5].weight.grad is None  # after the guided layer: untouched
    assert all(p.grad is None for p in teacher.parameters())
    # the regressor's gradient is the hand-derived one: d/dW of mean/sum of (W*s + b - t)^2
    s = sc["3"].detach()
    W = reg.proj.weight.detach().clone().requires_grad_()
    r = F.conv2d(s, W, reg.proj.bias.detach())
    e = (r - tc["2"].detach()).pow(2)
    e = {"mean": e.mean(), "sum": e.sum(), "batchmean": e.sum() / 5}[reduction]
    e.backward()
    _close(reg.proj.weight.grad, W.grad)


def test_hint_regressor_kernel_maps_spatial_size_and_shape_errors():
    reg = M.HintRegressor(4, 7, kind="conv", kernel_size=3)
    assert reg(torch.randn(2, 4, 6, 6)).shape == (2, 7, 4, 4)
    lin = M.HintRegressor(4, 7, kind="linear")
    assert lin(torch.randn(3, 5, 4)).shape == (3, 5, 7)
    with pytest.raises(ValueError, match="teacher_feature"):
        M.hint_loss(torch.randn(2, 4, 6, 6), torch.randn(2, 7, 5, 5), reg)
    with pytest.raises(ValueError, match="kind"):
        M.HintRegressor(4, 7, kind="mlp")
    with pytest.raises(ValueError, match="student_dim"):
        M.HintRegressor(0, 7)


def test_guided_parameters_and_schedule():
    net = _convnet(3, 4, 3)
    params = M.guided_parameters(net, "2", torch.randn(1, 1, 6, 6, dtype=D64))
    expect = [net[0].weight, net[0].bias, net[2].weight, net[2].bias]
    assert [id(p) for p in params] == [id(p) for p in expect]
    assert net.training
    sched = M.TwoStageSchedule(hint_steps=3)
    assert [sched.stage(i) for i in range(5)] == ["hint"] * 3 + ["kd"] * 2
    with pytest.raises(ValueError, match="hint_steps"):
        M.TwoStageSchedule(-1)


# -------------------------------------------------------------------------------- self-distillation
class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.pool(self.block2(self.block1(x))).flatten(1))


@pytest.mark.parametrize("kind", ["attention", "bottleneck"])
def test_self_distillation_loss_and_gradient_routing(kind):
    torch.manual_seed(4)
    model = _Backbone().double()
    heads = {"block1": M.AuxiliaryHead(4, 5, embed_dim=6, kind=kind).double(),
             "block2": M.AuxiliaryHead(6, 5, embed_dim=6, kind=kind).double()}
    sd = M.SelfDistillation(model, heads, feature_layer="fc")
    x = torch.randn(7, 1, 6, 6, dtype=D64)
    y = torch.randint(0, 5, (7,))
    T, a, h, lam = 3.0, 0.3, 0.7, 0.05
    out = sd(x)
    assert len(out.logits) == 3 and len(out.features) == 3
    _close(out.logits[-1], model(x))
    loss = M.self_distillation_loss(out, y, temperature=T, soft_weight=a, hard_weight=h, hint_weight=lam)
    z, f = out.logits, out.features
    expect = F.cross_entropy(z[-1], y)
    for i in range(2):
        kl = F.kl_div(F.log_softmax(z[i] / T, -1), F.log_softmax(z[-1].detach() / T, -1), log_target=True,
                      reduction="batchmean")
        expect = expect + h * F.cross_entropy(z[i], y) + a * T * T * kl + lam * F.mse_loss(f[i], f[-1].detach())
    _close(loss, expect)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for hd in heads.values() for p in hd.parameters())
    # the deepest exit's classifier is taught by the labels only: its grad is that of CE(z[-1], y)
    fc_grad = model.fc.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    _close(fc_grad, model.fc.weight.grad)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())  # hooks live only inside forward
    _close(sd.predict(x, exit=0), heads["block1"](model.block1(x))[0])


def test_self_distillation_mlp_heads_and_errors():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    sd = M.SelfDistillation(model, {"1": M.AuxiliaryHead(16, 4, embed_dim=12, kind="mlp").double()},
                            feature_layer="4")
    x = torch.randn(6, 9, dtype=D64)
    y = torch.randint(0, 4, (6,))
    out = sd(x)
    assert out.features[0].shape == out.features[1].shape == (6, 12)
    # a list of logits (no features) gives the logit terms only
    l_no_hint = M.self_distillation_loss(out.logits, y)
    l_full = M.self_distillation_loss(out, y, hint_weight=0.0)
    _close(l_no_hint, l_full)
    with pytest.raises(ValueError, match="heads"):
        M.SelfDistillation(model, {})
    with pytest.raises(ValueError, match="layers='9'"):
        M.SelfDistillation(model, {"9": M.AuxiliaryHead(16, 4, embed_dim=12, kind="mlp")})
    with pytest.raises(ValueError, match="at least two exits"):
        M.self_distillation_loss([out.logits[0]], y)


# ------------------------------------------------------------------------------------- born-again
@pytest.mark.parametrize("label_weight", [0.0, 0.6])
def test_born_again_loss(label_weight):
    T, N, V = 1.5, 9, 10
    z = _rng_logits(N, V).requires_grad_()
    t = _rng_logits(N, V).requires_grad_()
    y = torch.randint(0, V, (N,))
    loss = M.born_again_loss(z, t, y if label_weight else None, label_weight=label_weight, temperature=T)
    z2 = z.detach().clone().requires_grad_()
    expect = T * T * _kl_rows(t.detach(), z2, T).mean()
    if label_weight:
        expect = expect + label_weight * F.cross_entropy(z2, y)
    _close(loss, expect)
    (g,), (g2,) = _grads(loss, [z]), _grads(expect, [z2])
    _close(g, g2)
    assert t.grad is None
    with pytest.raises(ValueError, match="target"):
        M.born_again_loss(z, t, None, label_weight=0.5)


def test_generations_and_ensemble():
    torch.manual_seed(6)
    trained = []
    for k, student, teacher in M.generations(lambda: nn.Linear(4, 3).double(), 3):
        if k == 0:
            assert teacher is None
        else:
            assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
            _close(teacher.weight, trained[-1].weight)  # the previous generation as trained
            assert teacher is not trained[-1]
        with torch.no_grad():
            student.weight.add_(float(k))  # stands in for training
        trained.append(student)
    ens = M.BornAgainEnsemble(trained)
    x = torch.randn(5, 4, dtype=D64)
    expect = torch.log(torch.stack([m(x).softmax(-1) for m in trained]).mean(0))
    _close(ens(x), expect)
    with pytest.raises(ValueError, match="num_generations"):
        list(M.generations(lambda: nn.Linear(2, 2), 0))


# ------------------------------------------------------------------------------ function matching
def test_function_matching_same_input_and_teacher_frozen():
    torch.manual_seed(7)
    student, teacher = nn.Linear(6, 5).double(), nn.Linear(6, 5).double()
    x = torch.randn(8, 6, dtype=D64)
    shift = torch.randn(6, dtype=D64)
    seen = []

    def augment(inp):
        seen.append(inp)
        return inp * 0.5 + shift

    T = 2.0
    loss, zs, zt = M.function_matching_loss(student, teacher, x, augment=augment, temperature=T,
                                            return_logits=True)
    assert len(seen) == 1  # one augmentation, shared by both models (consistent teaching)
    xa = x * 0.5 + shift
    _close(zs, student(xa))
    _close(zt, teacher(xa))
    _close(loss, T * T * _kl_rows(teacher(xa).detach(), student(xa), T).mean())
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    with pytest.raises(ValueError, match="hard_weight"):
        M.function_matching_loss(student, teacher, x, hard_weight=1.0)


def test_mixup_is_a_per_example_convex_combination():
    x = torch.randn(64, 3, 2, dtype=D64)
    torch.manual_seed(8)
    mixed = M.mixup(x, alpha=0.4)
    torch.manual_seed(8)
    a = torch.tensor(0.4)
    lam = torch.distributions.Beta(a, a).sample((64,)).to(D64)
    perm = torch.randperm(64)
    _close(mixed, lam.view(64, 1, 1) * x + (1 - lam.view(64, 1, 1)) * x[perm])
    assert ((lam > 0) & (lam < 1)).all()
    with pytest.raises(ValueError, match="alpha"):
        M.mixup(x, alpha=0.0)


# ----------------------------------------------------------------------------------- contrastive
def test_contrastive_infonce_value_gradients_and_bounded_queue():
    torch.manual_seed(9)
    crd = M.ContrastiveDistiller(5, 7, embed_dim=4, queue_size=10, temperature=0.2).double()
    s_emb = torch.randn(6, 5, dtype=D64, requires_grad=True)
    t_emb = torch.randn(6, 7, dtype=D64, requires_grad=True)

    def expect_loss(s_emb, t_emb, queue):
        s = F.normalize(crd.student_proj(s_emb), dim=-1)
        t = F.normalize(crd.teacher_proj(t_emb.detach()), dim=-1)
        logits = torch.cat([s @ t.T, s @ queue.T], 1) / 0.2
        return F.cross_entropy(logits, torch.arange(6))

    loss = crd(s_emb, t_emb)  # empty queue: in-batch negatives only
    _close(loss, expect_loss(s_emb, t_emb, torch.zeros(0, 4, dtype=D64)))
    loss.backward()
    assert crd.student_proj.weight.grad is not None and crd.teacher_proj.weight.grad is not None
    assert s_emb.grad is not None and t_emb.grad is None
    assert crd._filled == 6
    q = crd.queue[:6].clone()
    _close(q, F.normalize(crd.teacher_proj(t_emb), dim=-1).detach())

    s2, t2 = torch.randn(6, 5, dtype=D64), torch.randn(6, 7, dtype=D64)
    _close(crd(s2, t2), expect_loss(s2, t2, q))
    assert crd._filled == 10 and crd._ptr == 2  # wrapped around: memory stays bounded
    newest = F.normalize(crd.teacher_proj(t2), dim=-1).detach()
    _close(crd.queue[6:10], newest[:4])
    _close(crd.queue[0:2], newest[4:6])
    crd.eval()
    crd(s2, t2)
    assert crd._ptr == 2  # eval mode never touches the queue
    with pytest.raises(ValueError, match="teacher_emb"):
        crd(s2, torch.randn(5, 7, dtype=D64))


# ------------------------------------------------------------------------ cosine / label smoothing
def test_cosine_embedding_loss():
    h_s = torch.randn(3, 5, 8, dtype=D64, requires_grad=True)
    h_t = torch.randn(3, 5, 8, dtype=D64, requires_grad=True)
    loss = M.cosine_embedding_loss(h_s, h_t)
    expect = nn.CosineEmbeddingLoss()(h_s.reshape(-1, 8), h_t.detach().reshape(-1, 8), torch.ones(15, dtype=D64))
    _close(loss, expect)
    mask = torch.rand(3, 5) > 0.4
    mask[0, 0] = True
    cos = F.cosine_similarity(h_s, h_t, dim=-1)
    _close(M.cosine_embedding_loss(h_s, h_t, mask=mask), (1 - cos[mask]).mean())
    _close(M.cosine_embedding_loss(h_s, h_t, mask=torch.zeros(3, 5, dtype=torch.bool)), torch.zeros((), dtype=D64))
    reg = M.HintRegressor(6, 8, kind="linear").double()
    M.cosine_embedding_loss(torch.randn(3, 5, 6, dtype=D64), h_t, regressor=reg).backward()
    assert reg.proj.weight.grad is not None and h_t.grad is None
    with pytest.raises(ValueError, match="mask"):
        M.cosine_embedding_loss(h_s, h_t, mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smoothing_matches_torch_and_uniform_teacher(eps):
    N, V = 13, 9
    z = _rng_logits(N, V).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[3] = -100
    loss = M.label_smoothing_loss(z, y, smoothing=eps)
    z2 = z.detach().clone().requires_grad_()
    expect = F.cross_entropy(z2, y, label_smoothing=eps, ignore_index=-100)
    _close(loss, expect)
    (g,), (g2,) = _grads(loss, [z]), _grads(expect, [z2])
    _close(g, g2)
    # Müller et al.: label smoothing is KD from a uniform teacher, up to the constant eps * log V
    _close(M.uniform_teacher_loss(z.detach(), y, smoothing=eps), expect.detach())
    with pytest.raises(ValueError, match="smoothing"):
        M.label_smoothing_loss(z, y, smoothing=1.5)


def test_methods_float32_inputs_give_float32_losses():
    z, t = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.randint(0, 6, (4,))
    assert M.ensemble_kd_loss(z, [t, t * 2], y, temperature=2.0, hard_weight=0.5).dtype == torch.float32
    assert M.born_again_loss(z, t, y, label_weight=1.0).dtype == torch.float32
    assert M.label_smoothing_loss(z, y).dtype == torch.float32
    assert fastkd.methods is M


def test_contrastive_index_keeps_own_queued_copy_out_of_negatives():
    torch.manual_seed(10)
    crd = M.ContrastiveDistiller(5, 7, embed_dim=4, queue_size=8, temperature=0.1).double()
    s1, t1 = torch.randn(4, 5, dtype=D64), torch.randn(4, 7, dtype=D64)
    crd(s1, t1, index=torch.tensor([0, 1, 2, 3]))
    q, qid = crd.queue[:4].clone(), crd.queue_ids[:4].clone()
    assert qid.tolist() == [0, 1, 2, 3]
    s2, t2 = torch.randn(3, 5, dtype=D64, requires_grad=True), torch.randn(3, 7, dtype=D64)
    idx = torch.tensor([2, 9, 0])
    loss = crd(s2, t2, index=idx)
    s = F.normalize(crd.student_proj(s2), dim=-1)
    t = F.normalize(crd.teacher_proj(t2), dim=-1)
    rows = []
    for i in range(3):
        keep = qid != idx[i]
        li = torch.cat([s[i] @ t.T, s[i] @ q[keep].T]) / 0.1
        rows.append(torch.logsumexp(li, 0) - li[i])
    _close(loss, torch.stack(rows).mean())
    loss.backward()
    assert torch.isfinite(s2.grad).all()


# ------------------------------------------------------------------------------------------ examples
def _load_example(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fastkd_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hinton_worked_example_matches_hand_arithmetic(capsys):
    _load_example("hinton_worked_example").main()  # asserts hand arithmetic == kd_loss inside
    assert "ensemble_kd_loss" in capsys.readouterr().out


def test_methods_study_quick_smoke(tmp_path):
    pytest.importorskip("sklearn")
    study = _load_example("methods_study")
    res = study.main(["--quick", "--out", str(tmp_path), "--methods", "hinton,self_distillation,born_again,fitnets,contrastive"])
    assert set(res) == {"scratch", "hinton", "self_distillation", "born_again", "fitnets", "contrastive"}
    assert all(0.0 <= r["acc"] <= 1.0 for runs in res.values() for r in runs)
    assert (tmp_path / "methods_table_10pc.md").read_text().count("|") > 20
    assert (tmp_path / "methods_accuracy_10pc.png").stat().st_size > 1000


def test_mnist1d_study_statistics():
    study = _load_example("methods_study_mnist1d")
    p = study.paired([0.5, 0.6, 0.7], [0.4, 0.6, 0.5])  # differences 10, 0, 20 pp
    assert p["diffs"] == pytest.approx([10.0, 0.0, 20.0])
    assert p["mean"] == pytest.approx(10.0) and p["se"] == pytest.approx(10.0 / 3 ** 0.5)
    assert p["wins"] == 2 and p["verdict"] == "n.s."  # t = 1.73 < t_0.975(2) = 4.30
    assert study.paired([0.60, 0.61, 0.62, 0.63], [0.50, 0.50, 0.51, 0.52])["verdict"] == "better"
    assert study.paired([0.50, 0.50, 0.51, 0.52], [0.60, 0.61, 0.62, 0.63])["verdict"] == "worse"
    assert study.t975(4) == pytest.approx(2.78) and study.t975(12) == pytest.approx(2.23)


def test_mnist1d_generation_is_local_deterministic_and_leaves_global_rngs_alone():
    pytest.importorskip("mnist1d")
    import random

    import numpy as np

    study = _load_example("methods_study_mnist1d")
    np.random.seed(7)
    random.seed(7)
    x, y, xt, yt = study.load_mnist1d(42, 300, 100)
    after = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    assert after == (np.random.rand(), random.random())  # the generator's reseeding was undone
    assert x.shape == (300, 1, 1, 40) and xt.shape == (100, 1, 1, 40) and x.dtype == torch.float32
    assert torch.bincount(torch.cat([y, yt]), minlength=10).tolist() == [40] * 10
    x2, y2, _, _ = study.load_mnist1d(42, 300, 100)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, study.load_mnist1d(43, 300, 100)[0])


def test_methods_mnist1d_quick(tmp_path):
    pytest.importorskip("mnist1d")
    import json
    import statistics

    study = _load_example("methods_study_mnist1d")
    out = tmp_path / "r.jsonl"
    res, meta = study.main(["--quick", "--out", str(tmp_path), "--results", str(out)])
    expect = {tuple(k.split("/")) for k in study.QUICK_METHODS}
    expect |= {(st, "scratch") for st, _ in expect}
    assert set(res) == expect and all(len(runs) == 2 for runs in res.values())
    assert min(meta["teacher_acc"]) > 0.6  # 150 steps already give a teacher far above chance (10 %)
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(lines) == 2 * len(expect)
    assert all(0.0 <= r["acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0 for r in lines)
    by = {(r["student"], r["method"], r["seed"]): r for r in lines}
    for seed in (0, 1):
        ban, scratch = by[("cnn", "born_again", seed)], by[("cnn", "scratch", seed)]
        assert ban["gen0_acc"] == scratch["acc"]  # generation 0 is that seed's scratch student
        assert {f"gen{k}_acc" for k in range(5)} | {"ens2_acc", "ens4_acc"} <= set(ban)
        assert {"exit1_acc", "exit2_acc"} <= set(by[("cnn", "self_distillation", seed)])
    # the table's paired difference is the mean of the per-seed differences in the JSON lines
    d = [100 * (by[("mlp", "kd_t4", s)]["acc"] - by[("mlp", "scratch", s)]["acc"]) for s in (0, 1)]
    table = (tmp_path / "methods_mnist1d_table.md").read_text()
    row = next(r for r in table.splitlines() if r.startswith("| MLP | KD, τ = 4 |"))
    assert row.split("|")[6].strip().startswith(f"{statistics.mean(d):+.1f} ±")
    assert "| function matching beats labels (same budget) |" in table and "| BYOT: the shallow exits" in table
    for png in ("methods_mnist1d_delta.png", "methods_mnist1d_tau_generations.png"):
        assert (tmp_path / png).stat().st_size > 1000
