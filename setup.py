"""Installs the `petr` package from projects/PETR and builds its compiled op `petr._C`.

The C++ (CPU) kernel is always built. The CUDA kernel is added when a CUDA toolkit matching
torch is found and either a GPU is visible or FORCE_CUDA=1 is set (the usual Detectron2 rule).
Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch
already installed in the environment.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

PROJECT_ROOT = os.path.join("projects", "PETR")
CSRC = os.path.join(PROJECT_ROOT, "petr", "layers", "csrc")


def _want_cuda() -> bool:
    import torch

    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def get_extensions():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-std=c++17"]}
    extra_link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only runs in parallel in code compiled with OpenMP, like torch itself.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    extension = CppExtension
    sources = cpp_sources
    if _want_cuda() and cuda_sources:
        extension = CUDAExtension
        sources = cpp_sources + cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = [
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
    return [
        extension(
            "petr._C",
            sources,
            include_dirs=[os.path.abspath(CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="petr",
    version="0.1.0",
    description="PETR: end-to-end multi-person pose estimation with transformers, for Detectron2",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": PROJECT_ROOT},
    packages=find_packages(PROJECT_ROOT),
    install_requires=[
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "scipy>=1.10",
        "pycocotools>=2.0.7",
        "xtcocotools>=1.14",
        "opencv-python-headless>=4.8,<4.11",
        "tqdm",
    ],
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
