"""The shape of the package: no import cycle, the public API kept, one dispatch rule, one set of
setting rules shared by every entry point.

``python tests/test_architecture.py --write-api`` rewrites ``tests/data/public_api.json`` (only when
the public API is meant to change).
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd._backends import registry

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fastkd"
API_FILE = Path(__file__).resolve().parent / "data" / "public_api.json"


# ------------------------------------------------------------------------------------------------
# The import graph
# ------------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known) -> set:
    """fastkd modules imported by any import statement of the file (module level or in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            # the module itself or its nearest known parent (import fastkd.x.y -> fastkd.x.y)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("fastkd") and t != name:
                out.add(t)
    return out


def _cycle(graph):
    state = {}
    stack = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert sum(len(v) for v in graph.values()) > 40, "the import scan found implausibly few edges"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_registry_imports_no_fastkd_module():
    mods = _modules()
    assert _imports("fastkd._backends.registry", mods["fastkd._backends.registry"], mods) == set()


def test_import_fastkd_loads_no_backend_and_no_triton():
    code = ("import sys, fastkd; fastkd.kd_loss; "
            "print(sorted(m for m in sys.modules if m.startswith('fastkd._backends.') and m != "
            "'fastkd._backends.registry')); print('triton' in sys.modules)")
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT.parent))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines == ["[]", "False"], r.stdout


# ------------------------------------------------------------------------------------------------
# The public API
# ------------------------------------------------------------------------------------------------
def _sig(obj):
    try:
        s = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = []
    for p in s.parameters.values():
        # repr without memory addresses (a function default prints as "<function f at 0x...>")
        d = None if p.default is inspect.Parameter.empty else re.sub(r" at 0x[0-9a-f]+", "", repr(p.default))
        out.append(f"{p.name}:{p.kind.name}" + ("" if d is None else f"={d}"))
    return out


def _describe(obj):
    if inspect.isclass(obj):
        members = {}
        for name, m in inspect.getmembers(obj):
            if name.startswith("_") and name not in ("__init__", "__call__"):
                continue
            if inspect.isfunction(m) or inspect.ismethod(m):
                if getattr(m, "__module__", "") and not m.__module__.startswith("fastkd"):
                    continue
                members[name] = _sig(m)
            elif isinstance(inspect.getattr_static(obj, name), property):
                members[name] = "property"
        return {"kind": "class", "init": _sig(obj), "members": members}
    if inspect.ismodule(obj):
        return {"kind": "module"}
    if callable(obj):
        return {"kind": "function", "signature": _sig(obj)}
    return {"kind": type(obj).__name__}


def current_api():
    import fastkd.cli
    import fastkd.distributed
    import fastkd.methods
    from fastkd.integrations import transformers as hf

    api = {}
    for modname, mod, names in [
        ("fastkd", fastkd, [n for n in dir(fastkd) if not n.startswith("_")]),
        ("fastkd.distributed", fastkd.distributed, fastkd.distributed.__all__),
        ("fastkd.methods", fastkd.methods, fastkd.methods.__all__),
        ("fastkd.integrations.transformers", hf, ["KDTrainer", "DistillationTrainer", "head_input_capture"]),
    ]:
        with warnings.catch_warnings():  # DistillationTrainer: the deprecated name of KDTrainer
            warnings.simplefilter("ignore", DeprecationWarning)
            api[modname] = {n: _describe(getattr(mod, n)) for n in sorted(names)}
    api["fastkd"]["TeacherCacheError"] = _describe(fastkd.cache.TeacherCacheError)
    parser = fastkd.cli.build_parser()
    cli = {}
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):
            for name, sub in action.choices.items():
                cli[name] = sorted(o for a in sub._actions for o in a.option_strings)
    api["cli"] = cli
    return api


