"""TPU-MLIR, found or installed: every bm1684x step runs through a `Toolchain`.

Two origins:
- `PATH`: Sophgo's tpuc_dev image (or a sourced envsetup.sh) already has `model_deploy.py`
  on PATH and `TPUC_ROOT` set; graphopt uses it as it is.
- `managed`: `graphopt toolchain install bm1684x` builds an isolated Python 3.10 venv under
  `~/.cache/graphopt/toolchains/` (TPU-MLIR's wheel supports only 3.10), fixes it up and
  checks it by compiling a one-layer model. A `toolchain.json` written after that check
  passes is what marks the venv usable: a half-finished install has none and is redone.

Tools are run as `<python> $TPUC_ROOT/python/tools/<tool>.py` with the environment that
`import tpu_mlir` sets up (PATH, PYTHONPATH, LD_LIBRARY_PATH, TPUC_ROOT), so the same code
drives both origins and nothing depends on the venv's console-script shebangs; model_deploy as
`<python> deploy_runner.py`, which runs model_deploy.py with its codegen on a pinned stack (it says why).
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.machine import with_huge_page_malloc, without_huge_page_malloc

TPU_MLIR_VERSION = "1.30.2"
# Measured to work together with tpu_mlir 1.30.2 (README, "The BM1684X target"): its ONNX front end imports
# torch (constant folding); its onnx 1.14.1 reads IR <= 9 / opset <= 17.
REQUIREMENTS = (f"tpu_mlir=={TPU_MLIR_VERSION}", "onnx==1.14.1", "onnxruntime==1.16.3", "onnxsim==0.4.17",
                "psutil", "torch==2.11.0")
# The wheel bundles an old glibc in lib/third_party; on a newer system (Debian 12) every tool
# then dies with `GLIBC_2.36 not found`. Moved aside, the system's own is used.
BUNDLED_GLIBC = ("libc.so.6", "libm.so.6", "libpthread.so.0")
MOVED_ASIDE = "moved-aside-by-graphopt"
ENV_KEYS = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "TPUC_ROOT", "PPL_PROJECT_ROOT", "PPL_BUILD_PATH",
            "PPL_RUNTIME_PATH", "TPUKERNEL_CUSTOM_FIRMWARE_PATH")
SEARCH_PATHS = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH")
MARKER = "toolchain.json"
DEPLOY_RUNNER = Path(__file__).with_name("deploy_runner.py")
# The tools that get glibc's malloc in huge pages (graphopt/machine.py): those whose output is the same
# bytes with it (the transform server's are held to the command's; model_deploy's were measured the same;
# model_tool --combine's but for the build time in its header: an 8-layer 8B bmodel, 3 GB, combined in
# 6.7-11.9 s against 12.6-15.7 s).
HUGE_PAGE_TOOLS = ("model_transform", "model_deploy", "model_tool")


def cache_root() -> Path:
    """graphopt's cache (toolchains, compiled networks): $GRAPHOPT_CACHE or ~/.cache/graphopt."""
    return Path(os.environ.get("GRAPHOPT_CACHE") or Path.home() / ".cache" / "graphopt").expanduser()


def managed_dir() -> Path:
    return cache_root() / "toolchains" / f"tpu-mlir-{TPU_MLIR_VERSION}"


