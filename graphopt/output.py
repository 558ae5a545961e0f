"""Output directories that appear only when complete.

Everything is written into a hidden sibling `.NAME.partial-PID`, renamed onto `NAME` at the
end. A run that fails or is killed leaves the previous output (if any) as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.manifest import MANIFEST


def check_output_dir(target: Path) -> Path:
    """Refuse an --out that cannot be written or that holds someone else's files; create its parent."""
    path = target.expanduser().absolute()
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise GraphoptError(f"--out {target} already holds files that graphopt did not write (no {MANIFEST}); "
                            "graphopt will not replace it. Give an empty or new directory.")
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GraphoptError(f"cannot create --out {target}: {blocker} is a file, not a directory. "
                            "Give a directory path you can write to.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GraphoptError(f"cannot create --out {target}: {error.strerror}. Give a directory you can write to.") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise GraphoptError(f"cannot write to {path.parent} (for --out {target}): permission denied. "
                            "Give a directory you can write to.")
    return path


class StagedDirectory:
    def __init__(self, target: Path):
        self.target = check_output_dir(target)
        parent = self.target.parent
        self.path = parent / f".{self.target.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def commit(self) -> Path:
        old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
        if self.target.exists():
            self.target.rename(old)
        self.path.rename(self.target)
        shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
