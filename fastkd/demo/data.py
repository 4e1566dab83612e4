"""Demo corpus: real English and Python text that ships with the interpreter itself.

Two sources, both present on any CPython install and needing no network: the documentation topics of
``pydoc_data.topics`` (the text behind ``help("with")`` etc.) and the standard library's top-level
``*.py`` sources. Documents are split into train and held-out parts by a hash of their name, so the
split is the same on every machine with the same Python version and never depends on file order.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _doc_topics() -> List[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [Document(f"topic:{k}", v) for k, v in sorted(topics.items())]


def _stdlib_sources(max_chars: int, subpackages: bool) -> List[Document]:
    stdlib = sysconfig.get_paths()["stdlib"]
    top = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    # Subpackages only after every top-level module, so a small corpus is always the same files.
    nested = [] if not subpackages else sorted(
        p for p in glob.glob(os.path.join(stdlib, "*", "**", "*.py"), recursive=True)
        if "site-packages" not in p and "dist-packages" not in p)
    docs, total = [], 0
    for path in top + nested:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(Document(f"stdlib:{os.path.relpath(path, stdlib)}", text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def load_documents(max_chars: int = 6_000_000, subpackages: bool = False) -> List[Document]:
    """Documentation topics first, then stdlib sources until about ``max_chars`` characters in all:
    the top-level modules (≈ 4.7 M characters on CPython 3.11), then, if ``subpackages``, the
    modules of the standard library's packages (≈ 30 M more)."""
    docs = _doc_topics()
    have = sum(len(d.text) for d in docs)
    docs += _stdlib_sources(max(0, max_chars - have), subpackages)
    if not docs:
        raise RuntimeError("found no text: neither pydoc_data.topics nor the stdlib sources are readable")
    return docs


def _is_heldout(name: str, heldout_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return (h / 2.0 ** 64) < heldout_fraction


def split_documents(docs: List[Document], heldout_fraction: float = 0.1) -> Tuple[List[Document], List[Document]]:
    """(train, heldout) by document, deterministic. Both parts always get at least one document."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    train = [d for d in docs if not _is_heldout(d.name, heldout_fraction)]
    held = [d for d in docs if _is_heldout(d.name, heldout_fraction)]
    if not held:
        held, train = train[-1:], train[:-1]
    if not train:
        train, held = held[:1], held[1:]
    return train, held


def fingerprint(docs: List[Document]) -> str:
    """Content hash of a document list: cache keys change whenever the text changes."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]