@dataclass(frozen=True)
class Toolchain:
    origin: str  # "PATH" or "managed"
    python: Path  # the interpreter TPU-MLIR's Python tools run under
    root: Path  # TPUC_ROOT
    version: str
    env: dict[str, str]  # what `import tpu_mlir` (or envsetup.sh) puts in the environment

    def tool(self, name: str) -> list[str]:
        """The command line that starts one of TPU-MLIR's tools (model_transform, model_deploy, model_tool...)."""
        if name == "model_deploy":
            return [str(self.python), str(DEPLOY_RUNNER)]
        binary = self.root / "bin" / name
        if binary.is_file():
            return [str(binary)]
        return [str(self.python), str(self.root / "python" / "tools" / f"{name}.py")]

    def environ(self, threads: int | None = None, huge_pages: bool = False) -> dict[str, str]:
        """The tools' environment. `huge_pages`: with HUGE_PAGE_MALLOC (graphopt/machine.py), for HUGE_PAGE_TOOLS;
        without, glibc's default malloc (the simulator)."""
        env = dict(os.environ)
        for key, value in self.env.items():
            # Search paths are TPU-MLIR's entries in front of the caller's own.
            env[key] = os.pathsep.join(filter(None, [value, os.environ.get(key)])) if key in SEARCH_PATHS else value
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        return with_huge_page_malloc(env) if huge_pages else without_huge_page_malloc(env)

    def run(self, name: str, args: list[str], cwd: Path, log: Path, threads: int | None = None,
            peak_rss: dict[str, int] | None = None) -> int:
        """Runs a tool with its output appended to `log`; returns the exit status. `peak_rss[name]` gets the
        resident bytes of its largest process (the tool or one it ran and waited for: tpuc-opt, say)."""
        with open(log, "a") as handle:
            handle.write(f"$ {shlex.join([name, *args])}\n")
            handle.flush()
            process = subprocess.Popen([*self.tool(name), *args], cwd=cwd,
                                       env=self.environ(threads, huge_pages=name in HUGE_PAGE_TOOLS),
                                       stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:
                process.kill()
                process.wait()
                raise
            process.returncode = os.waitstatus_to_exitcode(status)
            if peak_rss is not None:
                peak_rss[name] = max(peak_rss.get(name, 0), usage.ru_maxrss * 1024)
            return process.returncode

    def describe(self) -> str:
        return f"TPU-MLIR {self.version} ({self.origin}: {self.root})"

    def to_json(self) -> dict:
        return {"origin": self.origin, "python": str(self.python), "root": str(self.root), "version": self.version,
                "env": self.env}


# ---- finding ----------------------------------------------------------------------------

def _from_path() -> Toolchain | None:
    """TPU-MLIR set up by Sophgo's image or envsetup.sh: model_deploy.py on PATH, TPUC_ROOT set."""
    deploy = shutil.which("model_deploy.py")
    root = os.environ.get("TPUC_ROOT")
    if not deploy or not root or not Path(root, "python", "tools").is_dir():
        return None
    python = Path(shutil.which("python3") or sys.executable)
    version = _version_file(Path(root)) or "unknown"
    return Toolchain("PATH", python, Path(root), version, {k: os.environ[k] for k in ENV_KEYS if k in os.environ})


def _version_file(root: Path) -> str | None:
    for candidate in glob.glob(str(root.parent / "tpu_mlir-*.dist-info" / "METADATA")):
        for line in Path(candidate).read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def _managed() -> Toolchain | None:
    marker = managed_dir() / MARKER
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text())
    toolchain = Toolchain("managed", Path(data["python"]), Path(data["root"]), data["version"], data["env"])
    return toolchain if toolchain.python.exists() and toolchain.root.is_dir() else None


def find() -> Toolchain | None:
    """TPU-MLIR on PATH first (the user's own set-up wins), else the one graphopt installed."""
    return _from_path() or _managed()


def require() -> Toolchain:
    toolchain = find()
    if toolchain is None:
        raise GraphoptError(
            "the bm1684x target needs TPU-MLIR, and none was found: model_deploy.py is not on PATH (with TPUC_ROOT "
            f"set, as in Sophgo's tpuc_dev image) and graphopt has not installed its own under {managed_dir()}. "
            "Run `graphopt toolchain install bm1684x` (it needs Python 3.10 and about 7 GB of disk), then run this "
            "command again.")
    return toolchain


# ---- installing -------------------------------------------------------------------------

def find_python310(explicit: str | None = None) -> Path:
    """Python 3.10 for TPU-MLIR's wheel: --python, else $GRAPHOPT_PYTHON310, python3.10 on PATH, pyenv's."""
    if explicit:
        if _is_python310(explicit):
            return Path(explicit)
        raise GraphoptError(f"--python {explicit} is not a working Python 3.10 with venv; TPU-MLIR "
                            f"{TPU_MLIR_VERSION}'s wheel needs exactly 3.10. Give the path of a Python 3.10.")
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates = [os.environ.get("GRAPHOPT_PYTHON310"), shutil.which("python3.10"),
                  *sorted(glob.glob(f"{pyenv_root}/versions/3.10.*/bin/python3"), reverse=True)]
    for candidate in filter(None, candidates):
        if _is_python310(candidate):
            return Path(candidate)
    raise GraphoptError(
        f"TPU-MLIR {TPU_MLIR_VERSION} is only published for Python 3.10, and no Python 3.10 was found (tried "
        "$GRAPHOPT_PYTHON310, python3.10 on PATH and pyenv's versions). Install one (for example `pyenv install "
        "3.10`, or your system's python3.10 and python3.10-venv packages) and run `graphopt toolchain install "
        "bm1684x --python /path/to/python3.10` again.")


