"""Build of cnnext's C++/CUDA extension (cnnext._C) with torch.utils.cpp_extension.

CUDA kernels are compiled when torch is a CUDA build and nvcc is found, or when
FORCE_CUDA=1 (a GPU-less host can build them); CNNEXT_CPU_ONLY=1 turns them off.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch.utils.cpp_extension.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def decide_cuda():
    if flag("CNNEXT_CPU_ONLY"):
        return False, "CNNEXT_CPU_ONLY=1"
    if flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit(f"cnnext: FORCE_CUDA=1 needs a CUDA build of torch to link against; torch {torch.__version__} is CPU-only "
                     "(the CUDA sources alone compile without one: bash scripts/nvcc_check.sh)")
        if CUDA_HOME is None:
            sys.exit("cnnext: FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
        return True, f"FORCE_CUDA=1, CUDA toolkit at {CUDA_HOME}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return False, f"torch is a CUDA {torch.version.cuda} build but no nvcc was found"
    return True, f"torch is a CUDA {torch.version.cuda} build and nvcc is at {CUDA_HOME}"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def make_extension():
    with_cuda, why = decide_cuda()
    srcs = sources("csrc/*.cpp") + sources("csrc/ops/*.cpp") + sources("csrc/cpu/*.cpp")
    # at::parallel_for is an OpenMP region compiled into this extension (torch's CPU
    # builds use OpenMP): without -fopenmp every parallel_for here would run serially.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    macros = []
    if with_cuda:
        srcs += sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
        macros.append(("CNNEXT_WITH_CUDA", None))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch's default for the visible GPU or its build)")
        print(f"cnnext: building CPU + CUDA kernels ({why}); TORCH_CUDA_ARCH_LIST={arch}")
        return CUDAExtension(
            "cnnext._C",
            srcs,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    print(f"cnnext: building CPU kernels only ({why})")
    return CppExtension(
        "cnnext._C",
        srcs,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    name="cnnext",
    version="0.1.0",
    description="Hand-written CNN kernels for PyTorch (CPU and CUDA)",
    packages=find_packages(include=["cnnext", "cnnext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    zip_safe=False,
)
