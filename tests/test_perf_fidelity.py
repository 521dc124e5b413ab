"""profiling/fidelity.py: the model against DeepSeek's published production figures (a guard, not a fit).

The bounds are wide on purpose: they catch unit and wiring mistakes (a factor of 10), and record the
state of the model: decode within 2x, prefill within 3.5x of the 24-hour production averages (the model
predicts full-load capacity; see the script's docstring for why prefill sits further off).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fidelity_table() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "profiling" / "fidelity.py"), "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    cases = {c["case"].split(" (")[0]: c for c in doc["cases"]}
    assert len(doc["cases"]) == 4
    for c in doc["cases"]:
        assert c["predicted"] > 0 and c["published"] > 0
        bound = 2.0 if c["case"].startswith("decode") else 3.5
        assert 1 / bound <= c["ratio"] <= bound, c
    d = doc["decode"]
    # the operating point is a real batch: between 1 and what the KV cache holds
    assert 1 <= d["batch_at_published_user_speed"] <= d["kv_cap_batch"]
    assert cases["decode tok/s/GPU at 21 tok/s/user"]["published"] == 1850
    # the same tables through the text output
    t = subprocess.run([sys.executable, str(ROOT / "profiling" / "fidelity.py")], capture_output=True, text=True, timeout=300)
    assert t.returncode == 0 and "decode tok/s/GPU at 21 tok/s/user" in t.stdout
