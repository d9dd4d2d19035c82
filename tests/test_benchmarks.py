"""Smoke test of the benchmark scripts: a tiny identifiability run and the report generator."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_identifiability_quick_json_lines_and_report(tmp_path):
    results = tmp_path / "results"
    out = results / "identifiability.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        str(BENCH / "identifiability.py"),
        "--quick",
        "--rhos",
        "0.4",
        "--epochs",
        "5",
        "--n-train",
        "200",
        "--n-test",
        "50",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records[0]["record"] == "meta"
    fits = [r for r in records if r["record"] == "fit"]
    assert {r["method"] for r in fits} == {"sparsevae", "vae", "beta_vae", "vsc"}
    for r in fits:
        assert "error" not in r, r
        assert 0.0 <= r["dci_disentanglement"] <= 1.0
        assert r["heldout_mse"] >= 0
    assert sum(r["record"] == "summary" for r in records) == 4
    # The file holds the same lines, and the report renders from it.
    assert len(out.read_text().splitlines()) == len(records)
    docs = tmp_path / "docs"
    rep = subprocess.run(
        [
            sys.executable,
            str(BENCH / "make_report.py"),
            "--results",
            str(results),
            "--docs",
            str(docs),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    text = (docs / "benchmarks.md").read_text()
    assert "DCI disentanglement" in text and "identifiability.py --quick" in text
    assert "Not run yet" in text  # zeisel and speed results are absent here
