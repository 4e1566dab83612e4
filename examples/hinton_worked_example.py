"""Hinton et al. (2015) soft targets, worked by hand and checked against fastkd.kd_loss.

One example, three classes (cat, dog, car), temperature T = 2, true label "cat":

    teacher logits t = [5, 3, -1]      student logits z = [2, 2, 0]

The script prints every intermediate number computed with plain Python floats (math module only),
then the same loss and gradient from the fused ``fastkd.kd_loss``, and finally the ensemble case
(the mean of two teachers' softened distributions) via ``fastkd.methods.ensemble_kd_loss``.
Run: python examples/hinton_worked_example.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastkd  # noqa: E402
from fastkd.methods import ensemble_kd_loss  # noqa: E402


def softmax(v, T=1.0):
    m = max(v)
    e = [math.exp((x - m) / T) for x in v]
    s = sum(e)
    return [x / s for x in e]


def fmt(v):
    return "[" + ", ".join(f"{x:.4f}" for x in v) + "]"


def main():
    T, y = 2.0, 0
    soft_weight, hard_weight = 0.9, 0.1
    t = [5.0, 3.0, -1.0]
    z = [2.0, 2.0, 0.0]

    p = softmax(t, T)  # softened teacher: the soft targets
    q = softmax(z, T)  # softened student
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    q1 = softmax(z)    # the hard term uses T = 1
    ce = -math.log(q1[y])
    loss = soft_weight * T * T * kl + hard_weight * ce
    # d/dz_j: soft part T² · (q_j − p_j)/T = T·(q_j − p_j); hard part q1_j − [j = y]
    grad = [soft_weight * T * (qj - pj) + hard_weight * (q1j - (j == y)) for j, (qj, pj, q1j) in
            enumerate(zip(q, p, q1))]

    print(f"T = {T}, label = {y}, soft_weight = {soft_weight}, hard_weight = {hard_weight}")
    print(f"teacher softmax at T=1       : {fmt(softmax(t))}   (almost one-hot)")
    print(f"soft targets p = softmax(t/T): {fmt(p)}   (dog is 'closer' to cat than car is)")
    print(f"student q = softmax(z/T)     : {fmt(q)}")
    print(f"KL(p || q)                   : {kl:.6f}")
    print(f"CE(z, y) at T=1              : {ce:.6f}")
    print(f"loss = {soft_weight}·T²·KL + {hard_weight}·CE   : {loss:.6f}")
    print(f"d loss / d z                 : {fmt(grad)}")

    zt = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([t], dtype=torch.float64)
    out = fastkd.kd_loss(zt, tt, torch.tensor([y]), temperature=T, soft_weight=soft_weight, hard_weight=hard_weight)
    out.backward()
    print(f"fastkd.kd_loss               : {out.item():.6f}   grad {fmt(zt.grad[0].tolist())}")

    # Ensemble of two teachers: the soft targets are the mean of their softened distributions.
    t2 = [4.0, 4.5, 0.0]
    p2 = softmax(t2, T)
    p_ens = [(a + b) / 2 for a, b in zip(p, p2)]
    kl_ens = sum(pi * math.log(pi / qi) for pi, qi in zip(p_ens, q))
    loss_ens = soft_weight * T * T * kl_ens + hard_weight * ce
    out_ens = ensemble_kd_loss(zt.detach(), [tt, torch.tensor([t2], dtype=torch.float64)], torch.tensor([y]),
                               temperature=T, soft_weight=soft_weight, hard_weight=hard_weight)
    print(f"\nsecond teacher softened      : {fmt(p2)}")
    print(f"ensemble soft targets        : {fmt(p_ens)}")
    print(f"ensemble loss by hand        : {loss_ens:.6f}   ensemble_kd_loss: {out_ens.item():.6f}")
    assert abs(out.item() - loss) < 1e-6 and abs(out_ens.item() - loss_ens) < 1e-6
    assert all(abs(a - b) < 1e-6 for a, b in zip(zt.grad[0].tolist(), grad))


if __name__ == "__main__":
    main()
