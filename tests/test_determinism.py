"""The same input and flags produce byte-identical ONNX files, also across processes."""

import hashlib
import subprocess
import sys


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.onnx"))}


def test_two_runs_write_identical_onnx(tmp_path, tiny_llama_build):
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "graphopt", "run", "tiny-llama", "--seq-length", "64", "--no-check",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    first, second = _hashes(tiny_llama_build.out_dir), _hashes(out)
    assert len(first) == 6 and first == second


def test_parallel_export_writes_the_same_bytes_and_passes_its_checks(tmp_path, tiny_llama_build):
    """--jobs 2: networks exported by two spawned processes, one weight group per task."""
    import json

    out = tmp_path / "parallel"
    proc = subprocess.run([sys.executable, "-m", "graphopt", "run", "tiny-llama", "--seq-length", "64", "--jobs", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _hashes(out) == _hashes(tiny_llama_build.out_dir)
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["processes"] == 2  # it really ran in two processes
    assert report["ok"] and all(c["ok"] for n in report["networks"] for c in n["checks"]) and report["end_to_end"]["ok"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [n["name"] for n in manifest["networks"]][:3] == ["embedding", "block_0", "block_cache_0"]
