"""cffi build script for ``vchan._native`` (out-of-line API mode).

Run by setuptools through ``cffi_modules`` in ``setup.py``; never at import
time.  C lives in real ``.c``/``.h`` files; this file is only glue.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to the project root.
    return os.path.relpath(os.path.join(ROOT, *parts), os.getcwd())


SOURCES = [_rel("vchan", name) for name in ("ring.c", "splice.c", "mux.c", "session.c")] + [
    _rel("kernel", name) for name in ("common.c", "xen.c", "sim.c")
]
HEADERS = [
    _rel("vchan", "ring.h"),
    _rel("vchan", "splice.h"),
    _rel("vchan", "mux.h"),
    _rel("vchan", "session.h"),
    _rel("vchan", "_cdefs.h"),
    _rel("kernel", "kernel.h"),
    _rel("kernel", "sim_proto.h"),
    _rel("kernel", "cflags.mk"),
]

# The compiler flags are kept in kernel/cflags.mk, with those of the compat
# libraries; their build script (standard library only: vchan is not built
# yet) reads the file.
_compat_build = runpy.run_path(os.path.join(HERE, "sim", "_compat_build.py"))
CFLAGS: list[str] = _compat_build["read_flags"](Path(ROOT, "kernel"))["VCHAN_CFLAGS"]

ffibuilder = FFI()
with open(os.path.join(HERE, "_cdefs.h"), encoding="utf-8") as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "vchan._native",
    '#include "ring.h"\n#include "splice.h"\n#include "mux.h"\n#include "session.h"\n'
    '#include "kernel.h"\n'
    '#include "sim_proto.h"\n',
    sources=SOURCES,
    depends=HEADERS,
    include_dirs=[_rel("vchan"), _rel("kernel")],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