def _is_python310(candidate: str) -> bool:
    try:
        out = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 10))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def log_tail(log: Path, lines: int = 15) -> str:
    """The last `lines` lines of a tool's log, indented for an error message."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def install(python: str | None = None, force: bool = False, say=print, check=None) -> Toolchain:
    """Creates the managed venv, installs TPU-MLIR into it, fixes it up and checks it."""
    directory = managed_dir()
    if not force and (existing := _managed()) is not None:
        say(f"already installed: {existing.describe()}; use --force to reinstall")
        return existing
    base = find_python310(python)
    if directory.exists():  # a previous install that never passed its check, or --force
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    log = directory / "install.log"
    venv = directory / "venv"
    env_python = venv / "bin" / "python"
    steps = [
        ("creating a Python 3.10 venv", [str(base), "-m", "venv", str(venv)]),
        ("upgrading pip", [str(env_python), "-m", "pip", "install", "--upgrade", "pip"]),
        (f"installing {', '.join(REQUIREMENTS)} (about 7 GB; pip caches downloads in ~/.cache/pip)",
         [str(env_python), "-m", "pip", "install", *REQUIREMENTS]),
    ]
    for what, command in steps:
        say(f"toolchain: {what} ...")
        start = time.perf_counter()
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        if status != 0:
            raise GraphoptError(f"installing TPU-MLIR failed while {what} (exit status {status}). The log is {log}; "
                                f"its last lines:\n{log_tail(log)}\nFix what it reports (disk space, network access "
                                "to PyPI) and run `graphopt toolchain install bm1684x` again.")
        say(f"toolchain: {what}: done in {time.perf_counter() - start:.0f}s")
    root = Path(subprocess.run([str(env_python), "-c", "import importlib.util as u; "
                                "print(u.find_spec('tpu_mlir').submodule_search_locations[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _move_bundled_glibc_aside(root)
    toolchain = Toolchain("managed", env_python, root, TPU_MLIR_VERSION, _tpu_mlir_env(env_python))
    say("toolchain: checking it by compiling a one-layer model ...")
    result = check(toolchain, directory / "selfcheck") if check else None  # selfcheck.run_selfcheck
    say(f"toolchain: self-check passed: {result}")
    (directory / MARKER).write_text(json.dumps({**toolchain.to_json(), "selfcheck": result}, indent=2) + "\n")
    return toolchain


def _move_bundled_glibc_aside(root: Path) -> None:
    third_party = root / "lib" / "third_party"
    aside = third_party / MOVED_ASIDE
    aside.mkdir(exist_ok=True)
    for name in BUNDLED_GLIBC:
        if (third_party / name).exists():
            (third_party / name).rename(aside / name)


def _tpu_mlir_env(python: Path) -> dict[str, str]:
    """The variables `import tpu_mlir` sets (its console scripts rely on them)."""
    code = f"import json, os, tpu_mlir; print(json.dumps({{k: os.environ[k] for k in {ENV_KEYS!r} if k in os.environ}}))"
    bare = {k: v for k, v in os.environ.items() if k not in SEARCH_PATHS}
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={**bare, "PATH": os.defpath})
    if out.returncode != 0:
        raise GraphoptError(f"the installed TPU-MLIR cannot be imported ({out.stderr.strip().splitlines()[-1:]}). "
                            "Run `graphopt toolchain install bm1684x --force` to reinstall it.")
    env = json.loads(out.stdout.strip().splitlines()[-1])
    # Keep only the entries tpu_mlir put in front; the caller's own are added at run time (Toolchain.environ).
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p not in os.defpath.split(os.pathsep))
    return env


def status() -> str:
    lines = []
    on_path, managed = _from_path(), _managed()
    lines.append(f"on PATH: {on_path.describe() if on_path else 'none (model_deploy.py not on PATH or TPUC_ROOT unset)'}")
    if managed:
        data = json.loads((managed_dir() / MARKER).read_text())
        lines.append(f"managed: {managed.describe()}\n  python: {managed.python}\n  self-check: {data.get('selfcheck')}")
    elif managed_dir().exists():
        lines.append(f"managed: an unfinished install in {managed_dir()} (no {MARKER}); run "
                     "`graphopt toolchain install bm1684x` to finish it")
    else:
        lines.append(f"managed: not installed (would go to {managed_dir()})")
    chosen = find()
    lines.append(f"used by --target bm1684x: {chosen.describe() if chosen else 'none'}")
    return "\n".join(lines)
