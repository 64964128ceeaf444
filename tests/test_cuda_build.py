"""A real `FORCE_CUDA=1` build of petr._C through setup.py and torch's BuildExtension.

No GPU is needed to compile and link. Where nvcc's CUDA major version matches torch's (the
default stack: torch cu130, nvcc 13.0), the CUDA kernel must be built: the result is imported in
a fresh Python, `has_cuda()` must be true and the CUDA entry points must be in the library.
Where they differ (the floor stack: torch cu121 with nvcc 13.0), setup.py must build the CPU
kernel instead, with one warning naming both versions.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("petr._C", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
print("has_cuda", ext.has_cuda())
"""


def _nvcc_major():
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+)\.", out)
    return release.group(1) if release else None


def _build(tmp_path):
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2")
    env.pop("CUDA_HOME", None)  # setup.py must find the toolkit from nvcc itself
    cmd = [sys.executable, "setup.py", "build_ext"]
    cmd += ["--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    (lib,) = glob.glob(str(tmp_path / "lib" / "petr" / "_C*.so"))
    return lib, log


def _has_cuda(lib):
    res = subprocess.run([sys.executable, "-c", IMPORT, lib], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().endswith("True")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch has no CUDA to match")
def test_force_cuda_build(tmp_path):
    lib, log = _build(tmp_path)
    mismatch = [line for line in log.splitlines() if "differ in major version" in line]
    if _nvcc_major() == torch.version.cuda.split(".")[0]:
        assert not mismatch, mismatch
        assert _has_cuda(lib), "a FORCE_CUDA=1 build with a matching toolkit lacks CUDA"
        nm = subprocess.run(["nm", "-DC", lib], capture_output=True, text=True, check=True)
        for entry in ("ms_deform_attn_forward_cuda", "ms_deform_attn_backward_cuda"):
            assert entry in nm.stdout, f"{entry} missing from {lib}"
        assert "libcudart" in subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    else:
        assert len(mismatch) == 1, log[-3000:]
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        assert re.search(r"release (\d+\.\d+)", nvcc).group(1) in mismatch[0]
        assert torch.version.cuda in mismatch[0]
        assert not _has_cuda(lib), "a mismatched toolkit must give the CPU kernel only"
