"""fastkd backends: see README.md in this directory for how dispatch works."""
