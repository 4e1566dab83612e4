"""The op layer: the ``torch.library`` custom ops of fastkd, their fake implementations and autograd.

One module per op family (``kd``, ``capture``, ``sparse_kd``). Each op takes its tensors and its
scalar settings by keyword, and the name of a backend already chosen by
``fastkd._backends.registry.resolve``; it allocates the outputs, calls the backend's implementation
to fill them, and (for the losses) saves the gradient the kernel wrote during the forward pass, so
that backward only scales it by ``grad_output``. The fake implementations state every output's
shape and dtype and check the inputs with ``torch._check``, so ``torch.compile(fullgraph=True)``
traces through the ops without a graph break.

Which entry points are custom ops, and which are autograd Functions over ops:

* A computation that is one kernel call per batch is a custom op: ``fastkd::kd``,
  ``fastkd::capture_topk``, ``fastkd::capture_sample``, ``fastkd::sparse_kd``.
* A computation that loops over chunks, or runs collectives between kernel calls, is an
  ``autograd.Function`` whose forward calls the backends (or the ops) and whose backward scales what
  forward stored: the fused linear loss (``fastkd/linear.py``) and the vocab-parallel losses
  (``fastkd/distributed.py``).
* ``inplace_grad=True`` of ``kd_loss`` writes the gradient into the student logits' storage, which a
  functional custom op cannot express: it is an eager-only ``autograd.Function`` (``kd.py``).
* The torch backend is plain autograd (cap ``"autograd"``) and is called outside the custom ops.
"""
