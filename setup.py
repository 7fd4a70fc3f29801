"""What pyproject.toml cannot say: the cffi extension, the wheel's tag, and
the drop-in Xen libraries a wheel carries for ``vchan sim run``.

* ``cffi_modules``: cffi's setuptools hook builds ``vchan._native``.
* ``ext_modules``: ``vchan._reader``, the StreamReader's per-call fast paths
  (CPython's C API: they make Python objects, which cffi does not).
* Both extensions are built for the stable ABI (``*.abi3.so``), so the
  wheel is tagged ``cp311-abi3``: one wheel for Python 3.11 and later.
* ``build_py`` copies the C sources of the device layer (``kernel/``) and
  of the drop-in libraries (``kernel/compat/``) into the package as
  ``vchan/_kernel``, and compiles the libraries into
  ``vchan/_kernel/compat/lib`` when Xen's headers are there (Debian:
  libxen-dev).  Without them the wheel still builds, and ``vchan sim run``
  compiles the libraries on first use into a per-user cache
  (``vchan/sim/compat.py``).  ``VCHAN_PREBUILD_COMPAT=1`` makes a failure
  to prebuild an error (``scripts/build-dist`` sets it), ``=0`` skips it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _compat_build() -> ModuleType:
    # vchan is not built yet: load its standard-library-only build helper by path.
    path = HERE / "vchan" / "sim" / "_compat_build.py"
    spec = importlib.util.spec_from_file_location("_vchan_compat_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernel(build_py):
    """build_py, plus ``vchan/_kernel`` (sources and, if possible, the libraries)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return      # an editable install builds from kernel/compat of the checkout
        cb = _compat_build()
        dest = Path(self.build_lib) / "vchan" / "_kernel"
        (dest / "compat").mkdir(parents=True, exist_ok=True)
        for name in cb.KERNEL_FILES:
            shutil.copy2(HERE / "kernel" / name, dest / name)
        for name in cb.COMPAT_FILES:
            shutil.copy2(HERE / "kernel" / "compat" / name, dest / "compat" / name)
        mode = os.environ.get("VCHAN_PREBUILD_COMPAT", "auto")
        if mode == "0":
            return
        try:
            cb.compile_all(dest / "compat", dest / "compat" / "lib")
        except cb.BuildError as exc:
            if mode == "1":
                raise SystemExit(f"vchan: prebuilding the compat libraries: {exc}") from None
            print(f"vchan: not prebuilding the compat libraries ({exc}); "
                  "vchan sim run builds them on first use")


def _reader_extension() -> Extension:
    flags = _compat_build().read_flags(HERE / "kernel")["VCHAN_CFLAGS"]
    return Extension("vchan._reader", ["vchan/_reader.c"], py_limited_api=True,
                     depends=["vchan/mux.h", "vchan/ring.h"],
                     define_macros=[("Py_LIMITED_API", "0x030B0000")],
                     extra_compile_args=flags)


setup(
    cffi_modules=["vchan/_native_build.py:ffibuilder"],
    ext_modules=[_reader_extension()],
    cmdclass={"build_py": BuildPyWithKernel},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
