"""The scalpel command, end to end on real MNIST with the quick recipe (a couple of minutes)."""

import json
import subprocess
import sys

import pytest

from tvm_scalpel.data import is_available


def test_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "tvm_scalpel.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "scalpel run lenet-300-100 --target host --quick" in out


@pytest.mark.skipif(not is_available("mnist"), reason="MNIST missing: python -m tvm_scalpel.data fetch")
def test_run_quick_lenet_300_100(tmp_path):
    cmd = [sys.executable, "-m", "tvm_scalpel.cli", "run", "lenet-300-100", "--target", "host", "--quick",
           "--out", str(tmp_path), "--batches", "1", "--rounds", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| batch | dense compiled (us) | Scalpel compiled (us) | speedup |" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    row = report["rows"][0]
    assert row["dense"] > 0 and row["scalpel"] > 0 and row["speedup"] == pytest.approx(row["dense"] / row["scalpel"])
    assert 0 < report["size_percent"] < 100 and report["final_accuracy"] > 0.9
    assert any("linear:" in d for d in row["decisions"])
