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
    assert len(first) == 8 and first == second
