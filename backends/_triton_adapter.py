"""Every use of Triton's private or version-specific details, in one place (a Triton upgrade
touches this file only): the interpreter switch, loading generated modules in a chosen mode,
counting the interpreter's memory traffic, and ahead-of-time compilation for a GPU we do not have.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from typing import Any, Iterator

import triton


def interpreting() -> bool:
    """Whether ``@triton.jit`` produces interpreted functions. The mode is process-wide in
    practice: Triton's own library functions are decorated when ``triton`` is first imported, so
    TRITON_INTERPRET=1 must be set before the process imports it."""
    return bool(triton.knobs.runtime.interpret)


def load_module(path: str, name: str) -> types.ModuleType:
    """Import a generated kernel file (``@triton.jit`` decorates in the process's mode)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource (used by triton.jit) looks modules up here
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def count_traffic() -> Iterator[dict[str, int]]:
    """Count bytes loaded, stored and atomically updated by unmasked lanes of interpreted kernels
    in this block (``read``, ``written``, ``atomic``)."""
    from triton.runtime.interpreter import InterpreterBuilder

    counts = {"read": 0, "written": 0, "atomic": 0}
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    rmw = InterpreterBuilder.create_atomic_rmw

    def lanes_bytes(ptrs, mask) -> int:
        return int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8

    def counted_load(self, ptrs, mask, other, *args):
        counts["read"] += lanes_bytes(ptrs, mask)
        return load(self, ptrs, mask, other, *args)

    def counted_store(self, ptrs, value, mask, *args):
        counts["written"] += lanes_bytes(ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    def counted_rmw(self, op, ptrs, value, mask, *args):
        counts["atomic"] += lanes_bytes(ptrs, mask)
        return rmw(self, op, ptrs, value, mask, *args)

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = counted_load, counted_store
    InterpreterBuilder.create_atomic_rmw = counted_rmw
    try:
        yield counts
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
        InterpreterBuilder.create_atomic_rmw = rmw


def jit_function(kernel: Any) -> Any:
    """The compilable ``JITFunction`` behind a kernel, also when it was decorated for the interpreter."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_for_gpu(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compile generated kernels ahead of time for a GPU (none needed) and report each one's
    resources: registers per thread, spilled bytes (local stack), shared memory.

    A job: ``path``, ``name`` (the kernel function), ``signature``, ``constexprs``, ``num_warps``,
    ``arch``. Under the interpreter Triton's language functions are replaced by interpreted ones,
    so the compiles run in a child process without TRITON_INTERPRET (one per batch of jobs).
    """
    if not interpreting():
        return [_compile_one(**job) for job in jobs]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "lowbit_compiler.backends._triton_adapter"], input=json.dumps(jobs),
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile for the GPU failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compile_one(path: str, name: str, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                 arch: int = 90) -> dict[str, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's default-change warning
    fn = jit_function(getattr(load_module(path, f"lowbit_kernels_aot.{name}"), name))
    src = ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    report = {"arch": f"sm_{arch}", "num_warps": num_warps, "shared_bytes": compiled.metadata.shared,
              # the PTX conversion instructions (rounding modes: what a GPU's bf16/fp8 narrowing does)
              "conversions": sorted(set(re.findall(r"\bcvt(?:\.[a-z0-9]+)+", compiled.asm["ptx"])))}
    report.update(_cubin_resources(compiled.asm["cubin"], fn.__name__))
    return report


def _cubin_resources(cubin: bytes, name: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of one function, from ``cuobjdump --dump-resource-usage``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields: dict[str, int] = {}
    for line in out.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    fields[key] = int(value)
    # Triton kernels make no calls: their stack frame is register spills
    return {"registers": fields.get("REG", -1), "spill_bytes": fields.get("STACK", 0) + fields.get("LOCAL", 0),
            "static_shared_bytes": fields.get("SHARED", 0)}


if __name__ == "__main__":  # the child process of compile_for_gpu
    print(json.dumps([_compile_one(**job) for job in json.loads(sys.stdin.read())]))
