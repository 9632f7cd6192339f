"""Helpers shared by the test files: tiny models (``models``), inputs for the kernel tests (``inputs``)
and the per-dtype tolerance table with its comparison (``tolerances``)."""
