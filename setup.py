"""Build of cnnext's C++/CUDA extension (cnnext._C) with torch.utils.cpp_extension.

CUDA kernels are compiled when torch is a CUDA build and a CUDA toolkit is found, or
when FORCE_CUDA=1 (a GPU-less host can build them); CNNEXT_CPU_ONLY=1 turns them off.
The toolkit is $CUDA_HOME, else the one the nvcc on PATH belongs to (see find_cuda_home).
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch.utils.cpp_extension.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def is_toolkit(folder):
    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(folder, "bin", "nvcc")) or os.path.isfile(os.path.join(folder, "bin", "nvcc.exe")))


def find_cuda_home():
    """(the CUDA toolkit's folder, with bin/nvcc and include/cuda_runtime.h, or None; why not).

    CUDA_HOME (or CUDA_PATH) wins when set, and must be a toolkit. Otherwise the nvcc on
    PATH decides. torch.utils.cpp_extension takes the parent of nvcc's folder, which is
    wrong when nvcc is a wrapper script or a symlink outside the toolkit (e.g.
    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), so: nvcc's real path
    first, then the toolkit nvcc itself reports (`nvcc --dryrun` prints `TOP=<toolkit>`),
    then /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if not is_toolkit(home):
                return None, f"{var}={home} has no bin/nvcc or no include/cuda_runtime.h"
            return os.path.abspath(home), None
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit(home):
            return home, None
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            found = re.search(r"^#\$ TOP=(.+?)\s*$", out.stdout + out.stderr, re.M)
        except (OSError, subprocess.SubprocessError):
            found = None
        if found and is_toolkit(os.path.normpath(found.group(1))):
            return os.path.normpath(found.group(1)), None
        return None, f"the nvcc on PATH ({nvcc}) is not inside a CUDA toolkit and did not say where its toolkit is"
    if is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", None
    return None, "there is no nvcc on PATH and no toolkit at /usr/local/cuda"


# torch.utils.cpp_extension computes its CUDA_HOME when imported (and CUDAExtension and
# BuildExtension read that module attribute): set the environment before the import,
# and the attribute too in case something imported it earlier.
CUDA_HOME, NO_TOOLKIT_WHY = (None, "CNNEXT_CPU_ONLY=1") if flag("CNNEXT_CPU_ONLY") else find_cuda_home()
if CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
import torch.utils.cpp_extension as cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if CUDA_HOME is not None and torch.version.cuda is not None:
    cpp_extension.CUDA_HOME = CUDA_HOME

NO_TOOLKIT = (f"no CUDA toolkit was found ({NO_TOOLKIT_WHY}): set CUDA_HOME to the toolkit's folder (the one with bin/nvcc and "
              "include/cuda_runtime.h, e.g. CUDA_HOME=/usr/local/cuda-13.0), or put its nvcc on PATH")


def decide_cuda():
    if flag("CNNEXT_CPU_ONLY"):
        return False, "CNNEXT_CPU_ONLY=1"
    if flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit(f"cnnext: FORCE_CUDA=1 needs a CUDA build of torch to link against; torch {torch.__version__} is CPU-only "
                     "(the CUDA sources alone compile without one: bash scripts/nvcc_check.sh)")
        if CUDA_HOME is None:
            sys.exit(f"cnnext: FORCE_CUDA=1 but {NO_TOOLKIT}")
        return True, f"FORCE_CUDA=1, CUDA toolkit at {CUDA_HOME}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        print(f"cnnext: warning: torch is a CUDA {torch.version.cuda} build but {NO_TOOLKIT}; building CPU kernels only")
        return False, f"torch is a CUDA {torch.version.cuda} build but no CUDA toolkit was found"
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
    # Extras. torchvision (the model-level tests; mnist / fashion-mnist / cifar10 / folder:
    # data for `train`) is installed apart, with `pip install --no-deps torchvision==...`
    # (see README.md), so that pip never swaps torch.
    extras_require={"test": ["pytest", "hypothesis", "pytest-benchmark", "pillow", "expecttest"],
                    "train": ["tqdm", "matplotlib", "scikit-learn"],
                    "bench": ["tqdm", "matplotlib", "pytest-benchmark"]},
    zip_safe=False,
)
