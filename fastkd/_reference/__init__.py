"""The pure-PyTorch reference of every op family: the float64 test oracle and the ``torch`` backend.

One module per op family, named as the op family: ``kd`` (the dense loss), ``kd_shard`` (its
vocab-parallel phases), ``capture``, ``sparse_kd`` and ``sparse_kd_shard``.
"""
