"""Disk stated before a run and measured after (issue 22): graphopt/disk.py, through the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.disk import DiskNeed, check, free_bytes
from graphopt.errors import GraphoptError


def graphopt(*args):
    return subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, timeout=900)


def test_a_need_past_the_free_space_is_refused_naming_it(tmp_path):
    free = free_bytes(tmp_path)
    with pytest.raises(GraphoptError) as refused:
        check([DiskNeed("ONNX", tmp_path / "out", free // 2), DiskNeed("net cache", tmp_path / "cache", free)])
    message = str(refused.value)
    assert "Not enough disk" in message and "ONNX" in message and "net cache" in message and "\n" not in message
    check([DiskNeed("ONNX", tmp_path / "out", 1000)])  # what fits passes


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or shutil.disk_usage("/dev/shm").free > 30e9,
                    reason="needs a filesystem with less than the 8B export's 32 GB free (/dev/shm, half the RAM)")
def test_an_8b_export_onto_a_small_filesystem_is_refused_before_any_work():
    out = Path("/dev/shm") / f"graphopt-disk-test-{os.getpid()}"
    run = graphopt("run", "llama3.1-8b", "--random-weights", "--target", "onnx", "--out", str(out))
    assert run.returncode == 2 and "Not enough disk" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "ONNX 32.1 GB" in run.stderr
    assert not out.exists() and not list(Path("/dev/shm").glob(f".{out.name}*"))


def test_the_run_states_its_disk_and_writes_about_that(tmp_path):
    out = tmp_path / "out"
    run = graphopt("run", "tiny-llama", "--target", "onnx", "--no-check", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "writes about ONNX" in run.stderr and "  disk: planned ONNX" in run.stdout
    disk = json.loads((out / "report.json").read_text())["disk"]
    onnx = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
    assert 0.75 < disk["planned"]["ONNX"] / onnx < 1.25, (disk, onnx)
    assert disk["written"][str(out)] >= onnx
