"""Ahead-of-time compilation of Triton kernels for real GPUs (sm_80, sm_90a), no GPU needed, for the
kernel tests: each job compiles one kernel at given argument types and constexprs and reports the
target, whether the streaming loads are 16-byte vectorized (ld.global.v4, or 16-byte cp.async where a
loop is pipelined through shared memory), the registers and the spill stack (cuobjdump of the cubin:
ptxas spills never show in the PTX, so "local_memory", ld.local in the PTX, only sees the code
generator's own local arrays) and the shared memory.

It runs in a subprocess without TRITON_INTERPRET: the interpreter's patches of triton.language
break the code generator in the same process.
"""
import json
import os
import subprocess
import sys

# the largest dynamic shared memory a block may opt into: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}

_AOT_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
import fastdino
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
jobs = json.loads(sys.stdin.read())
out = []
for module, kernel, types, constexprs, num_warps, capability in jobs:
    fn = getattr(importlib.import_module(module), kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty = types[name]
        if ty.endswith(":16"):  # the divisibility by 16 the JIT infers for aligned pointers/strides
            ty = ty[:-3]
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[name] = ty
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = num_warps if isinstance(num_warps, dict) else {"num_warps": num_warps}
    c = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = c.asm["ptx"]
    target = [line.split()[1] for line in ptx.splitlines() if line.startswith(".target")][0]
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    out.append({"kernel": kernel, "target": target,
                "vector_loads": re.search(r"ld\.global[\w:.]*\.v4|cp\.async\.c[ag]\.shared\.global[^;]*0x10",
                                          ptx) is not None,
                "local_memory": "ld.local" in ptx, "shared": c.metadata.shared,
                "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                "stack": int(re.search(r"STACK:(\d+)", usage).group(1))})
print(json.dumps(out))
"""

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def aot_compile(jobs, processes: int = 2):
    """Compile [(module, kernel, types, constexprs, num_warps or options dict, capability)] for real
    GPUs, `processes` compiler subprocesses side by side; returns, per job in order: target,
    vector_loads (16-byte loads, cache hints allowed), local_memory (ld.local in the PTX), registers,
    stack (the ptxas spill stack, bytes), shared (bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    def run(part):
        if not part:
            return []
        proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, ROOT], input=json.dumps(part), env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    parts = [jobs[i::processes] for i in range(processes)]
    with ThreadPoolExecutor(processes) as pool:
        results = list(pool.map(run, parts))
    out = [None] * len(jobs)
    for i, part in enumerate(results):
        out[i::processes] = part
    return out


def assert_compiled(jobs, results, vector_loads: bool = True) -> None:
    """Every job compiled for sm_80 and sm_90a without spilling (no local memory in the PTX, a ptxas
    stack frame of 0), within the target's shared memory and (the streaming kernels) with 16-byte
    vectorized loads."""
    assert {r["target"] for r in results} == {"sm_80", "sm_90a"}
    for job, r in zip(jobs, results):
        what = f"{r['kernel']} ({r['target']}, {job[2]}, {job[3]}, num_warps={job[4]})"
        assert not r["local_memory"], f"{what} spills to local memory"
        assert r["stack"] == 0, f"{what} spills: {r['stack']} B of stack at {r['registers']} registers"
        assert r["shared"] <= SMEM_LIMIT[r["target"]], f"{what}: {r['shared']} B of shared memory"
        assert r["vector_loads"] or not vector_loads, f"{what}: loads are not 16-byte vectorized"


def load_benchmark(name: str = "loss"):
    """benchmarks/<name>.py as a module (a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def load_loss_benchmark():
    return load_benchmark("loss")


def smoke_rows(name: str, results_file) -> list[dict]:
    """A single-op benchmark (benchmarks/kernel_bench.py) run with --smoke: its rows, checked to be the
    ones appended to results_file, with every field and both variants."""
    rows = load_benchmark(name).main(["--smoke", "--results", str(results_file)])
    written = [json.loads(line) for line in open(results_file).read().splitlines()]
    assert written == rows and {r["variant"] for r in rows} == {"torch", "triton"}
    for key in ("date", "device", "torch", "triton", "command", "config", "metric", "value", "baseline"):
        assert all(key in r for r in rows), key
    return rows
