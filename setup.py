"""Packaging for cl_optim.

`kernels/` (Triton) is installed as `cl_optim.kernels` and `csrc/` (the C++/CUDA sources, for the
just-in-time build) as `cl_optim._csrc`, through package_dir mappings, so the source tree keeps
the layout of DESIGN.md while nothing is ever installed as a top-level `kernels` module.

By default nothing is compiled at install time: the C++ CPU kernels are built on first use.
`CL_OPTIM_BUILD_EXT=1 pip install --no-build-isolation .` builds them ahead of time as
`cl_optim._C_cpu`, and with a CUDA build of torch and a CUDA toolkit also the CUDA kernels as
`cl_optim._C_cuda` (it needs the torch it will run with, hence no build isolation).
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("CL_OPTIM_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "cl_optim._C_cpu",
            ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
            include_dirs=[os.path.abspath("csrc/include")],
            define_macros=[("CL_OPTIM_AOT", "1")],
            extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_modules.append(
            CUDAExtension(
                "cl_optim._C_cuda",
                ["csrc/bindings_cuda.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))],
                include_dirs=[os.path.abspath("csrc/include"), os.path.abspath("csrc")],
                define_macros=[("CL_OPTIM_AOT", "1")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=[
        "cl_optim",
        "cl_optim.fisher",
        "cl_optim.landscape",
        "cl_optim.multitask",
        "cl_optim.merge",
        "cl_optim.heads",
        "cl_optim.integrations",
        "cl_optim.kernels",
        "cl_optim._csrc",
    ],
    package_dir={"cl_optim": "cl_optim", "cl_optim.kernels": "kernels", "cl_optim._csrc": "csrc"},
    package_data={
        "cl_optim._csrc": [
            "*.cpp",
            "*.h",
            "include/cl_optim/*.h",
            "cpu/*.cpp",
            "cpu/*.h",
            "cuda/*.cu",
            "cuda/*.cuh",
            "cuda/*.h",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
