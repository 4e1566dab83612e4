"""``fastkd-bench``: runs ``bench/kd.py`` (or another ``bench/<name>.py``) of a source checkout.

The benchmarks live in the repository, not the wheel: ``fastkd-bench [name] [args...]`` works from an
editable install (``make`` sets one up) and says so otherwise.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "kd"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    script = bench_dir / f"{name}.py"
    if not script.is_file():
        avail = sorted(p.stem for p in bench_dir.glob("*.py")) if bench_dir.is_dir() else []
        print(f"fastkd-bench: no benchmark {name!r} at {script}"
              + (f"; available: {', '.join(avail)}" if avail else
                 " (benchmarks ship with the source checkout: pip install -e . from a clone)"),
              file=sys.stderr)
        return 2
    sys.argv = [str(script)] + argv
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
