"""cffi build script for ``vchan._native`` (out-of-line API mode).

Run by setuptools through ``cffi_modules`` in ``setup.py``; never at import
time.  C lives in real ``.c``/``.h`` files; this file is only glue.
"""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to the project root.
    return os.path.relpath(os.path.join(ROOT, *parts), os.getcwd())


SOURCES = [_rel("vchan", "ring.c"), _rel("vchan", "splice.c"), _rel("vchan", "mux.c")] + [
    _rel("kernel", name) for name in ("common.c", "xen.c", "sim.c")
]
HEADERS = [
    _rel("vchan", "ring.h"),
    _rel("vchan", "splice.h"),
    _rel("vchan", "mux.h"),
    _rel("vchan", "_cdefs.h"),
    _rel("kernel", "kernel.h"),
    _rel("kernel", "sim_proto.h"),
]

ffibuilder = FFI()
with open(os.path.join(HERE, "_cdefs.h"), encoding="utf-8") as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "vchan._native",
    '#include "ring.h"\n#include "splice.h"\n#include "mux.h"\n#include "kernel.h"\n'
    '#include "sim_proto.h"\n',
    sources=SOURCES,
    depends=HEADERS,
    include_dirs=[_rel("vchan"), _rel("kernel")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
