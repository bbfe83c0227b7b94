"""Every preset through both flows on Llama, Qwen2 and BERT (slow: the default suite runs one
architecture per preset family in the per-feature tests)."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import PRESETS, compress
from lowbit_compiler.formats import sqnr_db
from tests.conftest import make_model, prompt
from tests.helpers import Recorder

CALIBRATION = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
# logits SQNR floors against float on tiny random models (3-bit formats are coarse there)
FLOORS = {"w3a16": 4.0, "w3a16-gptq": 6.0, "w4a16-spqr": 4.0,
          # int4 activations: 4-bit per-token codes on a random model
          "w4a4": 6.0, "w4a4-rot": 6.0, "w4a4-rot-gptq": 6.0, "w4a4-spin": 6.0, "w4a4-flat": 6.0,
          "w4a4-spin-gptq": 6.0, "w3a16-awq-gptq": 6.0, "w4a16-spqr-hqq": 4.0}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
# the KV presets change the cache, not the weights: tests/lowbit_compiler/test_kv_cache.py
@pytest.mark.parametrize("recipe", sorted(r for r in set(PRESETS) - {"none"} if "mark_kv_cache" not in PRESETS[r].passes))
def test_every_preset_through_both_flows(recipe, arch):
    ids = prompt(32)
    with torch.no_grad():
        ref = make_model(arch)(ids)[0]
        offline = compress(make_model(arch), recipe, calibration=CALIBRATION, progress=False)
        out = offline(ids)[0]
        # the same calibration through torch.compile: its first graph has the calibration shapes
        compiled = torch.compile(make_model(arch), backend=Recorder(recipe=recipe, calibration=CALIBRATION,
                                                                    progress=False))
        compiled(CALIBRATION[0])
        torch.testing.assert_close(compiled(ids)[0], out)
    assert torch.isfinite(out).all()
    floor = FLOORS.get(recipe, 10.0) + (25.0 if arch == "bert" and recipe != "rotate" else 0.0)
    if recipe == "rotate":  # lossless (float32 rounding; HF norms compute in float32 either way)
        floor = 60.0
    assert sqnr_db(ref, out) >= floor, (recipe, arch, sqnr_db(ref, out))
    if recipe == "rotate":
        rotated = next(p for p in offline.lowbit_summary["passes"] if p["name"] == "rotate")["details"]["rotated"]
        assert rotated["R2"]["attentions"] == 2
    else:
        assert offline.lowbit_summary["replaced_modules"] > 0
