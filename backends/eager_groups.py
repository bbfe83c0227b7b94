"""CPU fusion groups for eager ``compress``ed models: linears that read one input run as one call.

Under ``torch.compile`` the CPU lowering fuses the ``packed_linear`` calls of one input into one
generated call (``lowering._fuse_cpu_groups``). A ``compress``ed model run eagerly has no graph to
rewrite: the model's own code calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after another.
``compress`` knows from the graph it captured which written-back linears read the same input node
(:func:`link`), and links those :class:`~lowbit_compiler.offline.LowbitLinear` modules to one
:class:`EagerGroup`. At run time the first member called with an input runs every member's weight
in one generated call (``cpu_kernels.fused_linear``: x prepared once, one OpenMP region, outputs
side by side, each bit for bit what the member's own call gives) and keeps the other outputs for
that very tensor (same object, same ``_version``); the next members return theirs. Anything else
(another input, more than ``MAX_ROWS`` rows, autograd, not the CPU, tracing under
``torch.compile``, ``LOWBIT_CPU_FUSE=0``, and for a group of several an inference tensor: made under
``torch.inference_mode()``, it has no version counter, so an in-place change between two members'
calls could not be told) takes each member's own path, so the group never changes a result, only
how many calls produce it.

Linears behind one activation-sparsity threshold (TEAL / WINA: ``lowbit::sparse_input_linear``
reading the same input through the same threshold) are linked to an :class:`EagerSparseGroup`
(:func:`link_sparse`): one row runs the site's stacked activation-sparse kernel
(``cpu_sparse.SparseInputGroup``, what the CPU lowering builds under ``torch.compile``), its
outputs within float rounding of each member's own sparse call (the stacked weight splits the
threads' work differently).

What eager mode cannot fuse: a gated MLP's ``silu(gate(x)) * up(x)`` is computed by the MLP's own
forward between the two linears, so gate and up are fused side by side (x read once, one call) and
the SiLU and product stay in torch; norm prologues and residual epilogues likewise belong to the
model's code.
"""
from __future__ import annotations

import os

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_kernels
from lowbit_compiler.formats import WeightFormat


