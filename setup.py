"""Builds the C kernel extension `powerinfer._C` (plain CPython extension, not linked against torch).

ISA-specific code is compiled with per-function target attributes and chosen at run time by CPU
feature detection, so one build runs on any x86-64 (and the portable path anywhere else).
"""
import glob
import platform

from setuptools import Extension, setup

# -O2 plus explicit vectorisation: GCC 12 at -O3 mis-vectorises the plain one-row axpy
# (3-4x slower, reference/kernels.md section 9.3).
extra = ["-O2", "-std=c11", "-fno-strict-aliasing", "-Wno-unused-function"]
libs = []
if platform.system() != "Windows":
    extra.append("-pthread")
    libs.append("pthread")
    libs.append("m")

setup(
    ext_modules=[
        Extension(
            "powerinfer._C",
            sources=sorted(glob.glob("src/powerinfer/kernels/csrc/*.c")),
            include_dirs=["src/powerinfer/kernels/csrc"],
            # every object is rebuilt when a header changes (without this an incremental build keeps objects
            # compiled against the old header)
            depends=sorted(glob.glob("src/powerinfer/kernels/csrc/*.h")),
            extra_compile_args=extra,
            extra_link_args=["-pthread"] if platform.system() != "Windows" else [],
            libraries=libs,
        )
    ]
)
