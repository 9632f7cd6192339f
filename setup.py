"""Package layout: the folders ``engine/`` and ``kernels/`` install under one import name.

``engine/`` is the package ``layerfold`` and ``kernels/`` is ``layerfold.kernels``, so nothing named
``engine`` or ``kernels`` lands top-level in site-packages (Hugging Face publishes a PyPI package
named ``kernels``). Sub-packages are found by walking the folders, so a new one cannot be left out.
Everything else (metadata, dependencies, entry points) is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = {"layerfold": "engine", "layerfold.kernels": "kernels"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder) if f"{name}.{sub}" not in ROOTS]

setup(packages=packages, package_dir=ROOTS)
