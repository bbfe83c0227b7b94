"""Background compiles of the generated CPU kernels (``cpu_codegen.prebuild``): the libraries a CPU
compile will load are compiled side by side as a graph arrives, and the ``build`` call that needs
one waits for its compile instead of starting another."""
from __future__ import annotations

import ctypes
import inspect
import logging
import os
import signal
import threading
import time

import pytest
import torch

import lowbit_compiler
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
    """A fresh kernel cache; the compiles from here on, as (library name, thread name)."""
    _join_background()  # (compiles an earlier test left running)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    start = len(cpu_codegen.compile_log)

    class Since(list):
        def __eq__(self, other):
            return [(lib.rsplit("_", 1)[0], thread) for lib, thread in list(cpu_codegen.compile_log)[start:]] == other

        def names(self):
            return sorted(lib.rsplit("_", 1)[0] for lib, _ in list(cpu_codegen.compile_log)[start:])

    yield Since()
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
    assert _call(fn) == 42  # loaded from the disk cache, not compiled again:
    assert compiles == [("lowbit_test_prebuild_a", "lowbit-build-lowbit_test_prebuild_a")]
    assert cpu_codegen.prebuild([spec]) == []  # nothing left to do


def test_build_waits_for_a_prebuild_in_flight_instead_of_compiling_again(compiles):
    specs = [_spec(f"lowbit_test_prebuild_b{i}", 100 + i) for i in range(4)]
    assert len(cpu_codegen.prebuild(specs)) == 4
    assert cpu_codegen.prebuild(specs) == []  # queued or compiling: not started twice
    fns = [cpu_codegen.build(argtypes=[ctypes.c_void_p], **spec) for spec in specs]  # while they compile
    assert [_call(fn) for fn in fns] == [100, 101, 102, 103]
    _join_background()
    assert compiles.names() == [s["name"] for s in specs]  # each library compiled once


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


def test_a_forked_child_builds_while_the_parent_compiles(compiles):
    """A child forked while a prebuild thread holds a library's lock does not inherit it held."""
    spec = _spec("lowbit_test_prebuild_fork", 7)
    assert cpu_codegen.prebuild([spec]) == ["lowbit_test_prebuild_fork"]
    pid = os.fork()
    if pid == 0:  # the child: build() must not wait for the parent's thread (it does not exist here)
        try:
            fn = cpu_codegen.build(argtypes=[ctypes.c_void_p], **spec)
            os._exit(0 if fn is not None and _call(fn) == 7 else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's build() hung on the parent's compile lock")
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("flow", ["compile", "compress"])
def test_both_flows_start_the_prebuild_with_the_recipes_format(flow, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "prebuild", lambda formats, attention=True: calls.append((formats, attention)))
    model = make_model("llama")
    if flow == "compile":
        with torch.no_grad():
            torch.compile(model, backend="lowbit", options={"recipe": "w4a16", "target": "cpu"})(prompt(5))
        assert calls and calls[0] == (["int4_g128_asym"], True)  # the graph has attention
    else:
        lowbit_compiler.compress(model, "w8a16")
        assert calls[0] == (["int8"], False)  # eager: the model's own attention


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
    _join_background()
