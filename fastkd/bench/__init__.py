"""fastkd's kernel benchmarks, runnable from an installed package: ``fastkd bench <name> [options]``.

One module per benchmark, each with ``add_arguments(parser)``, ``run(args)`` and ``main(argv)``
(also ``python -m fastkd.bench.<name>``):

* ``kd``          the fused kd loss against the PyTorch idiom, torch.compile and liger
* ``cache``       the teacher cache: capture and sparse-loss speed, bytes per token
* ``linear``      the fused linear kd loss against the unfused idiom, torch.compile, liger, bare GEMMs
* ``distributed`` the vocab-parallel kd loss over gloo processes against gathering the logits
* ``kd_gpu``      the fused kd loss on a GPU against its pass floors (CUDA events)

Every benchmark prints a table; ``--out FILE.jsonl`` appends one JSON line per measurement and
``--plot FILE.png`` draws time and GB/s against the vocabulary (or row) sizes per provider.
"""
from __future__ import annotations

import importlib

BENCHMARKS = ("kd", "cache", "linear", "distributed", "kd_gpu")


def load(name: str):
    """The module of benchmark ``name`` (one of ``BENCHMARKS``)."""
    if name not in BENCHMARKS:
        raise ValueError(f"no benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"{__name__}.{name}")
