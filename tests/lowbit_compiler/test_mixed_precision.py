"""Mixed precision: formats per layer under an average-bits budget, from measured sensitivity."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import LowbitError, compress
from lowbit_compiler.formats import WeightFormat, sqnr_db
from tests.conftest import make_model, prompt
from tests.helpers import Recorder

CALIBRATION = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_mixed_4_5_spends_its_budget_greedily_by_error_per_bit():
    mixed = compress(make_model("llama"), "mixed-4.5", calibration=CALIBRATION, progress=False)
    info = next(p for p in mixed.lowbit_summary["passes"] if p["name"] == "mixed_precision")["details"]
    assert 4.0 <= info["average_bits"] <= 4.5 and info["budget_bits"] == 4.5
    formats = {layer: d["format"] for layer, d in info["layers"].items()}
    assert len(set(formats.values())) >= 2
    for layer, d in info["layers"].items():  # each layer's measured error falls with more bits
        errors = list(d["sensitivity"].values())
        assert errors == sorted(errors, reverse=True), layer
    # all layers are about equally sensitive here, so the budget goes to the smallest layers first:
    # k_proj and v_proj (64 x 128) buy the same error reduction for half the bits of the others
    upgraded = sorted(layer for layer, f in formats.items() if f == "int8")
    assert upgraded and all(layer.endswith(("k_proj", "v_proj")) for layer in upgraded)
    # and what is left of the budget cannot buy one more upgrade
    shapes = {layer: (d["out_features"], d["in_features"]) for layer, d in mixed.lowbit_summary["layers"].items()}
    total = sum(n * k for n, k in shapes.values())
    order = list(info["layers"][upgraded[0]]["sensitivity"])
    cheapest = min(WeightFormat.parse(order[order.index(f) + 1]).storage_bytes(*shapes[layer]) * 8
                   - WeightFormat.parse(f).storage_bytes(*shapes[layer]) * 8
                   for layer, f in formats.items() if f != order[-1])
    assert info["average_bits"] * total + cheapest > 4.5 * total
    details = mixed.lowbit_summary["passes"][-1]["details"]
    assert details["formats"] == {f: list(formats.values()).count(f) for f in set(formats.values())}
    assert mixed.lowbit_summary["layers"][upgraded[0]]["chosen_by"] == "mixed_precision"
    assert mixed.lowbit_summary["layers"][upgraded[0]]["format"] == "int8"


def test_mixed_precision_beats_uniform_int4():
    ids = prompt(32)
    with torch.no_grad():
        ref = make_model("llama")(ids)[0]
        uniform = compress(make_model("llama"), "w4a16")(ids)[0]
        mixed = compress(make_model("llama"), "mixed-4.5", calibration=CALIBRATION, progress=False)(ids)[0]
    assert sqnr_db(ref, mixed) >= sqnr_db(ref, uniform) + 1.0


def test_mixed_precision_needs_calibration():
    with pytest.raises(LowbitError, match=r"pass 'mixed_precision' \(recipe 'mixed-4.5'\) needs calibration data"):
        compress(make_model("llama"), "mixed-4.5")
    with pytest.raises(Exception, match=r"pass 'mixed_precision' \(recipe 'mixed-4.5'\) needs calibration data: "
                                        r"torch.compile\(model, backend='lowbit', options=\{'recipe': ..., "
                                        r"'calibration': batches\}\)"):
        torch.compile(make_model("llama"), backend=Recorder(recipe="mixed-4.5"))(prompt())
