"""model_deploy.py as it is, but its codegen step runs with zero-filled malloc (run in TPU-MLIR's Python, like
transform_server.py): `python deploy_runner.py ARGS` does what `model_deploy.py ARGS` does.

Why: codegen (`tpuc-opt final.mlir --codegen=...`) writes a field it never sets into lm_head's bmodel (its
ArgMax command): three bytes of heap leftovers, `01 f8 80 ff` in one build and `01 00 00 00` in the next
(measured on the Llama-3.1-8B lm_head: two builds of the same top MLIR differ there, with or without
huge-page malloc; the Ray test caught it between two nodes). glibc's `perturb` tunable makes malloc hand
out zeroed memory, so the field is 0 in every build. It costs: every allocation is written once, so
every page a tool reserves is touched. Given to the whole of model_deploy, it took an 8B block from
6.8 s to 19.7 s and 1.5 to 5.5 GB, and lm_head from 13.2 s to 36.8 s and 5.9 to 9.9 GB; given to the
codegen step alone (here), the times and peaks are those without it, and the bytes those with it.

The codegen command is found by its `--codegen` option as it passes through TPU-MLIR's own
`mlir_shell._os_system` (every tpuc-opt step goes through it, with this process's environment).
A model_deploy that writes its bmodel without a codegen step passing there (a TPU-MLIR that moved it)
fails here, rather than build bytes that may differ run to run.
"""

import os
import runpy
import sys

ZEROED_MALLOC = "glibc.malloc.perturb=255"  # each allocation filled with ~255: zero


def _zero_codegen_malloc() -> list[str]:
    """Patches mlir_shell._os_system; returns the list the codegen commands it changed are added to."""
    from tpu_mlir.python.utils import mlir_shell  # the module model_deploy.py imports its steps from

    unchanged, seen = mlir_shell._os_system, []

    def os_system(cmd, *args, **kwargs):
        if not any(str(part).startswith("--codegen") for part in cmd):
            return unchanged(cmd, *args, **kwargs)
        before = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [before, ZEROED_MALLOC]))
        print(f"deploy_runner: codegen with zero-filled malloc (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']})",
              flush=True)
        seen.append(" ".join(map(str, cmd)))
        try:
            return unchanged(cmd, *args, **kwargs)
        finally:
            if before is None:
                del os.environ["GLIBC_TUNABLES"]
            else:
                os.environ["GLIBC_TUNABLES"] = before

    mlir_shell._os_system = os_system
    return seen


def _bmodel(args: list[str]) -> str | None:
    """The bmodel model_deploy was asked to write (--model PATH or --model=PATH)."""
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def main() -> None:
    try:
        import tpu_mlir  # noqa: F401  (the wheel's: sets TPU-MLIR's environment, which graphopt also passes)
    except ImportError:
        pass  # a tpuc_dev image: envsetup.sh set it
    script = os.path.join(os.environ["TPUC_ROOT"], "python", "tools", "model_deploy.py")
    seen = _zero_codegen_malloc()
    sys.argv = [script, *sys.argv[1:]]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    bmodel = _bmodel(sys.argv[1:])
    if bmodel and os.path.exists(bmodel) and not seen:
        sys.exit("deploy_runner: model_deploy wrote its bmodel without a `--codegen` step passing through "
                 "mlir_shell._os_system, so the codegen ran without zero-filled malloc and the bmodel may differ "
                 "from build to build; this TPU-MLIR moved its codegen: update graphopt's deploy_runner.py")


if __name__ == "__main__":
    main()