def _compatible(old, new, where, problems):
    """Every name, parameter (kind, default, order) and CLI option of ``old`` is still in ``new``;
    new names, new keyword-only or defaulted parameters and new options are allowed."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key, value in old.items():
            if key not in new:
                problems.append(f"{where}.{key}: removed")
            else:
                _compatible(value, new[key], f"{where}.{key}", problems)
        return
    if isinstance(old, list) and isinstance(new, list):
        if where.startswith("cli"):
            missing = sorted(set(old) - set(new))
            if missing:
                problems.append(f"{where}: options removed {missing}")
            return
        new_names = [p.split(":")[0] for p in new]
        for i, p in enumerate(old):
            name = p.split(":")[0]
            if name not in new_names:
                problems.append(f"{where}: parameter {name} removed")
            elif new[new_names.index(name)] != p:
                problems.append(f"{where}: parameter {p} became {new[new_names.index(name)]}")
            elif "POSITIONAL" in p and new_names.index(name) != i:
                problems.append(f"{where}: positional parameter {name} moved")
        for p in new[len(old):]:
            if p.split(":")[0] not in [q.split(":")[0] for q in old] and "=" not in p \
                    and "KEYWORD_ONLY" not in p and "VAR_" not in p:
                problems.append(f"{where}: new required positional parameter {p}")
        return
    if old != new:
        problems.append(f"{where}: {old!r} became {new!r}")


def test_the_public_api_is_kept():
    old = json.loads(API_FILE.read_text())
    problems = []
    _compatible(old, current_api(), "api", problems)
    assert not problems, "\n".join(problems)


def test_the_api_check_catches_a_removed_parameter():
    old = {"f": {"kind": "function", "signature": ["x:POSITIONAL_OR_KEYWORD", "y:KEYWORD_ONLY=1"]}}
    new = {"f": {"kind": "function", "signature": ["x:POSITIONAL_OR_KEYWORD", "y:KEYWORD_ONLY=2"]}}
    problems = []
    _compatible(old, new, "api", problems)
    assert problems and "y:KEYWORD_ONLY=1" in problems[0]


# ------------------------------------------------------------------------------------------------
# The kernels this build must provide
# ------------------------------------------------------------------------------------------------
def test_the_compiled_kernels_are_loaded_and_registered():
    """The suite never runs green on the reference alone: the C++ kernels are registered for every
    op family they implement; with a CUDA device and a build made with nvcc, the CUDA kernels too;
    the Triton kernels wherever Triton can run (a CUDA device, or its interpreter)."""
    import shutil

    from fastkd import _ext

    assert _ext.C is not None, f"fastkd._C did not load: {_ext.LOAD_ERROR}"
    for op in ("kd", "kd_shard", "capture_topk", "capture_sample", "sparse_kd"):
        assert registry.find(op, "cpu", "cpu") is not None, f"the cpu backend lacks {op}"
    if torch.cuda.is_available() and shutil.which("nvcc"):
        assert _ext.C.built_with_cuda(), "a CUDA device and nvcc are here, but fastkd._C has no CUDA kernels"
        for op in ("kd", "kd_shard", "scale_rows", "capture_topk", "capture_sample", "sparse_kd"):
            assert registry.find(op, "cuda", "cuda") is not None, f"the cuda backend lacks {op}"
    device = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
    if device is not None:
        pytest.importorskip("triton")
        for op in ("kd", "scale_rows", "capture_topk", "capture_sample", "sparse_kd"):
            assert registry.find(op, "triton", device) is not None, \
                f"the triton backend lacks {op}: {registry.why_unavailable('triton')}"


def test_a_missing_extension_fails_the_import_when_required(tmp_path):
    """With FASTKD_REQUIRE_EXTENSION=1 (the suite's setting), a package without fastkd._C does not
    import: a copy of the package without the compiled module, imported in a fresh process."""
    import shutil
    import subprocess

    shutil.copytree(PKG, tmp_path / "fastkd", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()];"
            f"sys.path.insert(0, {str(tmp_path)!r}); import fastkd")
    env = dict(os.environ, FASTKD_REQUIRE_EXTENSION="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode != 0
    assert "FASTKD_REQUIRE_EXTENSION is set but no compiled module fastkd._C" in r.stderr, r.stderr[-2000:]
    # without the requirement it imports, and says why it is slow
    env["FASTKD_REQUIRE_EXTENSION"] = "0"
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the compiled kernels are unavailable" in r.stderr and "no compiled module fastkd._C" in r.stderr


# ------------------------------------------------------------------------------------------------
# One dispatch rule
# ------------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_auto_on_cpu_picks_the_cpu_kernels_for_every_op_family():
    for op in ("kd", "kd_shard", "capture_topk", "capture_sample", "sparse_kd"):
        assert registry.resolve(op, "auto", CPU) == "cpu"
    # the sparse vocab-parallel phases exist in PyTorch only
    assert registry.resolve("sparse_kd_shard", "auto", CPU) == "torch"


def test_a_named_backend_is_used_or_refused_never_replaced():
    assert registry.resolve("kd", "torch", CPU) == "torch"
    with pytest.raises(ValueError, match="backend='cuda' is not available for cpu tensors: it needs CUDA"):
        registry.resolve("kd", "cuda", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.resolve("kd", "fast", CPU)
    with pytest.raises(ValueError, match="backend='cpu' has no vocab-parallel sparse kd kernel"):
        registry.resolve("sparse_kd_shard", "cpu", CPU)


def test_float64_is_refused_by_gpu_backends_not_rerouted():
    registry.check_dtype("kd", "cpu", torch.float64)
    registry.check_dtype("kd", "torch", torch.float64)
    registry.find("kd", "cuda")  # load the real module first: the stand-in below must not hide it
    before = registry._IMPLS.get(("kd", "cuda"))
    registry.register("cuda", "kd", lambda *a: None, devices=("cuda",), dtypes=(torch.float32,))
    try:
        with pytest.raises(TypeError, match="float64 logits are supported by the cpu and torch backends, not 'cuda'"):
            registry.check_dtype("kd", "cuda", torch.float64)
    finally:
        if before is None:
            registry._IMPLS.pop(("kd", "cuda"))
        else:
            registry._IMPLS[("kd", "cuda")] = before


@pytest.fixture
def registry_snapshot():
    """Restores the registry's tables after a test that re-registers a backend."""
    saved = dict(registry._IMPLS), dict(registry._WHY_NOT), dict(registry._LOADED)
    yield
    for table, old in zip((registry._IMPLS, registry._WHY_NOT, registry._LOADED), saved):
        table.clear()
        table.update(old)


def test_auto_falls_back_to_triton_when_the_cuda_kernels_cannot_run(monkeypatch, registry_snapshot):
    """A build with nvcc whose kernels cannot run on this machine (a driver older than the CUDA
    runtime they were linked with, a GPU the build has no code for): the CUDA runtime is asked once
    at registration, nothing is registered, backend="auto" takes Triton and backend="cuda" names the
    runtime's reason, instead of every call raising."""
    pytest.importorskip("triton")
    from fastkd import _ext
    from fastkd._backends import cuda as cuda_backend

    registry.find("kd", "triton")  # the triton backend is loaded and registered for "cuda" tensors
    assert registry.find("kd", "triton", "cuda") is not None
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = []

    def old_driver(device):
        asked.append(device)
        return "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"

    for op in registry.OPS:
        registry._IMPLS.pop((op, "cuda"), None)
    cuda_backend.register(probe=old_driver)
    assert asked == [0]
    assert all(registry.find(op, "cuda") is None for op in registry.OPS)
    cuda = torch.device("cuda")
    assert registry.resolve("kd", "auto", cuda) == "triton"
    assert registry.resolve("capture_topk", "auto", cuda) == "triton"
    with pytest.raises(ValueError, match="cudaErrorInsufficientDriver"):
        registry.resolve("kd", "cuda", cuda)
    # a runtime that can run them: every op family registered, and auto picks them first
    cuda_backend.register(probe=lambda device: "")
    for op in ("kd", "kd_shard", "scale_rows", "capture_topk", "capture_sample", "sparse_kd"):
        assert registry.find(op, "cuda", "cuda") is not None
    assert "loss_only" in registry.find("kd", "cuda").caps
    assert registry.resolve("kd", "auto", cuda) == "cuda"


def test_the_cuda_runtime_probe_reports_the_runtime_error(cuda_emulation):
    """The probe compiled against the emulated runtime: '' when a kernel's module loads, else the
    runtime's error name and message; the caller's device is left as it was."""
    lib = cuda_emulation.lib
    lib.emu_set_device(0)
    assert lib.emu_kernels_unusable(1) == b""
    lib.emu_set_module_error(35)  # cudaErrorInsufficientDriver
    try:
        why = lib.emu_kernels_unusable(1).decode()
    finally:
        lib.emu_set_module_error(0)
    assert why.startswith("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    assert lib.emu_current_device() == 0
    if _ext_built_with_cuda():  # the real runtime on this machine: a reason when no GPU is usable
        from fastkd import _ext

        reason = _ext.C.kernels_unusable_cuda(device=0)
        assert (reason == "") == torch.cuda.is_available(), reason


def _ext_built_with_cuda() -> bool:
    from fastkd import _ext

    return _ext.has_cuda_kernels()


def test_a_new_backend_is_one_module_and_one_line(monkeypatch):
    """Register a backend the way the README says; resolve then offers it."""
    fake = type(sys)("fastkd_fake_backend")

    def my_kd(*args):
        raise AssertionError("not called here")

    def load():
        registry.register("demo", "kd", my_kd, devices=("cpu",), dtypes=(torch.float32,))

    fake.load = load
    monkeypatch.setitem(sys.modules, "fastkd_fake_backend", fake)
    monkeypatch.setitem(registry._BACKEND_INFO, "demo", registry.BackendInfo("fastkd_fake_backend", "nothing"))
    load()
    try:
        assert registry.resolve("kd", "demo", CPU) == "demo"
        assert "demo" in registry.available("kd", CPU)
        assert registry.resolve("kd", "auto", CPU) == "cpu"  # not in the auto order
        assert fastkd._settings.kd_settings(backend="demo").backend == "demo"
    finally:
        registry._IMPLS.pop(("kd", "demo"))


# ------------------------------------------------------------------------------------------------
# One set of setting rules: every entry point x every bad setting, same error, same message
# ------------------------------------------------------------------------------------------------
def _entry_points(tmp_path):
    z = torch.randn(3, 8)
    t = torch.randn(3, 8)
    y = torch.tensor([1, 2, 3])
    st = fastkd.capture(t, k=4)
    hs, ws = torch.randn(3, 5), torch.randn(8, 5)
    ht, wt = torch.randn(3, 6), torch.randn(8, 6)

    def trainer(**kw):
        pytest.importorskip("transformers")
        from fastkd.integrations.transformers import KDTrainer
        from transformers import TrainingArguments

        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
        return KDTrainer(model=torch.nn.Linear(2, 2), args=args, **kw)

    return {
        "kd_loss": lambda **kw: fastkd.kd_loss(z, t, y, **kw),
        "KDLoss": lambda **kw: fastkd.KDLoss(**kw)(z, t, y),
        "sparse_kd_loss": lambda **kw: fastkd.sparse_kd_loss(z, st, y, **kw),
        "fused_linear_kd_loss": lambda **kw: fastkd.fused_linear_kd_loss(hs, ws, ht, wt, y, **kw),
        "capture": lambda **kw: fastkd.capture(t, **kw),
        "TeacherCache": lambda **kw: fastkd.TeacherCache(tmp_path / "c", **kw),
        "trainer": trainer,
        # the fastkd.distributed entry points validate settings before touching the process group
        "distributed.kd_loss": lambda **kw: fastkd.distributed.kd_loss(z, t, y, **kw),
        "distributed.sparse_kd_loss": lambda **kw: fastkd.distributed.sparse_kd_loss(z, st, y, **kw),
        "distributed.capture": lambda **kw: fastkd.distributed.capture(t, **kw),
    }


_LOSSES = ("kd_loss", "KDLoss", "sparse_kd_loss", "fused_linear_kd_loss", "trainer", "distributed.kd_loss",
           "distributed.sparse_kd_loss")
_DENSE = ("kd_loss", "KDLoss", "fused_linear_kd_loss", "trainer", "distributed.kd_loss")
_CAPTURES = ("capture", "TeacherCache", "distributed.capture")
BAD_SETTINGS = [
    # (setting, value, exception, message, entry points that take the setting)
    ("temperature", 0.0, ValueError, "temperature must be > 0.0, got 0.0", _LOSSES + _CAPTURES),
    ("temperature", float("inf"), ValueError, "temperature must be finite", _LOSSES + _CAPTURES),
    ("temperature", float("nan"), ValueError, "temperature must not be NaN", _LOSSES + _CAPTURES),
    ("temperature", "2", TypeError, "temperature must be a real number, got str", _LOSSES + _CAPTURES),
    ("soft_weight", None, TypeError, "soft_weight must be a real number, got NoneType", _LOSSES),
    ("hard_weight", float("nan"), ValueError, "hard_weight must not be NaN", _LOSSES),
    ("beta", 1.5, ValueError, "beta must be <= 1.0, got 1.5", _DENSE),
    ("label_smoothing", -0.1, ValueError, "label_smoothing must be >= 0.0, got -0.1", _LOSSES),
    ("softcap", 0.0, ValueError, "softcap must be > 0.0, got 0.0", _DENSE),
    ("skew", -0.5, ValueError, "skew must be >= 0.0, got -0.5", _DENSE),
    ("skew", "0.1", TypeError, "skew must be a real number, got str", _DENSE),
    ("divergence", "kl", ValueError, "divergence must be one of ('forward_kl', 'reverse_kl', 'jsd', 'tvd', "
     "'skew_forward_kl', 'skew_reverse_kl'), got 'kl'", _LOSSES),
    ("reduction", "avg", ValueError, "reduction must be one of ('mean', 'sum', 'none'), got 'avg'",
     tuple(e for e in _LOSSES if e != "trainer")),
    ("ignore_index", 1.0, TypeError, "ignore_index must be an int, got float",
     tuple(e for e in _LOSSES if e != "trainer")),
    ("backend", "gpu", ValueError, "backend must be one of ('auto', 'cpu', 'cuda', 'triton', 'torch'), got 'gpu'",
     _LOSSES + ("capture", "distributed.capture")),
    ("tail", "none", ValueError, "tail must be one of ('bucket', 'renorm', 'sampled'), got 'none'",
     ("sparse_kd_loss", "fused_linear_kd_loss", "trainer", "distributed.sparse_kd_loss")),
    ("mode", "dense", ValueError, "mode must be one of ('topk', 'sample'), got 'dense'", _CAPTURES),
    ("k", 2.5, TypeError, "k must be an int, got float", _CAPTURES),
    ("num_samples", 0, ValueError, "num_samples must be >= 1, got 0", ("TeacherCache",)),
    ("sampling", "lhs", ValueError, "sampling must be one of ('iid', 'systematic'), got 'lhs'", ("TeacherCache",)),
    ("vocab_size", 0, ValueError, "vocab_size must be >= 1, got 0",
     tuple(e for e in _LOSSES if e != "trainer") + _CAPTURES),
]
_CASES = [(entry, setting, value, exc, msg) for setting, value, exc, msg, entries in BAD_SETTINGS
          for entry in entries]


@pytest.mark.parametrize("entry, setting, value, exc, msg", _CASES,
                         ids=[f"{c[0]}-{c[1]}={c[2]!r}" for c in _CASES])
def test_every_entry_point_rejects_a_bad_setting_the_same_way(tmp_path, entry, setting, value, exc, msg):
    call = _entry_points(tmp_path)[entry]
    extra = {}
    if setting in ("num_samples", "sampling") or (entry in _CAPTURES and setting in ("num_samples", "sampling")):
        extra = {"mode": "sample"}
    with pytest.raises(exc) as info:
        call(**extra, **{setting: value})
    assert str(info.value) == msg


def test_sampled_capture_settings_are_checked_in_sample_mode_everywhere(tmp_path):
    calls = _entry_points(tmp_path)
    for entry in ("capture", "distributed.capture"):
        with pytest.raises(ValueError) as info:
            calls[entry](mode="sample", num_samples=0)
        assert str(info.value) == "num_samples must be >= 1, got 0"
        with pytest.raises(ValueError) as info:
            calls[entry](mode="sample", sampling="lhs")
        assert str(info.value) == "sampling must be one of ('iid', 'systematic'), got 'lhs'"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-api"]:
        API_FILE.write_text(json.dumps(current_api(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {API_FILE}")
    else:
        print(__doc__)
