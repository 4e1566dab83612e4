"""What the benchmarks share: the device and versions their records carry, timing helpers, the copy
bandwidth reference, progress bars, measuring subprocesses, JSON-lines output and the plot.

Nothing here imports torch or matplotlib at module level: ``fastkd bench --help`` stays fast, and
matplotlib is needed only for ``--plot``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence


class BenchError(Exception):
    """A benchmark cannot run as asked (no device, a missing package): reported without a traceback."""


# ------------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else ``platform``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """The GPU's name for ``"cuda"``, else the CPU model and its logical CPU count."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def versions(*extra: str) -> Dict[str, Optional[str]]:
    """torch, fastkd and Python versions, plus those of the importable ``extra`` modules."""
    import torch

    import fastkd

    out: Dict[str, Optional[str]] = {"torch": torch.__version__, "fastkd": fastkd.__version__,
                                     "python": platform.python_version()}
    for mod in extra:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def sync(device) -> None:
    """Waits for the GPU's queued work (no-op on CPU), so wall-clock times cover the kernels."""
    if str(getattr(device, "type", device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device, reps: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth in GB/s (read + write counted), median of the last 6 of 7 copies."""
    import torch

    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ts = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts[1:]) / 1e9


ELEMENT_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "bf16": 2, "fp16": 2, "fp32": 4}


# ------------------------------------------------------------------------------------------------
# progress and tables
# ------------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on stderr over ``total`` measurements (none without tqdm); ``write`` prints a
    table line above the bar."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is optional
            tqdm = None
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False) if tqdm and total > 1 else None

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# measuring subprocesses
# ------------------------------------------------------------------------------------------------
RESULT_TAG = "RESULT "


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a measuring subprocess: this one's, with the directory fastkd was imported
    from appended to PYTHONPATH (so a child finds the same fastkd even when only this process's
    sys.path reached it; an installed fastkd still comes first), plus ``extra``."""
    import fastkd

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), root) if p)
    return env


