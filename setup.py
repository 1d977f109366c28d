import glob
import os
import re
import subprocess
import sys

from setuptools import setup

# ---------------------------------------------------------------------------------------------
# The C++/CUDA extension switch_dit._C (csrc/). It needs torch at build time, so install with
# `pip install -e . --no-build-isolation`. It is optional: where torch cannot be imported, no
# compiler works or the build fails, the package still installs and switch_dit.routing falls
# back to its pure-PyTorch implementation with one warning.
#   SWITCH_DIT_BUILD_EXTENSION=0  skip the extension
#   SWITCH_DIT_BUILD_CUDA=0       build the CPU kernels only
#   TORCH_CUDA_ARCH_LIST          CUDA architectures (default here "8.0;9.0": A100, H100/H200)
#   MAX_JOBS                      parallel compile jobs (default here 2)
# ---------------------------------------------------------------------------------------------
_CSRC = "csrc"
_CPU_SOURCES = [f"{_CSRC}/binding.cpp", f"{_CSRC}/routing_plan_cpu.cpp", f"{_CSRC}/token_grouping_cpu.cpp"]
_CUDA_SOURCES = [f"{_CSRC}/routing_plan_cuda.cu", f"{_CSRC}/token_grouping_cuda.cu"]
_CUDA_DEFINE = "-DSWITCH_DIT_WITH_CUDA"


def _note(msg):
    print(f"switch-dit setup: {msg}", file=sys.stderr)


def _nvcc_major(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else None


def _cuda_home_with_headers(guess):
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc)
    makes it guess /usr/local. Take the first candidate that has both nvcc and the runtime headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), guess, "/usr/local/cuda"]
    for home in candidates:
        if home and all(os.path.exists(os.path.join(home, f)) for f in ("bin/nvcc", "include/cuda_runtime_api.h")):
            return home
    return None


def _nvidia_wheel_include_dirs(cuda_home):
    """Include folders of the pip NVIDIA packages, for CUDA toolkits that lack the cuBLAS /
    cuSPARSE headers torch's CUDA headers include. Appended last, so the toolkit's own headers win."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h")):
                found.append(inc)
    return found


def _extension_build():
    """(ext_modules, cmdclass) for switch_dit._C, or ([], {}) when it cannot be built."""
    if os.environ.get("SWITCH_DIT_BUILD_EXTENSION", "1") == "0":
        _note("SWITCH_DIT_BUILD_EXTENSION=0: not building the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # e.g. pip build isolation hides torch
        _note(
            f"torch is not importable at build time ({exc}); not building the C++ extension "
            "(install with --no-build-isolation to build it)"
        )
        return [], {}

    os.environ.setdefault("MAX_JOBS", "2")
    use_cuda = os.environ.get("SWITCH_DIT_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
    if use_cuda:
        cuda_home = _cuda_home_with_headers(cpp_extension.CUDA_HOME)
        nvcc_major = _nvcc_major(cuda_home) if cuda_home else None
        if nvcc_major is None:
            _note("no CUDA toolkit with nvcc and headers found: building the CPU kernels only")
            use_cuda = False
        elif nvcc_major != int(torch.version.cuda.split(".")[0]):
            _note(
                f"nvcc is CUDA {nvcc_major} but torch is built with CUDA {torch.version.cuda}: "
                "building the CPU kernels only"
            )
            use_cuda = False

    cxx = ["-O2", "-DSWITCH_DIT_PYTHON_MODULE"]

    # optional=True: setuptools then skips, instead of failing on, a library that was not built
    # when an editable install copies it into the source tree.
    def cpu_extension():
        return cpp_extension.CppExtension(
            "switch_dit._C", list(_CPU_SOURCES), extra_compile_args={"cxx": list(cxx)}, optional=True
        )

    if use_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # read by torch's include/library path helpers
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "switch_dit._C",
            _CPU_SOURCES + _CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + [_CUDA_DEFINE], "nvcc": ["-O2", _CUDA_DEFINE]},
            optional=True,
        )
        ext.include_dirs.extend(_nvidia_wheel_include_dirs(cuda_home))
    else:
        ext = cpu_extension()

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Never fails the install: a failed CUDA build is retried CPU-only, a failed CPU build
        leaves the package without the extension (it then falls back to PyTorch)."""

        def build_extensions(self):
            try:
                return super().build_extensions()
            except Exception as exc:
                _note(f"building switch_dit._C failed: {exc}")
            if any(s.endswith(".cu") for e in self.extensions for s in e.sources):
                # Turn the extension into the CPU one in place: setuptools keeps private state
                # on the object it finalised.
                cpu = cpu_extension()
                for e in self.extensions:
                    for attr in (
                        "sources",
                        "include_dirs",
                        "library_dirs",
                        "libraries",
                        "extra_compile_args",
                        "extra_link_args",
                        "define_macros",
                    ):
                        setattr(e, attr, getattr(cpu, attr))
                _note("retrying with the CPU kernels only")
                try:
                    return super().build_extensions()
                except Exception as exc:
                    _note(f"the CPU-only build failed too: {exc}")
            _note("installing without switch_dit._C; switch_dit.routing will use PyTorch")
            # An editable install may have left an older library in the tree: that one would
            # not match the sources any more.
            pkg_dir = self.get_finalized_command("build_py").get_package_dir("switch_dit")
            stale = os.path.join(pkg_dir, os.path.basename(self.get_ext_filename("switch_dit._C")))
            if os.path.exists(stale):
                os.remove(stale)
                _note(f"removed the stale {stale}")

    return [ext], {"build_ext": OptionalBuildExtension}


_ext_modules, _cmdclass = _extension_build()

# The Triton kernels live in the top-level ``kernels/`` folder of the repository but
# are installed as ``switch_dit.kernels`` (no generic top-level ``kernels`` module).
setup(
    packages=["switch_dit", "switch_dit.ops", "switch_dit.kernels"],
    package_dir={"switch_dit": "switch_dit", "switch_dit.kernels": "kernels"},
    ext_modules=_ext_modules,
    cmdclass=_cmdclass,
)
