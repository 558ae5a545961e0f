"""Importing a user's Python file (a --pass-file, a model file) as a module of its own.

Each file gets one module name, derived from its resolved path, so importing it again (a spawned
export worker, a second run in one process, a test) finds the module already loaded instead of
registering its passes twice. A file that fails to import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_user_file(path: Path, prefix: str) -> ModuleType:
    """Import `path` as `<prefix><stem>_<hash of its path>`; any exception it raises propagates."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"{prefix}{path.stem}_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