def run_child(module: str, cfg: dict, *, timeout: Optional[float] = None,
              env: Optional[Dict[str, str]] = None) -> dict:
    """Runs ``python -m <module> --child <cfg as JSON>`` in a fresh process and returns the dict it
    printed after ``RESULT ``; ``{"skipped": why}`` when it failed or timed out."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(cfg)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(env))
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if out.returncode != 0 or not lines:
        err = (out.stderr or out.stdout).strip().splitlines()
        return {"skipped": f"child failed: {err[-1] if err else f'exit {out.returncode}'}"[:400]}
    return json.loads(lines[-1][len(RESULT_TAG):])


def child_reply(result: dict) -> None:
    """What a measuring subprocess prints last: its result for :func:`run_child`."""
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# output: JSON lines and the plot
# ------------------------------------------------------------------------------------------------
def add_output_arguments(ap: argparse.ArgumentParser, default_out: Optional[str]) -> None:
    where = default_out or "none: the table is printed and nothing is written"
    ap.add_argument("--out", default=default_out, metavar="FILE.jsonl",
                    help=f"append one JSON line per measurement to FILE.jsonl (default: {where})")
    ap.add_argument("--no-save", action="store_true", help="write no JSON lines, not even to the default --out")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="also draw time (ms) and GB/s against V (or N) per provider into FILE.png "
                         "(needs matplotlib)")


def out_path(args) -> Optional[str]:
    return None if args.no_save or not args.out else args.out


def check_plot_available(args) -> None:
    """Fails before any measurement when ``--plot`` is asked for and matplotlib is missing."""
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed (pip install matplotlib)")


def append_jsonl(path: Optional[str], records: Iterable[dict]) -> int:
    """Appends ``records`` to ``path`` as JSON lines (creating its folder); returns how many."""
    records = list(records)
    if not path or not records:
        return 0
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return len(records)


@dataclass(frozen=True)
class Point:
    """One measured time on the plot: provider, sizes, median ms, achieved GB/s, and what else
    distinguishes its series (mode, dtype, ...)."""

    provider: str
    n: int
    v: int
    ms: float
    gbps: float
    variant: str = ""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def plot(points: Sequence[Point], path: str, title: str, copy_gbps: Optional[float] = None) -> str:
    """Two panels, time (ms) and GB/s against V — or against N when only N varies — one line per
    provider (and variant, where several were measured). Returns ``path``."""
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if _finite(p.ms) and p.ms > 0]
    if not points:
        raise BenchError("nothing to plot: no measurement finished")
    vary_v, vary_n = len({p.v for p in points}) > 1, len({p.n for p in points}) > 1
    x_of = (lambda p: p.n) if vary_n and not vary_v else (lambda p: p.v)
    x_label = "N (rows)" if vary_n and not vary_v else "V (vocabulary)"
    # One colour per provider, one line style per variant (mode, dtype, ...), one marker per N
    # when N varies alongside V.
    providers = list(dict.fromkeys(p.provider for p in points))
    variants = list(dict.fromkeys(p.variant for p in points))
    ns = list(dict.fromkeys(p.n for p in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v", "P", "X")
    series: Dict[tuple, List[Point]] = {}
    for p in points:
        series.setdefault((p.provider, p.variant, p.n if vary_n and vary_v else None), []).append(p)

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    for (prov, variant, n), pts in series.items():
        pts = sorted(pts, key=x_of)
        xs = [x_of(p) for p in pts]
        label = prov + (f" ({variant})" if len(variants) > 1 and variant else "") + (f", N={n}" if n else "")
        style = dict(color=colours[providers.index(prov) % len(colours)],
                     ls=styles[variants.index(variant) % len(styles)],
                     marker=markers[ns.index(n) % len(markers)] if n else "o", ms=4)
        ax_t.plot(xs, [p.ms for p in pts], label=label, **style)
        ax_b.plot(xs, [p.gbps for p in pts], label=label, **style)
    bw_title = "achieved bandwidth"
    if copy_gbps:
        if max(p.gbps for p in points) >= 0.2 * copy_gbps:
            ax_b.axhline(copy_gbps, color="grey", ls="--", lw=1, label=f"copy bandwidth ({copy_gbps:.0f} GB/s)")
        else:  # a line far above every point would flatten them all
            bw_title += f" (device copy bandwidth: {copy_gbps:.1f} GB/s)"
    xs_all = sorted({x_of(p) for p in points})
    for ax in (ax_t, ax_b):
        if xs_all[-1] > 4 * xs_all[0]:
            ax.set_xscale("log")
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:,}" for x in xs_all], rotation=30)
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    ms_all = [p.ms for p in points]
    if max(ms_all) > 20 * min(ms_all):
        ax_t.set_yscale("log")
    ax_t.set_ylabel("time per call (ms, median)")
    ax_t.set_title("time")
    ax_b.set_ylabel("GB/s over the minimal memory traffic")
    ax_b.set_title(bw_title)
    ax_b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def finish(args, records: List[dict], points: Callable[[List[dict]], Sequence[Point]], title: str, *,
           copy_gbps: Optional[float] = None, already_written: bool = False) -> None:
    """The end of every benchmark: appends the records to ``--out`` (unless written as they came,
    ``already_written``) and draws ``--plot``."""
    path = out_path(args)
    if path and not already_written:
        n = append_jsonl(path, records)
        print(f"# appended {n} results to {path}")
    elif path:
        print(f"# appended {len(records)} results to {path}")
    if getattr(args, "plot", None):
        plot(points(records), args.plot, title, copy_gbps=copy_gbps)
        print(f"# plot: {args.plot}")


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def standalone_main(module, argv: Optional[Sequence[str]] = None, default_out: Optional[str] = None,
                    prog: Optional[str] = None) -> int:
    """``main`` of a benchmark module outside the ``fastkd`` command (``python -m``, bench/ scripts,
    measuring subprocesses): its own parser, the same run."""
    if prog is None:
        script = sys.argv[0] if sys.argv and sys.argv[0] else "-c"
        as_module = script == "-c" or os.path.abspath(script) == os.path.abspath(module.__file__)
        prog = f"python -m {module.MODULE}" if as_module else os.path.basename(script)
    ap = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(ap, default_out=default_out)
    args = ap.parse_args(argv)
    return run_module(module, args, prog)


def run_module(module, args, prog: str) -> int:
    try:
        return int(module.run(args) or 0)
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