class EagerGroup:
    """Linears of one input (same weight-only format and in_features) run as one generated call."""

    max_rows = cpu_codegen.MAX_ROWS  # larger calls: each member alone

    def __init__(self, members: list[torch.nn.Module]):
        self.members = list(members)  # (each member holds the group: a cycle the collector handles)
        self._fused: dict[torch.dtype, cpu_kernels.FusedWeights] = {}
        self._stash: tuple | None = None  # (x, x._version, {member index: output})
        self.calls = 0  # fused calls made (tests read it)

    def output(self, member: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x`` from the group's one call, or None (the member runs alone)."""
        index = next((i for i, m in enumerate(self.members) if m is member), None)
        if index is None:  # a copy of a member whose group was not copied with it
            return None
        stash = self._stash
        if stash is not None and stash[0] is x and stash[1] == x._version and index in stash[2]:
            out = stash[2].pop(index)
            if not stash[2]:
                self._stash = None
            return out
        if (torch.compiler.is_compiling() or os.environ.get(cpu_codegen.FUSE_ENV, "1") == "0"
                or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
                or x.numel() > self.max_rows * x.shape[-1] or (x.requires_grad and torch.is_grad_enabled())
                or (x.is_inference() and len(self.members) > 1)):
            return None
        dtype = cpu_kernels.compute_dtype_for(x.dtype, cpu_kernels._EAGER_POLICY[-1])
        outs = self._run(x, dtype)
        if outs is None:
            return None
        self.calls += 1
        others = {i: o for i, o in enumerate(outs) if i != index}
        self._stash = (x, x._version, others) if others else None
        return outs[index]

    def _run(self, x: torch.Tensor, dtype: torch.dtype) -> tuple | None:
        """Every member's output for ``x`` in one call, or None (each member runs alone)."""
        modules = self.members
        fused = self._fused.get(dtype)
        if fused is None:
            fused = self._fused[dtype] = cpu_kernels.FusedWeights(
                [cpu_kernels.prepack(m.qweight, m.scale, m.zero, m.fmt, m.in_features, dtype) for m in modules])
        if fused.bound() is None or cpu_codegen.int8_activations_enabled():
            return None  # no generated kernel: each member's own call (which says why, if anything)
        if WeightFormat.parse(modules[0].fmt).kind == "sparse":  # N:M: the measured plan's choice for this
            # many rows (as each member's own call)
            from lowbit_compiler.backends import cpu_sparse

            rows = x.numel() // x.shape[-1]
            if not all(cpu_sparse.use_nm_kernel(m.qweight, m.scale, m.fmt, m.in_features, rows, m.zero) for m in modules):
                return None
        return cpu_kernels.fused_linear(x, fused, tuple(m.bias for m in modules), dtype)

    def __getstate__(self) -> dict:
        # the bound kernels (ctypes) and a kept output are rebuilt after pickling or copying
        return {**self.__dict__, "_fused": {}, "_stash": None}


class EagerSparseGroup(EagerGroup):
    """LowbitLinears behind one activation threshold (a TEAL / WINA site: q/k/v, gate/up) run as
    one call of the activation-sparse kernel for one row: thresholded and compacted once, the
    members' K-major copies stacked (``cpu_sparse.SparseInputGroup``, what the CPU lowering builds
    under ``torch.compile``), outputs side by side (the MLP's own forward applies the SiLU). More
    rows take each member's own path (the dense kernels on the thresholded input)."""

    max_rows = 1

    def __init__(self, members: list[torch.nn.Module], records: tuple = ()):
        super().__init__(members)
        self.records = records  # the members' layer records: the site's plan is written there

    def _run(self, x: torch.Tensor, dtype: torch.dtype) -> tuple | None:
        from lowbit_compiler.backends import cpu_sparse

        group = self._fused.get(dtype)
        if group is None:
            first = self.members[0]
            group = self._fused[dtype] = cpu_sparse.SparseInputGroup(
                first.input_threshold, first.input_col_scale, [(m.qweight, m.scale, m.zero) for m in self.members],
                first.fmt, first.in_features, dtype, records=self.records)
        y = cpu_sparse.sparse_input_group_linear(x, group, tuple(m.bias for m in self.members))
        return (y,) if len(self.members) == 1 else y  # one member: the tensor itself (not a tuple)


def link_sparse(groups: list[list[torch.nn.Module]], records: dict[int, tuple] | None = None) -> int:
    """:func:`link` for LowbitLinears behind one threshold (:class:`EagerSparseGroup`; the caller
    groups them by input and threshold), a site of one linear too (o_proj, down_proj: the row
    call and the site's measured plan, as under ``torch.compile``). ``records``: id(module) ->
    (its layer record, target sparsity), where the site's plan is written once decided."""
    from lowbit_compiler.backends import cpu_sparse

    made = 0
    for members in groups:
        if (not members or cpu_sparse.supported(members[0].fmt) is not None
                or cpu_sparse._static_reason(members[0].fmt, members[0].in_features) is not None):
            continue
        group = EagerSparseGroup(members, tuple(records[id(m)] for m in members if records and id(m) in records))
        for m in members:
            m._eager_group = group
        made += 1
    return made


def link(groups: list[list[torch.nn.Module]]) -> int:
    """Give each list of modules (LowbitLinears reading one input: same format and in_features,
    weight-only, no input transforms or outliers) one :class:`EagerGroup`; returns how many."""
    made = 0
    for members in groups:
        if len(members) < 2 or cpu_codegen.multi_kernel(members[0].fmt) is None:
            continue
        group = EagerGroup(members)
        for m in members:
            m._eager_group = group
        made += 1
    return made
