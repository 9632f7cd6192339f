"""The test suite. Its folders mirror the package (core, calibration, surgery, methods, healing, inference,
serving, evaluation, interop, kernels, packaging); shared helpers live in ``tests.support``.

This file makes ``tests`` a package so that ``tests.support`` imports the same way under ``pytest`` and
``python -m pytest`` (pytest puts the repository root on ``sys.path`` for ``tests/conftest.py``). The
test folders themselves have no ``__init__.py``: their files are imported by basename, so every test
file name must be unique across the folders.
"""
