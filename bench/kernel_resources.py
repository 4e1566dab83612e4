#!/usr/bin/env python3
"""Resources of every CUDA kernel of fastkd, from the compiled code (no GPU needed).

For each kernel of ``csrc/cuda/*.cu``, compiled by nvcc for one architecture (default sm_90) with
the build's flags: registers per thread, spill stores/loads, static shared memory (ptxas), and, from
the SASS (``cuobjdump -sass``), the instructions of the longest loop body, the global loads and the
bytes one thread keeps in flight in each loop: the loads issued in a loop body before the first
instruction that uses any of their results.
That number times the resident threads is what hides memory latency: an H100/H200 needs roughly
25-30 KB in flight per SM to approach its bandwidth.

    python bench/kernel_resources.py                 # every kernel, a table
    python bench/kernel_resources.py --arch 80 --json out.json
    python bench/kernel_resources.py --check         # exit 1 when a kernel spills (used by the tests)

Needs nvcc and cuobjdump (CUDA toolkit); no GPU, no torch.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("kd", "capture", "sparse_kd")
# ptxas -v: "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, ..." after a
# "Compiling entry function '_Z...'" line; spills are on their own line.
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "U8": 1, "S16": 2, "S8": 1}


def _compile(src: Path, arch: str, out: Path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found: this needs the CUDA toolkit")
    cubin = out / f"{src.stem}.cubin"
    cmd = [nvcc, "-O3", "-std=c++17", "-lineinfo", f"-I{ROOT / 'csrc'}", f"-arch=sm_{arch}", "--cubin",
           "-Xptxas", "-v", "-o", str(cubin), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"nvcc failed on {src}:\n{r.stderr[-4000:]}")
    return cubin, r.stderr


def _ptxas_info(log: str):
    kernels, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels[current] = dict(registers=None, smem=0, stack=0, spill_stores=0, spill_loads=0)
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
            m = _SMEM.search(line)
            kernels[current]["smem"] = int(m.group(1)) if m else 0
    return kernels


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, r.stdout.splitlines()))


def _cuobjdump() -> str:
    """cuobjdump from $CUOBJDUMP, PATH, next to nvcc, or the copy Triton ships."""
    for cand in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")):
        if cand:
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        sibling = Path(os.path.realpath(nvcc)).parent / "cuobjdump"
        if sibling.exists():
            return str(sibling)
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    raise SystemExit("cuobjdump not found (set CUOBJDUMP, or install the CUDA toolkit or triton)")


def _sass_functions(cubin: Path):
    r = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cuobjdump failed: {r.stderr[-2000:]}")
    funcs, name, body = {}, None, []
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                funcs[name] = body
            name, body = m.group(1), []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and name:
            body.append((int(m.group(1), 16), m.group(2).strip()))
    if name:
        funcs[name] = body
    return funcs


def _res_usage(cubin: Path):
    """{function: (registers, local bytes, shared bytes)} from ``cuobjdump -res-usage``."""
    r = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True)
    out, name = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out[name] = (int(m.group(1)), int(m.group(4)), int(m.group(3)))
    return out


def _regs(text: str):
    return set(re.findall(r"\bR(\d+)\b", text))


def _loops(body):
    """The loops of a function that load from global memory, each counted without the loops nested
    in it: its instructions per iteration (static: every path of its body), the bytes of global
    loads (LDG) one thread starts per iteration, and the bytes it keeps in flight: the loads started
    before the first instruction that reads a register one of them writes."""
    addr = {a: i for i, (a, _) in enumerate(body)}
    spans = []
    for i, (a, ins) in enumerate(body):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in addr:  # a backward branch: a loop
            spans.append((addr[int(m.group(1), 16)], i))
    out = []
    for s, e in spans:
        nested = [(s2, e2) for s2, e2 in spans if s <= s2 and e2 <= e and (s2, e2) != (s, e)]
        own = [body[i] for i in range(s, e + 1) if not any(s2 <= i <= e2 for s2, e2 in nested)]
        loaded, inflight, pending, stopped = 0, 0, set(), False
        for _, op in own:
            text = re.sub(r"^@!?U?P\w+\s+", "", op)
            mnemonic, _, operands = text.partition(" ")
            parts = operands.split(",")
            # the first operand is the destination, except for stores, reductions and atomics
            reads = _regs(operands) if mnemonic.startswith(("ST", "RED", "ATOM")) else _regs(",".join(parts[1:]))
            if mnemonic.startswith("LDG"):
                width = next((b for k, b in _LOAD_BYTES.items() if f".{k}" in mnemonic), 4)
                loaded += width
                if not stopped and reads & pending:
                    stopped = True  # an address computed from an earlier load: a dependent chain
                if not stopped:
                    inflight += width
                    m_dst = re.search(r"\bR(\d+)\b", parts[0])
                    if m_dst:
                        pending |= {str(int(m_dst.group(1)) + j) for j in range(max(1, width // 4))}
            elif reads & pending:
                stopped = True
        if loaded:
            out.append(dict(start=body[s][0], instructions=len(own), load_bytes=loaded, vector_loads=sum(
                1 for _, op in own if re.search(r"\bLDG\S*\.128", op)), bytes_in_flight=inflight,
                nested=[body[s2][0] for s2, _ in nested]))
    return out


def _summary(body):
    """(bytes in flight per thread: the max over the loops; the first streaming loop: the first loop
    in code order that makes 16-byte loads itself and holds no inner loop that does, i.e. the
    row's first pass, with its instructions per 16 bytes loaded; every loading loop)."""
    loops = _loops(body)
    if not loops:
        return 0, None, loops
    vector_starts = {r["start"] for r in loops if r["vector_loads"]}
    streaming = [r for r in loops if r["vector_loads"] and not vector_starts & set(r["nested"])]
    first = min(streaming or loops, key=lambda r: r["start"])
    first = dict(first, instructions_per_16B=round(16 * first["instructions"] / first["load_bytes"], 1))
    return max(r["bytes_in_flight"] for r in loops), first, loops


# The Triton kd kernel: every autotune config, built by triton.compile for `arch` as a launch on
# rows with (aligned) and without (V = 50257) 16-divisible sizes and strides would build it.
_TRITON_SIG = {"z_ptr": "*{dt}", "t_ptr": "*{dt}", "y_ptr": "*i64", "div_ptr": "*fp32", "loss_ptr": "*fp32",
               "gz_ptr": "*{dt}", "gt_ptr": "*{dt}", "V": "i32", "stride_z": "i32", "stride_t": "i32",
               "stride_gz": "i32", "stride_gt": "i32", "stride_y": "i32", "inv_t": "fp32", "soft_scale": "fp32",
               "soft": "fp32", "hard": "fp32", "eps": "fp32", "eps_over_v": "fp32", "w": "fp32",
               "log_w": "fp32", "log_w1": "fp32", "cap": "fp32", "inv_cap": "fp32", "ignore_index": "i64"}


def triton_kd_configs(arch: str = "90", dtype: str = "bf16", vocab: int = 128256, divergence: int = 0,
                      teacher_grad: bool = False, softcap: bool = False):
    """One row per autotune config of the Triton kd kernel (``divergence`` 0-5, the codes of
    ``fastkd._settings.DIVERGENCE_CODES``, + hard CE, τ != 1,
    the student's gradient and, with ``teacher_grad``, the teacher's; ``softcap``): registers, spills, shared memory, a hash of the cubin (equal hashes: the same code),
    the 16-byte loads in the PTX, and the bytes in flight per thread and per SM (threads resident by
    the register limit)."""
    import hashlib

    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    from fastkd._backends.triton import kd as K

    fn = K._kd_rows_kernel.fn if hasattr(K._kd_rows_kernel, "fn") else K._kd_rows_kernel
    names = fn.arg_names
    sig = {k: v.format(dt=dtype) for k, v in _TRITON_SIG.items()}
    aligned = vocab % 16 == 0
    # what the launcher's specialisation gives: pointers 16-byte aligned; V and the row strides only
    # when they are multiples of 16
    div16 = [["tt.divisibility", 16]]
    attrs = {(names.index(k),): div16 for k in ("z_ptr", "t_ptr", "y_ptr", "div_ptr", "loss_ptr", "gz_ptr", "gt_ptr")}
    if aligned:
        attrs.update({(names.index(k),): div16 for k in ("V", "stride_z", "stride_t", "stride_gz", "stride_gt")})
    consts = dict(DIV=divergence, USE_HARD=True, TAU_ONE=False, NEED_SUM=False, HAS_CAP=softcap,
                  TEACHER_GRAD=teacher_grad)
    if "WRITE_GRAD" in names:
        consts["WRITE_GRAD"] = True
    if "VEC" in names:
        consts["VEC"] = 8 if dtype in ("bf16", "fp16") else 4
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    configs = K._configs()
    if hasattr(K, "_prune"):  # the candidates the autotuner keeps for this element size
        configs = K._prune(configs, {"z_ptr": torch.empty(0, dtype=torch_dtype)}, HAS_CAP=softcap, DIV=divergence,
                           TEACHER_GRAD=teacher_grad)
    target = GPUTarget("cuda", int(arch), 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            full_sig = dict(sig, **{k: "constexpr" for k in list(consts) + list(cfg.kwargs)})
            src = ASTSource(fn=fn, signature=full_sig, constexprs=dict(consts, **cfg.kwargs), attrs=attrs)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if getattr(cfg, "maxnreg", None):
                opts["maxnreg"] = cfg.maxnreg
            c = triton.compile(src, target=target, options=opts)
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(c.asm["cubin"])
            body = next(iter(_sass_functions(cubin).values()))
            inflight, hot, _ = _summary(body)
            threads = 32 * cfg.num_warps
            regs, local, _ = next(iter(_res_usage(cubin).values()))
            spills = sum(1 for _, ins in body if re.match(r"(?:@!?P\w+\s+)?(?:STL|LDL)\b", ins))
            per_sm = min(2048 // threads, 65536 // max(1, regs * threads), 32)
            ptx = c.asm["ptx"]
            cap = f" maxnreg={cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else ""
            rows.append(dict(config=f"BLOCK={cfg.kwargs['BLOCK']} warps={cfg.num_warps} stages={cfg.num_stages}{cap}",
                             registers=regs, spill_instructions=spills, local_bytes=local, smem=c.metadata.shared,
                             cubin=hashlib.sha1(c.asm["cubin"]).hexdigest()[:10],
                             v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                             v2_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v2", ptx)),
                             scalar_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b16|u16|b32|f32)\b", ptx)),
                             bytes_in_flight_per_thread=inflight, blocks_per_sm=per_sm,
                             bytes_in_flight_per_sm=inflight * threads * per_sm, hot_loop=hot))
    return rows


def analyse(arch: str = "90"):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # nvcc builds one file on one core: the files are built side by side.
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            built = list(pool.map(lambda stem: _compile(ROOT / "csrc" / "cuda" / f"{stem}.cu", arch, Path(tmp)),
                                  SOURCES))
        for stem, (cubin, log) in zip(SOURCES, built):
            info = _ptxas_info(log)
            sass = _sass_functions(cubin)
            names = _demangle(sorted(info))
            for mangled, res in sorted(info.items()):
                body = sass.get(mangled, [])
                inflight, hot, loops = _summary(body)
                rows.append(dict(file=f"csrc/cuda/{stem}.cu", kernel=names[mangled], arch=f"sm_{arch}",
                                 instructions=len(body), bytes_in_flight_per_thread=inflight, hot_loop=hot,
                                 load_loops=loops, **res))
    return rows


def _short(name: str, width: int) -> str:
    name = re.sub(r"\(anonymous namespace\)::|fastkd::", "", name)
    name = name.split("(")[0] if "(" in name else name
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="SM architecture number (default 90)")
    ap.add_argument("--json", default=None, help="write the rows as JSON to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 if any kernel spills registers")
    ap.add_argument("--triton", action="store_true",
                    help="also the Triton kd kernel's autotune configs (bf16 and fp32, V = 128256 and 50257, "
                         "with and without softcap)")
    args = ap.parse_args(argv)
    rows = analyse(args.arch)
    print(f"{'kernel':44s} {'regs':>4s} {'smem':>6s} {'spill st/ld':>11s} {'instr':>6s} "
          f"{'pass-1 loop':>11s} {'B/iter':>6s} {'instr/16B':>9s} {'in flight':>9s}")
    for r in rows:
        hot = r["hot_loop"] or dict(instructions=0, load_bytes=0, instructions_per_16B=0)
        print(f"{_short(r['kernel'], 44):44s} {r['registers']:>4} {r['smem']:>6} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['instructions']:>6} {hot['instructions']:>11} "
              f"{hot['load_bytes']:>6} {hot['instructions_per_16B']:>9} {r['bytes_in_flight_per_thread']:>7} B")
    spilling = [r["kernel"] for r in rows if r["spill_stores"] or r["spill_loads"]]
    out = dict(cuda=rows)
    if args.triton:
        out["triton"] = []
        print(f"\nTriton kd kernel (sm_{args.arch}; forward KL + hard CE and JSD with the teacher's gradient, "
              "each without and with softcap)")
        print(f"{'case':36s} {'config':36s} {'regs':>4s} {'spills':>6s} {'16B loads':>9s} {'in flight/SM':>12s}")
        for dtype in ("bf16", "fp32"):
            for vocab in (128256, 50257):
                for (div, tg), cap in itertools.product(((0, False), (2, True)), (False, True)):
                    case = f"{dtype} V={vocab} {'jsd+teacher' if div else 'fwd-kl'}{'+softcap' if cap else ''}"
                    for r in triton_kd_configs(args.arch, dtype, vocab, div, tg, cap):
                        out["triton"].append(dict(r, case=case))
                        print(f"{case:36s} {r['config']:36s} {r['registers']:>4} {r['spill_instructions']:>6} "
                              f"{r['v4_loads']:>9} {r['bytes_in_flight_per_sm'] / 1024:>9.1f} KB")
                        if r["spill_instructions"]:
                            spilling.append(f"triton kd {case} {r['config']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if spilling:
        print("\nkernels that spill:", ", ".join(spilling), file=sys.stderr)
    return 1 if (args.check and spilling) else 0


if __name__ == "__main__":
    sys.exit(main())
