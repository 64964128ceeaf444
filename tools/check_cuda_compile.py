"""Compile petr._C's CUDA sources without a GPU, to catch errors in code no CPU test runs.

torch's BuildExtension refuses a CUDA toolkit whose major version differs from torch's, and the
PyPI nvcc wheels ship no nvcc driver, so this calls the `nvcc` on PATH directly, the way
setup.py's CUDAExtension would (same defines and flags), for sm_90:
  * every .cu under projects/PETR/petr/layers/csrc, with nvcc;
  * every .cpp there, with the host compiler and -DWITH_CUDA (the bindings and the dispatch then
    call the CUDA entry points);
  * then links them with torch's libraries into a CUDA build of petr._C and imports it in a fresh
    Python, which proves every symbol resolves (`has_cuda()` must be True; no GPU is touched).
torch's CUDA headers include cuSPARSE, cuBLAS and cuSOLVER headers that a bare nvcc lacks; they
are copied from the venv's nvidia-* wheels into a private temporary folder (adding those wheels'
include folders wholesale would shadow the toolkit's own CUDA runtime headers).

Exits 0 when everything compiles, links and imports, 1 on an error (the compiler output is
printed), 2 when nvcc or the CUDA wheels are missing.

    python tools/check_cuda_compile.py [--arch 90] [--keep DIR] [--csrc DIR]
"""

import argparse
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch.utils.cpp_extension import include_paths, library_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "projects", "PETR", "petr", "layers", "csrc")
# Keep in sync with setup.py's CUDAExtension arguments.
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC"]
LIBRARY_HEADERS = {"cusparse": "cusparse*.h", "cublas": "cublas*.h", "cusolver": "cusolver*.h"}
TORCH_LIBS = ["c10", "torch", "torch_cpu", "torch_python", "c10_cuda", "torch_cuda"]
IMPORT_CHECK = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
assert ext.has_cuda(), "has_cuda() is False in a WITH_CUDA build"
"""


def _defines():
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-DWITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]


def _copy_library_headers(dest):
    """Copy the cuSPARSE/cuBLAS/cuSOLVER headers of the nvidia-* wheels into `dest`."""
    import nvidia  # namespace package of the nvidia-*-cu12 wheels torch depends on

    for lib, pattern in LIBRARY_HEADERS.items():
        found = []
        for root in nvidia.__path__:
            found += glob.glob(os.path.join(root, lib, "include", pattern))
        if not found:
            raise FileNotFoundError(f"no {pattern} under nvidia/{lib}/include in {nvidia.__path__}")
        for path in found:
            shutil.copy(path, dest)


def _run(cmd, label):
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"FAIL {label} ({took:.0f} s)\n$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        return False
    print(f"ok   {label} ({took:.0f} s)")
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability to build for (90)")
    parser.add_argument("--keep", help="write the objects here instead of a temporary folder")
    parser.add_argument("--csrc", default=CSRC, help="source folder to check (petr's csrc)")
    args = parser.parse_args()

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc is not on PATH: cannot check the CUDA sources")
        return 2
    cu_files = sorted(glob.glob(os.path.join(args.csrc, "**", "*.cu"), recursive=True))
    cpp_files = sorted(glob.glob(os.path.join(args.csrc, "**", "*.cpp"), recursive=True))
    if not cu_files:
        print(f"no .cu files under {args.csrc}")
        return 1
    with tempfile.TemporaryDirectory(prefix="petr_cuda_check_") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        extra_inc = os.path.join(tmp, "include")
        os.makedirs(extra_inc)
        try:
            _copy_library_headers(extra_inc)
        except (ImportError, FileNotFoundError) as e:
            print(f"cannot find the CUDA library headers: {e}")
            return 2
        includes = [args.csrc, *include_paths(cuda=False), sysconfig.get_paths()["include"]]
        inc_flags = [f"-I{p}" for p in [*includes, extra_inc]]
        jobs, objects = [], []
        for i, path in enumerate(cu_files + cpp_files):
            obj = os.path.join(out_dir, f"{i}_{os.path.basename(path)}.o")
            objects.append(obj)
            if path.endswith(".cu"):
                cmd = [nvcc, "-c", path, "-o", obj, *NVCC_FLAGS, *_defines(), *inc_flags]
                cmd += ["-gencode", f"arch=compute_{args.arch},code=sm_{args.arch}"]
                cmd += ["-Xcompiler", "-fPIC"]
            else:
                cxx = os.environ.get("CXX", "c++")
                cmd = [cxx, "-c", path, "-o", obj, *CXX_FLAGS, *_defines(), *inc_flags]
            jobs.append((cmd, os.path.relpath(path, args.csrc)))
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            ok = all(list(pool.map(lambda job: _run(*job), jobs)))
        if ok:
            lib = os.path.join(out_dir, "_C.so")
            lib_flags = [f"-L{p}" for p in library_paths(cuda=False)]
            lib_flags += [f"-l{name}" for name in TORCH_LIBS]
            ok = _run([nvcc, "-shared", "-o", lib, *objects, *lib_flags], "link _C.so")
            ok = ok and _run([sys.executable, "-c", IMPORT_CHECK, lib], "import _C.so, has_cuda()")
    print("CUDA build of petr._C compiles, links and imports" if ok else "errors above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
