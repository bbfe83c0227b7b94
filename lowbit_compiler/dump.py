"""Dumps: what happened to each compiled graph, readable by people and by ``lowbit inspect``.

Layout: one folder per run (one ``torch.compile(...)`` call, or one ``compress``), one folder per
compiled graph inside it::

    <dump_dir>/run_<NNN>-<recipe>/
        run.json                 the run: recipe, options, process id, start time, command line
        graph_<NNN>/
            00_captured.py           the IR right after capture (parameters as FQN get_attrs)
            01_canonicalize.py       the graph after each pass, as readable code ...
            01_canonicalize.diff     ... with a unified diff to the stage before
            01_canonicalize.json     ... and its nodes as data (``graph_record``: op, target, inputs,
                                     module, shape, source line, node.meta["lowbit"]) for
                                     ``lowbit report``; dumps without these still read
            ..
            NN_lowered.py/.diff      the graph that runs (each lowbit op bound to its kernel)
            summary.json             recipe, pass times and match counts, per-layer decisions,
                                     fallbacks, the implementation of every lowbit op; for a compile
                                     that failed, the error (``"error"``) and the stage it failed in
            kernels/                 generated kernels: Triton ``<name>.py``, CPU C ``<name>.c``

Two runs into one ``dump_dir`` (two processes, or two ``torch.compile`` calls) never share a
folder: each takes the next free ``run_<NNN>``. The directory comes from
``options={"dump_dir": ...}`` or the ``LOWBIT_DUMP_DIR`` environment variable.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import itertools
import json
import math
import os
import re
import sys
import traceback
from typing import Any

import torch.fx as fx

ENV_VAR = "LOWBIT_DUMP_DIR"
_RUN = re.compile(r"^run_(\d+)")


def resolve_dump_dir(option: str | os.PathLike | None) -> str | None:
    value = option if option is not None else os.environ.get(ENV_VAR)
    return os.fspath(value) if value else None


def graph_code(gm: fx.GraphModule) -> str:
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    return re.sub(r" +$", "", code, flags=re.M)


def _plain(value: Any) -> Any:
    """A node.meta["lowbit"] spec (frozen dataclasses, WeightFormat, tuples) as JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    return f"{module}.{name}" if module and not module.startswith("torch._ops") else str(target)


def _source_line(node: fx.Node) -> str | None:
    """The user's source line that produced ``node`` (Dynamo's stack trace, innermost frame)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            where = re.sub(r"File \"[^\"]*?(site-packages/|/work/[^/]+/)", "File \"", lines[i])
            return f"{where}: {code}" if code else where
    return lines[-1]


def _shape(node: fx.Node) -> str | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return f"{str(getattr(value, 'dtype', '')).replace('torch.', '')}[{', '.join(str(d) for d in shape)}]"


def graph_record(gm: fx.GraphModule) -> dict[str, Any]:
    """One stage's nodes as data, for ``lowbit report`` (the picture of the graph, what each pass
    added or changed, and what it decided per node)::

        {"nodes": [{"name", "op", "target", "inputs": [node names], "module": FQN | None,
                    "shape": "float32[1, 9, 256]" | None, "source": "File ..., line N, in forward: code",
                    "lowbit": {key: spec as data}}]}
    """
    from lowbit_compiler import ir

    nodes = []
    for node in gm.graph.nodes:
        module = ir.get(node, ir.MODULE)
        param = ir.get(node, ir.PARAM) if node.op == "get_attr" else None
        record = {"name": node.name, "op": node.op, "target": _target(node),
                  "inputs": [n.name for n in node.all_input_nodes],
                  "module": module.fqn if module is not None else (param.fqn if param is not None else None)}
        for key, value in (("shape", _shape(node)), ("source", _source_line(node))):
            if value:
                record[key] = value
        meta = node.meta.get(ir.META) or {}
        if meta:
            record["lowbit"] = {key: _plain(spec) for key, spec in meta.items()}
        nodes.append(record)
    return {"nodes": nodes}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)[:40] or "run"


class DumpRun:
    """One run's folder, ``<root>/run_<NNN>-<label>/``, created on the first graph (a run that
    compiles nothing leaves nothing behind); ``graph()`` hands out its graphs' writers in order."""

    def __init__(self, root: str | None, label: str = "run", info: dict[str, Any] | None = None):
        self.root, self.label, self.info = root, _slug(label), dict(info or {})
        self.dir: str | None = None
        self._graphs = itertools.count()
        self.graphs = 0  # graphs handed out so far (also without a dump)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _create(self) -> str:
        os.makedirs(self.root, exist_ok=True)
        taken = [int(m.group(1)) for name in os.listdir(self.root) if (m := _RUN.match(name))]
        number = max(taken, default=-1) + 1
        while True:  # never reuse another process's (or an earlier run's) folder
            candidate = os.path.join(self.root, f"run_{number:03d}-{self.label}")
            try:
                os.makedirs(candidate)
                break
            except FileExistsError:
                number += 1
        record = {"run": os.path.basename(candidate), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "argv": list(sys.argv), **self.info}
        with open(os.path.join(candidate, "run.json"), "w") as f:
            json.dump(record, f, indent=2, default=str)
        return candidate

    def graph(self, prefix: str = "graph") -> "DumpWriter":
        self.graphs += 1
        if self.root is None:
            return DumpWriter(None)
        if self.dir is None:
            self.dir = self._create()
        return DumpWriter(os.path.join(self.dir, f"{prefix}_{next(self._graphs):03d}"))


