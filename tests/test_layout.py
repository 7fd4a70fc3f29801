"""The shared control page is byte-identical to libxenvchan's.

A small C program is compiled twice, once against Debian's
``xen/io/libxenvchan.h`` (package libxen-dev) and once against our
``vchan/ring.h``, and each prints the offset and size of every field.  Both
must agree with each other, with the values cffi compiled into
``vchan._native``, and with the published table.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support import c_compiler, need
from vchan._native import ffi, lib

XEN_HEADER = "/usr/include/xen/io/libxenvchan.h"
RING_H = Path(__file__).resolve().parent.parent / "vchan" / "ring.h"

# The published layout (offset, size); grants is a flexible array of u32.
EXPECTED = {
    "left.cons": (0, 4),
    "left.prod": (4, 4),
    "right.cons": (8, 4),
    "right.prod": (12, 4),
    "left_order": (16, 2),
    "right_order": (18, 2),
    "cli_live": (20, 1),
    "srv_live": (21, 1),
    "cli_notify": (22, 1),
    "srv_notify": (23, 1),
    "grants": (24, 4),
}

PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include HEADER

#define FIELD(f) printf("%s\"%s\": [%zu, %zu]", first ? "" : ", ", #f, \
    offsetof(struct vchan_interface, f), sizeof(((struct vchan_interface *)0)->f))
#define GRANT() printf(", \"grants\": [%zu, %zu]", \
    offsetof(struct vchan_interface, grants), sizeof(((struct vchan_interface *)0)->grants[0]))

int main(void)
{
    int first = 1;
    printf("{\"fields\": {");
    FIELD(left.cons); first = 0;
    FIELD(left.prod); FIELD(right.cons); FIELD(right.prod);
    FIELD(left_order); FIELD(right_order); FIELD(cli_live); FIELD(srv_live);
    FIELD(cli_notify); FIELD(srv_notify); GRANT();
    printf("}, \"sizeof\": %zu, \"sizeof_ring_shared\": %zu, "
           "\"notify_write\": %d, \"notify_read\": %d}\n",
           sizeof(struct vchan_interface), sizeof(SHARED), VCHAN_NOTIFY_WRITE,
           VCHAN_NOTIFY_READ);
    return 0;
}
"""


def _layout(tmp_path: Path, header: str, shared: str, name: str) -> dict[str, object]:
    cc = c_compiler()
    need(cc, "no C compiler")
    assert cc is not None
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(PROGRAM)
    subprocess.run(
        [cc, "-std=gnu11", "-Wall", f"-DHEADER=<{header}>" if header.startswith("xen/")
         else f'-DHEADER="{header}"', f"-DSHARED={shared}", "-o", str(exe), str(src)],
        check=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


@pytest.fixture(scope="module")
def xen_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    need(os.path.exists(XEN_HEADER), f"{XEN_HEADER} missing (install Debian's libxen-dev)")
    return _layout(tmp_path_factory.mktemp("xen"), "xen/io/libxenvchan.h",
                   "struct ring_shared", "xen_layout")


@pytest.fixture(scope="module")
def our_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return _layout(tmp_path_factory.mktemp("ours"), str(RING_H),
                   "struct vchan_ring_shared", "our_layout")


def test_xen_header_matches_published_table(xen_layout: dict[str, object]) -> None:
    fields = xen_layout["fields"]
    assert isinstance(fields, dict)
    assert {k: tuple(v) for k, v in fields.items()} == EXPECTED
    assert xen_layout["sizeof"] == 24


def test_ring_h_matches_xen_header(xen_layout: dict[str, object],
                                   our_layout: dict[str, object]) -> None:
    assert our_layout == xen_layout


def _cffi_layout() -> dict[str, tuple[int, int]]:
    """Field offsets and sizes as compiled into vchan._native."""
    out: dict[str, tuple[int, int]] = {}
    for name, field in ffi.typeof("struct vchan_interface").fields:
        if name in ("left", "right"):
            for sub, subfield in field.type.fields:
                out[f"{name}.{sub}"] = (field.offset + subfield.offset,
                                        ffi.sizeof(subfield.type))
        elif name == "grants":
            out[name] = (field.offset, ffi.sizeof(field.type.item))
        else:
            out[name] = (field.offset, ffi.sizeof(field.type))
    return out


def test_compiled_extension_matches_xen_header(xen_layout: dict[str, object]) -> None:
    fields = xen_layout["fields"]
    assert isinstance(fields, dict)
    assert _cffi_layout() == {k: tuple(v) for k, v in fields.items()}
    assert ffi.sizeof("struct vchan_interface") == xen_layout["sizeof"]
    assert xen_layout["notify_write"] == lib.VCHAN_NOTIFY_WRITE
    assert xen_layout["notify_read"] == lib.VCHAN_NOTIFY_READ


def test_ring_placement_constants() -> None:
    assert (lib.VCHAN_SMALL_OFFSET, lib.VCHAN_LARGE_OFFSET) == (1024, 2048)
    assert (lib.VCHAN_MIN_ORDER, lib.VCHAN_MAX_ORDER) == (10, 20)
    assert (lib.VCHAN_OFFSET_CLI_LIVE, lib.VCHAN_OFFSET_SRV_LIVE) == (20, 21)
    # The grant list for two order-20 rings (2 x 256 pages) fits page 0.
    assert ffi.offsetof("struct vchan_interface", "grants") + 512 * 4 <= lib.VCHAN_PAGE_SIZE
