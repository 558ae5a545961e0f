"""Output directories that appear only when complete.

Everything is written into a hidden sibling `.NAME.partial-PID`, renamed onto `NAME` at the
end. A run that fails or is killed leaves the previous output (if any) as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from graphopt.errors import GraphoptError

MANIFEST = "manifest.json"


class StagedDirectory:
    def __init__(self, target: Path):
        self.target = target.expanduser().absolute()
        if self.target.exists() and not self.target.is_dir():
            raise GraphoptError(f"--out {target} exists and is a file; give a directory path.")
        if self.target.is_dir() and any(self.target.iterdir()) and not (self.target / MANIFEST).exists():
            raise GraphoptError(f"--out {target} already holds files that graphopt did not write (no {MANIFEST}); "
                                "graphopt will not replace it. Give an empty or new directory.")
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise GraphoptError(f"cannot create --out {target}: {error.strerror}. Give a directory you can write to.") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise GraphoptError(f"cannot write to {parent} (for --out {target}): permission denied. "
                                "Give a directory you can write to.")
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
