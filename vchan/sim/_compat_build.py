"""Compiling the drop-in Xen libraries of ``kernel/compat`` (standard library only).

Used by :mod:`vchan.sim.compat` (on first use of ``vchan sim run``) and by
``setup.py`` (at wheel build time), which loads this file by path before
vchan itself is built: so it imports nothing from vchan.  The compiler
flags are in ``kernel/cflags.mk`` (:func:`read_flags`), which ``make -C
kernel/compat`` includes and the extension's build (``vchan/_native_build.py``)
reads too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# soname -> (its main source, its version script)
LIBRARIES = {
    "libxengnttab.so.1": ("gnttab.c", "libxengnttab.map"),
    "libxenevtchn.so.1": ("evtchn.c", "libxenevtchn.map"),
    "libxenctrl.so.4.17": ("ctrl.c", "libxenctrl.map"),
}
# Linked into every library: the device layer and the shared helpers.
COMMON = ("../common.c", "../sim.c", "../xen.c", "compat.c")
# The device layer's files the libraries are built from (kernel/), and theirs
# (kernel/compat/): what a wheel ships so that they can be built from it.
KERNEL_FILES = ("common.c", "sim.c", "xen.c", "kernel.h", "sim_proto.h", "cflags.mk")
COMPAT_FILES = ("compat.c", "compat.h", "gnttab.c", "evtchn.c", "ctrl.c",
                "libxengnttab.map", "libxenevtchn.map", "libxenctrl.map", "Makefile")
FLAGS_FILE = "cflags.mk"        # in kernel/, beside the device layer it compiles
XEN_HEADERS = ("xengnttab.h", "xenevtchn.h", "xenctrl.h")


class BuildError(Exception):
    """A library could not be compiled; the message says why in one line."""


def read_flags(kernel: Path) -> dict[str, list[str]]:
    """The variables of ``kernel/cflags.mk``: ``NAME = words`` lines, as lists of words."""
    path = kernel / FLAGS_FILE
    flags: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise BuildError(f"{path}: expected NAME = FLAGS, got {line!r}")
        flags[name.strip()] = value.split()
    return flags


def compiler() -> str:
    """The C compiler to use: ``$CC``, else ``cc``, ``gcc`` or ``clang``."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise BuildError("building the compat libraries needs a C compiler "
                     "(Debian: apt-get install gcc)")


def compile_all(src: Path, out: Path, cc: str | None = None) -> None:
    """Compile every library from ``src`` (a ``kernel/compat``) into ``out``.

    Each library is written to a temporary name and renamed into place, so a
    reader never sees half a file.
    """
    cc = cc or compiler()
    src, out = src.resolve(), out.resolve()     # the compiler runs in src
    flags = read_flags(src.parent)
    cflags = [*flags["VCHAN_CFLAGS"], *flags["VCHAN_COMPAT_CFLAGS"]]
    out.mkdir(parents=True, exist_ok=True)
    for name, (main, version_script) in LIBRARIES.items():
        tmp = out / f".{name}.{os.getpid()}.tmp"
        cmd = [cc, *cflags, "-I..", *flags["VCHAN_COMPAT_LDFLAGS"], f"-Wl,-soname,{name}",
               f"-Wl,--version-script={version_script}", "-o", str(tmp), main, *COMMON]
        done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(explain(name, cc, done.returncode, done.stderr))
        tmp.replace(out / name)


def explain(name: str, cc: str, status: int, stderr: str) -> str:
    """One line saying why compiling ``name`` failed."""
    if any(f"{h}: No such file" in stderr for h in XEN_HEADERS):
        return f"building {name} needs Xen's headers (Debian: apt-get install libxen-dev)"
    lines = [line for line in stderr.splitlines() if line.strip()]
    why = " | ".join(lines[-3:]) if lines else f"{cc} exited with status {status}"
    return f"building {name} failed: {why}"
