"""The demo's cache on disk: content keys that name each cached stage, and JSON files written atomically.

A key is a short hash of everything a stage's result depends on, so a changed setting names a new
entry instead of reusing a stale one, and an unchanged one finds the entry an earlier run wrote.
"""
from __future__ import annotations

import hashlib
import json
import os


def cache_key(*parts) -> str:
    """12 hex digits of the SHA-256 of ``parts`` as sorted-key JSON (non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def save_json(obj, path: str) -> None:
    """Writes ``obj`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def load_json(path: str):
    with open(path) as fh:
        return json.load(fh)
