"""model_deploy.py as it is, but its codegen step runs on a pinned stack (run in TPU-MLIR's Python, like
transform_server.py): `python deploy_runner.py ARGS` does what `model_deploy.py ARGS` does.

Why: codegen (`tpuc-opt final.mlir --codegen=...`) writes a field it never sets into the ArgMax command
that lm_head's TopK(K=1) becomes: three bytes of the stack's leftovers. Measured on the Llama-3.1-8B
lm_head, codegen run again and again on the same final MLIR on one machine: `01 00 00 00` mostly,
`01 f8 80 ff` in about one run of five (the Ray test caught it between two nodes). Zero-filled malloc
(glibc.malloc.perturb) does not change that; the stack's layout does. With address-space randomization
off, 14 runs gave one value for a given environment, and the other value once the environment grew by
1.5 KiB (the environment sits at the top of the stack). So codegen runs with randomization off and its
environment padded to a fixed number of variables and bytes: the stack is then laid out the same in every
build wherever the toolchain is installed at the same path (the net cache's key already asks that of a
Ray node), and the field is the same. Neither costs anything.

The codegen command is found by its `--codegen` option as it passes through TPU-MLIR's own
`mlir_shell._os_system` (every tpuc-opt step goes through it). A model_deploy that writes its bmodel
without a codegen step passing there (a TPU-MLIR that moved it) fails here, rather than build bytes
that may differ run to run.
"""

import ctypes
import os
import runpy
import shlex
import shutil
import subprocess
import sys

ADDR_NO_RANDOMIZE = 0x0040000  # personality(2): what `setarch -R` sets; children inherit it
# codegen's environment: the caller's, padded to exactly this many variables and bytes ("KEY=VALUE\0" each),
# so the stack below it is laid out the same whatever the caller's environment and directory are.
ENV_VARS = 512
ENV_BYTES = 96 << 10  # (one string may hold at most 128 KiB: MAX_ARG_STRLEN)
PAD = "GRAPHOPT_STACK_PAD"


def pinned_environment(environ: dict, cwd: str) -> dict:
    """`environ` (with PWD = `cwd`: codegen's PPL autotuner reads it) padded to ENV_VARS variables and
    ENV_BYTES bytes. An environment larger than that is refused: codegen would run on another stack."""
    env = {**{k: v for k, v in environ.items() if not k.startswith(PAD)}, "PWD": cwd}
    pads = ENV_VARS - len(env)
    names = [f"{PAD}{i:03d}" for i in range(pads)]
    used = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items()) + sum(len(n) + 2 for n in names)
    if pads < 1 or used > ENV_BYTES:
        raise SystemExit(f"deploy_runner: the environment has {len(env)} variables and {used} bytes, past the "
                         f"{ENV_VARS} and {ENV_BYTES} codegen's stack is pinned with; start graphopt with a smaller one")
    env.update({name: "" for name in names})
    env[names[-1]] = "x" * (ENV_BYTES - used)
    return env


def _personality(persona: int) -> int:
    return ctypes.CDLL(None, use_errno=True).personality(ctypes.c_ulong(persona))


def _pin_codegen_stack() -> list[str]:
    """Patches mlir_shell._os_system to run the codegen command itself, on a pinned stack; returns the list
    the codegen commands it ran are added to."""
    from tpu_mlir.python.utils import mlir_shell  # the module model_deploy.py imports its steps from

    unchanged, seen = mlir_shell._os_system, []

    def os_system(cmd, *args, **kwargs):
        line = " ".join(map(str, cmd))
        if not any(str(part).startswith("--codegen") for part in cmd):
            return unchanged(cmd, *args, **kwargs)
        argv = shlex.split(line)  # as mlir_shell's shell splits it, without the shell (it would edit the environment)
        argv[0] = shutil.which(argv[0]) or argv[0]
        print(f"[Running]: {line}\ndeploy_runner: codegen with address-space randomization off and its environment "
              f"padded to {ENV_VARS} variables, {ENV_BYTES} bytes", flush=True)
        seen.append(line)
        before = _personality(0xFFFFFFFF)  # (0xffffffff only reads it)
        _personality(before | ADDR_NO_RANDOMIZE)
        try:
            status = subprocess.run(argv, env=pinned_environment(dict(os.environ), os.getcwd())).returncode
        finally:
            _personality(before)
        if status != 0:
            raise RuntimeError(f"[!Error]: {line}")  # as mlir_shell reports a failed step
        print(f"[Success]: {line}", flush=True)

    mlir_shell._os_system = os_system
    return seen


def _option(args: list[str], name: str) -> str | None:
    """The value of `name` (`--name VALUE` or `--name=VALUE`) in model_deploy's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main() -> None:
    try:
        import tpu_mlir  # noqa: F401  (the wheel's: sets TPU-MLIR's environment, which graphopt also passes)
    except ImportError:
        pass  # a tpuc_dev image: envsetup.sh set it
    script = os.path.join(os.environ["TPUC_ROOT"], "python", "tools", "model_deploy.py")
    args = sys.argv[1:]
    seen = _pin_codegen_stack()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    bmodel = _option(args, "--model")
    if bmodel and os.path.exists(bmodel) and not seen:
        sys.exit("deploy_runner: model_deploy wrote its bmodel without a `--codegen` step passing through "
                 "mlir_shell._os_system, so the codegen ran on an unpinned stack and the bmodel may differ from build "
                 "to build; this TPU-MLIR moved its codegen: update graphopt's deploy_runner.py")


if __name__ == "__main__":
    main()
