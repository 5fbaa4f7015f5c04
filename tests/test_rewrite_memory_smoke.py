"""CPU smoke test of benchmarks/rewrite_memory.py on the tiny preset (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rewrite_memory_tiny(tmp_path):
    out_json, out_txt = tmp_path / "r.json", tmp_path / "r.txt"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rewrite_memory.py"), "--preset", "tiny",
                           "--workdir", str(work), "--json", str(out_json), "--table", str(out_txt),
                           "--no-drop-caches", "--interval", "0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    assert {"machine", "caches", "settings", "results"} <= set(doc)
    assert "warm" in doc["caches"]
    (r,) = doc["results"]
    assert r["preset"] == "tiny" and r["dtype"] == "fp16"
    assert {"largest_tensor_bytes", "data_bytes", "copy", "rewrite", "ratio", "targets", "pass",
            "checks"} <= set(r)
    for op in ("copy", "rewrite"):
        assert {"seconds", "synced_s", "peak_rss_bytes", "rc", "timeline"} <= set(r[op])
        assert r[op]["rc"] == 0 and r[op]["peak_rss_bytes"] > 0
    assert {"rss_limit_bytes", "time_limit_s"} <= set(r["targets"])
    assert {"rss", "time"} <= set(r["pass"])
    checks = r["checks"]
    assert checks["checker"] == "ok"
    assert checks["norms"] == {"expected": 5, "found": 5, "rewritten": 5, "ok": True}
    assert checks["data_file"]["ok"]
    assert checks["data_file"]["bytes_added"] == 0         # tiny is tied: the head stays shared
    assert checks["verify"]["ok"] and checks["verify"]["max_rel"] < 1e-2
    assert "tiny" in out_txt.read_text() and "tiny" in proc.stdout
    assert not (work / "tiny-fp16").exists()                # big files deleted without --keep
