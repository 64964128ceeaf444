"""Installs the `petr` package from projects/PETR and builds its compiled op `petr._C`.

The C++ (CPU) kernel is always built. The CUDA kernel is added, through torch's CUDAExtension,
when a CUDA toolkit is found and either a GPU is visible or FORCE_CUDA=1 is set (the usual
Detectron2 rule). A toolkit whose CUDA major version differs from torch's cannot build against
torch's headers, so then the CPU kernel alone is built, with one warning naming both versions.
The C++ standard is left to torch's BuildExtension (C++17 up to torch 2.5, C++20 on current torch,
whose headers refuse anything older).

Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch
already installed in the environment.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

import torch
from setuptools import find_packages, setup

PROJECT_ROOT = os.path.join("projects", "PETR")
CSRC = os.path.join(PROJECT_ROOT, "petr", "layers", "csrc")


def _warn(message):
    # One line on stderr: shown by `python setup.py ...` and `pip install -v`.
    print(f"WARNING: petr setup.py: {message}", file=sys.stderr)


def _nvcc_toolkit():
    """(toolkit folder, "major.minor") of the nvcc that would build, or (None, None).

    `CUDA_HOME` wins; otherwise the `nvcc` on PATH is asked where its toolkit lives (it may be a
    wrapper script, so the folder above it is not necessarily the toolkit, which torch assumes).
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else "nvcc"
    try:
        version = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=True
        ).stdout
        if home is None:
            with tempfile.TemporaryDirectory() as tmp:
                empty = os.path.join(tmp, "empty.cu")
                open(empty, "w").close()
                dryrun = subprocess.run(
                    [nvcc, "--dryrun", "-c", empty, "-o", os.path.join(tmp, "empty.o")],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stderr
            top = re.search(r"^#\$ TOP=(.+)$", dryrun, re.MULTILINE)
            home = os.path.realpath(top.group(1).strip()) if top else None
    except (OSError, subprocess.CalledProcessError):
        return None, None
    release = re.search(r"release (\d+\.\d+)", version)
    return home, (release.group(1) if release else None)


# Library headers that torch's CUDA headers include and a bare nvcc toolkit lacks.
_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")


def _wheel_cuda_include_dirs(toolkit):
    """Folders of the venv's nvidia-* wheels holding the library headers torch's CUDA headers
    include, for each one the toolkit itself lacks. CUDA 13 wheels keep them all in
    nvidia/cu13/include, CUDA 12 wheels one folder per library (nvidia/cusparse/include, ...)."""
    found = []
    for header in _LIBRARY_HEADERS:
        if os.path.exists(os.path.join(toolkit, "include", header)):
            continue
        hits = [
            h
            for site in sys.path
            for h in glob.glob(os.path.join(site, "nvidia", "*", "include", header))
        ]
        if hits and os.path.dirname(hits[0]) not in found:
            found.append(os.path.dirname(hits[0]))
    return found


def _cuda_build_plan():
    """Whether to build the CUDA kernel; sets CUDA_HOME / CPATH for torch's BuildExtension."""
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if not (forced or torch.cuda.is_available()):
        return False
    toolkit, nvcc_version = _nvcc_toolkit()
    if toolkit is None or nvcc_version is None:
        if forced:
            _warn("FORCE_CUDA=1 but no nvcc was found: building the CPU kernel only")
        return False
    if torch.version.cuda is None:
        _warn(
            f"CUDA toolkit {nvcc_version} found, but torch {torch.__version__} is a CPU build: "
            "building the CPU kernel only"
        )
        return False
    if nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        _warn(
            f"CUDA toolkit {nvcc_version} ({toolkit}) and torch's CUDA {torch.version.cuda} differ "
            "in major version, which torch's BuildExtension cannot build against: building the "
            f"CPU kernel only. Point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x "
            "toolkit for the CUDA kernel."
        )
        return False
    os.environ.setdefault("CUDA_HOME", toolkit)
    extra = _wheel_cuda_include_dirs(os.environ["CUDA_HOME"])
    if extra:
        cpath = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
        os.environ["CPATH"] = os.pathsep.join(cpath + [d for d in extra if d not in cpath])
    return True


def get_extensions():
    with_cuda = _cuda_build_plan()
    # Imported after _cuda_build_plan: the module reads CUDA_HOME once, at import.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    define_macros = []
    extra_compile_args = {"cxx": ["-O3"]}
    extra_link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only runs in parallel in code compiled with OpenMP, like torch itself.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    extension = CppExtension
    sources = cpp_sources
    if with_cuda and cuda_sources:
        extension = CUDAExtension
        sources = cpp_sources + cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = [
            "-O3",
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


ext_modules = get_extensions()
from torch.utils.cpp_extension import BuildExtension  # noqa: E402  (after CUDA_HOME is set)

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
        "opencv-python-headless>=4.8,<5",
        "tqdm",
    ],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
