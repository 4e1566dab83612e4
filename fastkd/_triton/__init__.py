"""Triton kernels (optional: imported lazily, never needed to import fastkd)."""