class DumpWriter:
    """Writes the stages of one graph into ``directory`` (created); a no-op when it is None."""

    def __init__(self, directory: str | None):
        self.dir = directory
        self._stage = 0
        self._previous: str | None = None
        self._previous_name = ""
        self.last_stage = "capture"  # the stage being worked on (what a failure reports)
        if directory is not None:
            os.makedirs(directory)

    @property
    def name(self) -> str:
        """``run_<NNN>-<label>/graph_<NNN>``: the graph and the run it belongs to."""
        if not self.dir:
            return ""
        parent = os.path.dirname(self.dir)
        return f"{os.path.basename(parent)}/{os.path.basename(self.dir)}"

    def stage(self, name: str, gm: fx.GraphModule) -> None:
        self.last_stage = name
        if self.dir is None:
            return
        code = graph_code(gm)
        stem = f"{self._stage:02d}_{name}"
        with open(os.path.join(self.dir, stem + ".py"), "w") as f:
            f.write(code)
        if self._previous is not None:
            diff = difflib.unified_diff(self._previous.splitlines(keepends=True), code.splitlines(keepends=True),
                                        fromfile=self._previous_name + ".py", tofile=stem + ".py")
            with open(os.path.join(self.dir, stem + ".diff"), "w") as f:
                f.writelines(diff)
        with open(os.path.join(self.dir, stem + ".json"), "w") as f:
            json.dump(graph_record(gm), f, separators=(",", ":"), default=str)
        self._previous, self._previous_name = code, stem
        self._stage += 1

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def kernel(self, name: str, source: str, ext: str = "py") -> None:
        """A generated kernel's source, as ``kernels/<name>.<ext>`` (Triton: ``.py``, runnable on
        its own; the generated CPU kernels: ``.c``)."""
        if self.dir is None:
            return
        os.makedirs(os.path.join(self.dir, "kernels"), exist_ok=True)
        with open(os.path.join(self.dir, "kernels", f"{name}.{ext}"), "w") as f:
            f.write(source)

    def summary(self, data: dict[str, Any]) -> None:
        if self.dir is None:
            return
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(data, f, indent=2, default=str)

    def failure(self, error: BaseException, stage: str, data: dict[str, Any]) -> None:
        """The summary of a compile that raised: what is known, plus the error and where."""
        self.summary({**data, "error": {"type": type(error).__name__, "message": str(error), "stage": stage,
                                        "traceback": "".join(traceback.format_exception(error))}})


def _run_info(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_summaries(root: str) -> list[dict[str, Any]]:
    """Every graph under ``root`` (a dump dir, one run's folder, or one graph's folder), in name
    order: its summary.json with ``graph`` set to its path under ``root`` (``run_000-w4a16/
    graph_000``) and ``run`` to its run's run.json (None for a dump from before run folders). A
    graph folder with stage files but no summary.json (the process died while compiling it) is
    listed too, as ``{"graph", "run", "incomplete": [its files]}``."""
    found = []
    root = os.path.normpath(root)
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        is_graph = "summary.json" in files or any(re.match(r"^\d\d_.*\.py$", f) for f in files)
        if not is_graph:
            continue
        if "summary.json" in files:
            with open(os.path.join(dirpath, "summary.json")) as f:
                data = json.load(f)
        else:
            data = {"incomplete": sorted(files)}
        rel = os.path.relpath(dirpath, os.path.dirname(root) if dirpath == root else root)
        parent = os.path.dirname(dirpath)
        run = _run_info(parent)
        if dirpath == root and run is not None:  # inspect on one graph folder: name it with its run
            rel = f"{os.path.basename(parent)}/{os.path.basename(dirpath)}"
        data["graph"] = rel.replace(os.sep, "/")
        data["run"] = run
        found.append(data)
    return found
