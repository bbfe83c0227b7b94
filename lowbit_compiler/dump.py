"""Dumps: what happened to each compiled graph, readable by people and by ``lowbit inspect``.

Layout, per compiled graph (``<dump_dir>/graph_<NNN>/``)::

    00_captured.py           the IR right after capture (parameters as FQN get_attrs)
    01_canonicalize.py       the graph after each pass, as readable code ...
    01_canonicalize.diff     ... with a unified diff to the stage before
    ..
    NN_lowered.py/.diff      the graph that runs (each lowbit op bound to its kernel)
    summary.json             recipe, pass times and match counts, per-layer decisions, fallbacks

The directory comes from ``options={"dump_dir": ...}`` or the ``LOWBIT_DUMP_DIR`` environment
variable.
"""
from __future__ import annotations

import difflib
import itertools
import json
import os
import re
from typing import Any

import torch.fx as fx

ENV_VAR = "LOWBIT_DUMP_DIR"
_graph_ids: dict[str, itertools.count] = {}  # dump root -> next graph number in this process


def resolve_dump_dir(option: str | os.PathLike | None) -> str | None:
    value = option if option is not None else os.environ.get(ENV_VAR)
    return os.fspath(value) if value else None


def graph_code(gm: fx.GraphModule) -> str:
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    return re.sub(r" +$", "", code, flags=re.M)


class DumpWriter:
    """Writes the stages of one graph; a no-op when ``root`` is None."""

    def __init__(self, root: str | None, prefix: str = "graph"):
        self.dir = None
        self._stage = 0
        self._previous: str | None = None
        self._previous_name = ""
        if root is None:
            return
        os.makedirs(root, exist_ok=True)
        while True:  # never overwrite another process's (or an earlier run's) graph
            counter = _graph_ids.setdefault(os.path.abspath(root), itertools.count())
            candidate = os.path.join(root, f"{prefix}_{next(counter):03d}")
            try:
                os.makedirs(candidate)
                break
            except FileExistsError:
                continue
        self.dir = candidate

    @property
    def name(self) -> str:
        return os.path.basename(self.dir) if self.dir else ""

    def stage(self, name: str, gm: fx.GraphModule) -> None:
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
        self._previous, self._previous_name = code, stem
        self._stage += 1

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def kernel(self, name: str, source: str) -> None:
        """A generated kernel's source, as ``kernels/<name>.py`` (runnable on its own)."""
        if self.dir is None:
            return
        os.makedirs(os.path.join(self.dir, "kernels"), exist_ok=True)
        with open(os.path.join(self.dir, "kernels", name + ".py"), "w") as f:
            f.write(source)

    def summary(self, data: dict[str, Any]) -> None:
        if self.dir is None:
            return
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(data, f, indent=2, default=str)


def load_summaries(root: str) -> list[dict[str, Any]]:
    """Every summary.json under ``root`` (a dump dir or one graph's dir), in name order."""
    found = []
    for dirpath, _, files in sorted(os.walk(root)):
        if "summary.json" in files:
            with open(os.path.join(dirpath, "summary.json")) as f:
                data = json.load(f)
            data.setdefault("graph", os.path.basename(dirpath))
            found.append(data)
    return found
