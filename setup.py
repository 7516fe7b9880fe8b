"""Builds lasp2 and its extension lasp2._C.

The extension compiles the framework-agnostic core (csrc/core) together with the
thin LibTorch binding (csrc/torch). With a CUDA build of torch and nvcc present,
the CUDA kernels and the NCCL communicator are compiled in; otherwise the build
is CPU-only. Build against the torch you already have:

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .

Environment: LASP2_FORCE_CPU=1 skips CUDA; LASP2_CUDA_ARCHS="80;90a" picks targets;
MAX_JOBS limits parallel compile jobs; LASP2_BUILD_BENCH=1 also builds lasp2._bench, the
communicator instruments that benchmarks/sp_providers.py and the provider tests use
(never part of lasp2._C).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    return [os.path.relpath(path, ROOT) for path in found]


def want_cuda(torch_module, cpp_extension):
    if os.environ.get("LASP2_FORCE_CPU", "0") == "1":
        return False
    return torch_module.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def nccl_paths():
    """nccl.h and libnccl from the nvidia-nccl wheel that CUDA builds of torch use."""
    try:
        import nvidia.nccl

        base = os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0]
    except ImportError:
        return None
    include, lib = os.path.join(base, "include"), os.path.join(base, "lib")
    if os.path.exists(os.path.join(include, "nccl.h")) and glob.glob(os.path.join(lib, "libnccl.so*")):
        return include, lib
    return None


def bench_module(cpp_extension, include_dirs, cxx_flags):
    """lasp2._bench: benchmark-only communicators over lasp2._C's Communicator."""
    return cpp_extension.CppExtension(
        "lasp2._bench", sources("csrc/bench/*.cpp", "csrc/core/types.cpp"), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags})


def extension_modules():
    import torch
    from torch.utils import cpp_extension

    core = sources("csrc/core/*.cpp", "csrc/core/cpu/*.cpp", "csrc/core/sp/*.cpp",
                   "csrc/core/delta_rule/*.cpp", "csrc/core/delta_rule/cpu/*.cpp")
    binding = sources("csrc/torch/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc/core/include"), os.path.join(ROOT, "csrc/core")]
    # The language standard is left to torch, whose headers may need a newer one.
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    define_macros = []

    extras = [bench_module(cpp_extension, include_dirs, cxx_flags)] if os.environ.get("LASP2_BUILD_BENCH") == "1" else []

    if not want_cuda(torch, cpp_extension):
        return [cpp_extension.CppExtension("lasp2._C", core + binding, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx_flags})] + extras

    archs = os.environ.get("LASP2_CUDA_ARCHS", "80;90a").split(";")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DLASP2_WITH_CUDA"]
    for arch in archs:
        nvcc_flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    define_macros.append(("LASP2_WITH_CUDA", None))
    extra_link_args = []
    cuda_sources = sources("csrc/core/cuda/*.cu", "csrc/core/cuda/*.cpp")
    cuda_sources += sources("csrc/core/delta_rule/cuda/*.cu", "csrc/core/delta_rule/cuda/*.cpp")
    nccl = nccl_paths()
    if nccl is not None:
        include_dirs.append(nccl[0])
        define_macros.append(("LASP2_WITH_NCCL", None))
        cuda_sources += sources("csrc/core/comm/*.cpp")
        extra_link_args += [f"-L{nccl[1]}", "-l:libnccl.so.2", f"-Wl,-rpath,{nccl[1]}"]
    return [cpp_extension.CUDAExtension(
        "lasp2._C", core + cuda_sources + binding, include_dirs=include_dirs,
        define_macros=define_macros, extra_link_args=extra_link_args,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})] + extras


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


needs_build = not any(arg in sys.argv for arg in ("egg_info", "sdist", "--version", "--name"))

# Metadata and packages live in pyproject.toml; this file only adds the extension.
setup(
    ext_modules=extension_modules() if needs_build else [],
    cmdclass={"build_ext": build_ext_class()} if needs_build else {},
    zip_safe=False,
)
