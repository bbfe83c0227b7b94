"""Background compiles of the generated CPU kernels (``cpu_codegen.prebuild``): the libraries a CPU
compile will load are compiled side by side as a graph arrives, and the ``build`` call that needs
one waits for its compile instead of starting another."""
from __future__ import annotations

import ctypes
import inspect
import logging
import subprocess
import threading

import pytest
import torch

from lowbit_compiler.backends import (cpu_attention, cpu_codegen, cpu_dispatch, cpu_kernels, cpu_quantize,
                                      cpu_rope)
from tests.conftest import make_model, prompt

pytestmark = pytest.mark.skipif(cpu_codegen._compiler() is None, reason="no C compiler")

SOURCE = "#include <stdint.h>\nvoid {name}(int64_t* out) {{ *out = {value}; }}\n"


def _spec(name: str, value: int) -> dict:
    return {"name": name, "text": SOURCE.format(name=name, value=value), "extra_flags": ("-O0",)}


def _join_background() -> None:
    for t in threading.enumerate():
        if t.name.startswith("lowbit-build-"):
            t.join(120)


@pytest.fixture
def compiles(tmp_path, monkeypatch):
    """A fresh kernel cache; the compiler runs recorded as (library name, thread name)."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    runs = []
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd and cmd[0] == cpu_codegen._compiler():
            runs.append((open(cmd[-3]).read().split("void ")[1].split("(")[0] if "-o" in cmd else "?",
                         threading.current_thread().name))
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    yield runs
    _join_background()


def _call(fn) -> int:
    out = ctypes.c_int64(0)
    fn(ctypes.byref(out))
    return out.value


def test_a_prebuilt_library_is_compiled_once_in_the_background_and_loaded_by_build(compiles):
    spec = _spec("lowbit_test_prebuild_a", 42)
    assert cpu_codegen.prebuild([spec]) == ["lowbit_test_prebuild_a"]
    _join_background()
    assert compiles == [("lowbit_test_prebuild_a", "lowbit-build-lowbit_test_prebuild_a")]
    assert cpu_codegen.spec_path(spec).exists()
    fn = cpu_codegen.build(argtypes=[ctypes.c_void_p], **spec)
    assert _call(fn) == 42 and len(compiles) == 1  # loaded from the disk cache, not compiled again
    assert cpu_codegen.prebuild([spec]) == []  # nothing left to do


def test_build_waits_for_a_prebuild_in_flight_instead_of_compiling_again(compiles):
    specs = [_spec(f"lowbit_test_prebuild_b{i}", 100 + i) for i in range(4)]
    assert len(cpu_codegen.prebuild(specs)) == 4
    assert cpu_codegen.prebuild(specs) == []  # queued or compiling: not started twice
    fns = [cpu_codegen.build(argtypes=[ctypes.c_void_p], **spec) for spec in specs]  # while they compile
    assert [_call(fn) for fn in fns] == [100, 101, 102, 103]
    _join_background()
    assert sorted(name for name, _ in compiles) == [s["name"] for s in specs]  # each library compiled once


def test_a_failed_prebuild_changes_nothing_and_the_build_reports_it(compiles, monkeypatch, caplog):
    monkeypatch.setattr(cpu_codegen, "_disabled_reason", [])
    bad = {"name": "lowbit_test_prebuild_bad", "text": "void lowbit_test_prebuild_bad( {"}
    failed = cpu_codegen.prebuilds["failed"]
    assert cpu_codegen.prebuild([bad]) == ["lowbit_test_prebuild_bad"]
    _join_background()
    assert cpu_codegen.prebuilds["failed"] == failed + 1 and not cpu_codegen.spec_path(bad).exists()
    assert cpu_codegen._disabled_reason == []  # the background thread reports nothing itself
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        assert cpu_codegen.build(argtypes=[], fallback="the test's fallback", **bad) is None
    assert any("compiling lowbit_test_prebuild_bad" in r.getMessage() and "the test's fallback" in r.getMessage()
               for r in caplog.records)


def test_no_prebuild_with_the_generated_kernels_turned_off(compiles, monkeypatch):
    monkeypatch.setenv(cpu_codegen.ENV, "0")
    assert cpu_codegen.prebuild([_spec("lowbit_test_prebuild_off", 1)]) == [] and compiles == []


def test_the_prebuild_covers_every_library_a_cpu_compile_loads(monkeypatch):
    """The specs name the same libraries (source and flags) the kernels' own build calls load: a
    compile + decode step of a w4a16 Llama loads nothing the prebuild did not name."""
    loaded = set()
    real = cpu_codegen.build
    signature = inspect.signature(real)

    def build(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        loaded.add(cpu_codegen.spec_path({k: a[k] for k in ("name", "text", "isa", "portable", "flags",
                                                             "extra_flags")}))
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_codegen, "build", build)
    for getter in (cpu_codegen._build, cpu_codegen._build_multi, cpu_codegen._build_ext, cpu_quantize._build,
                   cpu_quantize._build_dequantize, cpu_quantize._build_unpack, cpu_quantize._build_int4pack,
                   cpu_dispatch._dequant_build, cpu_dispatch._gemm_build, cpu_dispatch._flush_fn, cpu_rope._build,
                   cpu_attention._build):
        getter.cache_clear()  # earlier tests in this process loaded them: load again, through build()
    model = make_model("llama")
    compiled = torch.compile(model, backend="lowbit", options={"recipe": "w4a16", "target": "cpu"})
    with torch.no_grad():
        out = compiled(prompt(9), use_cache=True)
        compiled(prompt(1, seed=2), past_key_values=out.past_key_values, use_cache=True)
    named = {cpu_codegen.spec_path(s) for s in cpu_kernels.prebuild_specs(["int4_g128_asym"])}
    assert loaded and loaded <= named, sorted(p.name for p in loaded - named)
    kinds = {p.name.rsplit("_", 1)[0] for p in loaded}
    assert {"lowbit_quantize_rtn", "lowbit_cpu_int4_g128_asym", "lowbit_attn_decode"} <= kinds, kinds
