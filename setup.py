"""Packaging for cl_optim.

`kernels/` (Triton) is installed as the sub-package `cl_optim.kernels` through a package_dir
mapping, so the source tree keeps the layout of DESIGN.md while nothing is ever installed as a
top-level `kernels` module.
"""

from setuptools import setup

setup(
    packages=["cl_optim", "cl_optim.fisher", "cl_optim.kernels"],
    package_dir={"cl_optim": "cl_optim", "cl_optim.kernels": "kernels"},
)
