"""Smoke test of the benchmark suite: the cheapest benchmark in its tiny mode, run through
``bench/run.py`` as a subprocess, prints one JSON object on its last line and writes the results
files. No timing is asserted (benchmarks measure; tests only check that they run)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_bench_smoke_prints_json(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--results-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    res = json.loads(last)
    assert not res["errors"], res["errors"]
    for key in ("spectral_overhead_vit", "spectral_overhead_qkformer", "spectral_overhead"):
        assert isinstance(res[key], float), key
    spec = res["benchmarks"]["spectral_overhead"]
    assert spec["mode"] == "smoke"
    assert spec["details"]["qkformer"]["amortised"]["matrices"] > 0
    assert {"cpu_model", "cpu_count", "host"} <= set(res["machine"])
    assert res["versions"]["torch"]
    written = json.loads((tmp_path / "latest.json").read_text())
    assert written["spectral_overhead_vit"] == res["spectral_overhead_vit"]
