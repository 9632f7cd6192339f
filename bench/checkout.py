"""Import ``layerfold`` from this checkout when it is not installed (a bare GPU machine, a fresh clone).

The package's folders are ``engine/`` (``layerfold``) and ``kernels/`` (``layerfold.kernels``), the
mapping setup.py gives pip. Where ``pip install -e .`` has run, this does nothing; otherwise it puts a
finder with that mapping in front of ``sys.meta_path``, the same thing an editable install does.

    import checkout                          # from a script in bench/ (tools/ scripts add bench/ to sys.path)
    python bench/checkout.py -m pytest ...   # run a module (pytest, layerfold) from the checkout
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"layerfold": ROOT / "engine", "layerfold.kernels": ROOT / "kernels"}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``layerfold`` and ``layerfold.kernels`` in the checkout's folders; sub-modules follow
    from the packages' ``__path__`` as usual."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        folder = MAPPING.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install() -> bool:
    """Make ``import layerfold`` find this checkout unless an installed copy is importable; True if it did."""
    if any(isinstance(f, CheckoutFinder) for f in sys.meta_path) or importlib.util.find_spec("layerfold"):
        return False
    sys.meta_path.insert(0, CheckoutFinder())
    return True


install()

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: python bench/checkout.py -m MODULE [ARGS...]")
    mod = sys.argv[2]
    sys.argv = [mod, *sys.argv[3:]]
    sys.path.insert(0, os.getcwd())  # as `python -m` does: the current directory first (tests import `tests.`)
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
