"""The streams matrix in the report: its targets, its section, its plot.

Pure functions of the results dict, as the rest of :mod:`vchan.bench.report`;
the measuring half is :mod:`vchan.bench.matrix`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .common import Json, human_size
from .matrix import (
    LIMITS,
    READ_TEXT,
    READS,
    SMALL_WRITES,
    TARGET_BIG,
    TARGET_FLOOR,
    TARGET_SMALL,
    WRITE_TEXT,
    WRITES,
    cell_na,
    write_target,
)
from .results import fmt_mbps, md_table, num, rows_of


def _msettings(results: Json) -> Json:
    s = results.get("settings")
    m = s.get("matrix") if isinstance(s, dict) else None
    return m if isinstance(m, dict) else {}


def _present(canonical: Iterable[Any], seen: Iterable[Any]) -> list[Any]:
    """The values in ``seen``: those of ``canonical`` first, in its order, then the rest."""
    have = [x for x in dict.fromkeys(seen) if x is not None]
    out = [x for x in canonical if x in have]
    extra = [x for x in have if x not in out]
    with contextlib.suppress(TypeError):
        extra.sort()
    return out + extra


def _axes(results: Json) -> tuple[list[str], list[int], list[str], list[str]]:
    """(loops, limits, reads, writes) with data, in their canonical order."""
    rows = rows_of(results, "matrix")
    s = _msettings(results)
    top = results.get("settings")
    top_loops = top.get("loops") if isinstance(top, dict) else None

    def canon(value: Any, default: Sequence[Any]) -> list[Any]:
        return list(value) if isinstance(value, list) else list(default)

    return (_present(canon(top_loops, ("asyncio", "uvloop")), (r.get("loop") for r in rows)),
            _present(canon(s.get("limits"), LIMITS), (r.get("limit") for r in rows)),
            _present(canon(s.get("reads"), READS), (r.get("read") for r in rows)),
            _present(canon(s.get("writes"), WRITES), (r.get("write") for r in rows)))


def _na_cells(results: Json, limits: list[int], reads: list[str], writes: list[str]
              ) -> set[tuple[Any, ...]]:
    """(limit, read, write) of the n/a cells: as the run recorded them, else by the rule."""
    recorded = _msettings(results).get("na")
    if isinstance(recorded, list):
        return {(c.get("limit"), c.get("read"), c.get("write")) for c in recorded
                if isinstance(c, dict)}
    return {(lim, r, w) for lim, r, w in itertools.product(limits, reads, writes)
            if cell_na(lim, r, w) is not None}


def _cell_rows(results: Json) -> dict[tuple[Any, ...], Json]:
    """(loop, limit, read, write, transport) -> row (a later repeat wins)."""
    return {(r.get("loop"), r.get("limit"), r.get("read"), r.get("write"),
             r.get("transport")): r for r in rows_of(results, "matrix")}


def _rate(by: dict[tuple[Any, ...], Json], key: tuple[Any, ...], transport: str
          ) -> float | None:
    r = by.get((*key, transport))
    return None if r is None or r.get("ok") is False else num(r.get("bytes_per_s"))


def ratios(results: Json) -> list[Json]:
    """Every cell with vchan and unix rates: loop, limit, read, write, vchan_vs_unix,
    vchan_vs_tcp (or None), target, met."""
    loops, limits, reads, writes = _axes(results)
    by = _cell_rows(results)
    out = []
    for loop, limit, read, write in itertools.product(loops, limits, reads, writes):
        key = (loop, limit, read, write)
        v, u, t = (_rate(by, key, x) for x in ("vchan", "unix", "tcp"))
        if v is None or not u:
            continue
        target = write_target(write)
        out.append({"loop": loop, "limit": limit, "read": read, "write": write,
                    "vchan_vs_unix": v / u, "vchan_vs_tcp": v / t if t else None,
                    "target": target, "met": v / u >= target})
    return out


def _where(c: Json) -> str:
    return (f"{human_size(c['limit'])} limit, {READ_TEXT.get(c['read'], c['read'])}, "
            f"{WRITE_TEXT.get(c['write'], c['write'])}")


def check_matrix_targets(results: Json) -> list[Json]:
    """Issue 15's matrix targets per loop, as :func:`report.check_targets` rows.

    Empty when the run has no matrix.  vchan/unix >= 2 for writes of 16 KiB
    and up (64 KiB, 1 MiB, writelines), >= 1.5 for 64 B and 1 KiB writes,
    >= 1 in every cell; ``met`` is None without cells to judge.
    """
    if not rows_of(results, "matrix"):
        return []
    cells = ratios(results)
    out: list[Json] = []
    groups = (
        (f"writes of 16 KiB and up: vchan >= {TARGET_BIG:g}x Unix sockets", False, TARGET_BIG),
        (f"64 B and 1 KiB writes: vchan >= {TARGET_SMALL:g}x Unix sockets", True,
         TARGET_SMALL),
        (f"no cell below {TARGET_FLOOR:g}x Unix sockets", None, TARGET_FLOOR),
    )
    for loop in _axes(results)[0]:
        for text, small, need in groups:
            sel = [c for c in cells if c["loop"] == loop
                   and (small is None or (c["write"] in SMALL_WRITES) == small)]
            name = f"Matrix ({loop}): {text}"
            if not sel:
                out.append({"target": name, "value": "-", "met": None,
                            "detail": "no cell with vchan and unix measurements"})
                continue
            worst = min(sel, key=lambda c: c["vchan_vs_unix"])
            ok = [c for c in sel if c["vchan_vs_unix"] >= need]
            out.append({"target": name,
                        "value": f"{len(ok)} of {len(sel)} cells; worst "
                                 f"{worst['vchan_vs_unix']:.2f}x ({_where(worst)})",
                        "met": len(ok) == len(sel),
                        "detail": "streams API matrix, vchan/unix of MB/s per cell; the "
                                  "cells that miss are listed in the matrix section"})
    return out


def _fmt_ratio(x: float | None, need: float | None = None) -> str:
    if x is None:
        return "-"
    text = f"{x:.2f}"
    return f"**{text}**" if need is not None and x < need else text


def _ns(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], left: int = 2) -> list[str]:
    """A Markdown table: the first ``left`` columns left-aligned, the rest right."""
    return md_table(headers, [i >= left for i in range(len(headers))], rows)


def matrix_section(results: Json, plots: dict[str, str]) -> list[str]:
    """The matrix section of report.md ([] when the run has no matrix).

    Per loop, vchan/unix by (limit, read style) x write style, with cells
    below their target in bold; the cells that miss; CPU per byte by write
    style (sender) and read style (receiver); every cell in full at the end.
    """
    rows = rows_of(results, "matrix")
    if not rows:
        return []
    s = _msettings(results)
    loops, limits, reads, writes = _axes(results)
    by = _cell_rows(results)
    lines = ["", "## Matrix of user configurations (streams API)", ""]
    bound = []
    if num(s.get("seconds")) is not None:
        bound.append(f"{s['seconds']:g} s")
    if isinstance(s.get("max_bytes"), int):
        bound.append(human_size(s["max_bytes"]))
    repeat = (results.get("settings") or {}).get("repeat")
    lines.append(
        "Client -> server through `start_server` / `open_connection` with `limit=` at both "
        "ends, as users write it (vchan at its default rings); the client writes "
        "(`write` + `drain`, or `writelines` + `drain`: 64 KiB a call), the server reads "
        "until EOF.  With `readexactly` (4-byte length prefix) and `readline` the "
        "message or line is the write size (`writelines`: one 64 KiB `[header, payload]` "
        "message, or 16 lines of 4 KiB).  Each cell stops after "
        f"{' or '.join(bound) or 'its budget'}, whichever comes first"
        + (f"; median of {repeat}" if isinstance(repeat, int) and repeat > 1 else "")
        + ".  MB/s at the receiver, first delivery to EOF.  Targets: vchan/unix >= "
        f"{TARGET_BIG:g} for writes of 16 KiB and up, >= {TARGET_SMALL:g} for 64 B and "
        f"1 KiB writes; cells below theirs are **bold**.  n/a: a line longer than the "
        f"limit (`readline` raises).")
    na = _na_cells(results, limits, reads, writes)

    for loop in loops:
        table = []
        for limit, read in itertools.product(limits, reads):
            cells = []
            for write in writes:
                key = (loop, limit, read, write)
                if (limit, read, write) in na:
                    cells.append("n/a")
                elif any((r := by.get((*key, t))) is not None and r.get("ok") is False
                         for t in ("vchan", "unix")):
                    cells.append("failed")
                else:
                    v, u = _rate(by, key, "vchan"), _rate(by, key, "unix")
                    cells.append(_fmt_ratio(v / u if v is not None and u else None,
                                            write_target(write)))
            if any(c != "-" for c in cells):
                table.append([human_size(limit), READ_TEXT.get(read, read), *cells])
        if table:
            lines += ["", f"### {loop}: vchan / Unix sockets", ""]
            lines += _table(["limit", "read", *(WRITE_TEXT.get(w, w) for w in writes)], table)

    misses = [c for c in ratios(results) if not c["met"]]
    lines += ["", "### Cells below their target", ""]
    if not misses:
        lines.append("None." if ratios(results) else "No cell has vchan and unix figures.")
    else:
        lines += _table(
            ["loop", "cell", "vchan/unix", "needs", "vchan/tcp", "vchan MB/s", "unix MB/s"],
            ([c["loop"], _where(c), f"{c['vchan_vs_unix']:.2f}", f"{c['target']:g}",
              _fmt_ratio(c["vchan_vs_tcp"]),
              fmt_mbps(_rate(by, (c["loop"], c["limit"], c["read"], c["write"]), "vchan")),
              fmt_mbps(_rate(by, (c["loop"], c["limit"], c["read"], c["write"]), "unix"))]
             for c in sorted(misses, key=lambda c: c["vchan_vs_unix"])), left=2)
    failed = [r for r in rows if r.get("ok") is False]
    if failed:
        lines += ["", "Failed cells:", ""]
        lines += [f"- {r.get('loop')}, {r.get('transport')}, {_where(r)}: "
                  f"{str(r.get('error')).replace('|', '/')}" for r in failed]

    lines += ["", "### CPU per byte", "",
              "CPU time (user + sys) of each process over the transfer / bytes, ns/B: the "
              "sender by write style (median over limits and read styles), the receiver by "
              "read style (median over limits and write styles)."]
    transports = [t for t in ("vchan", "unix", "tcp") if any(r.get("transport") == t
                                                             for r in rows)]
    for side, field, axis, styles, text in (
            ("sender", "client_cpu_ns_per_byte", "write", writes, WRITE_TEXT),
            ("receiver", "server_cpu_ns_per_byte", "read", reads, READ_TEXT)):
        table = []
        for style in styles:
            for loop in loops:
                cells = []
                for t in transports:
                    vals = [x for r in rows if r.get("loop") == loop and r.get("transport") == t
                            and r.get(axis) == style and (x := num(r.get(field))) is not None]
                    cells.append(_ns(statistics.median(vals)) if vals else "-")
                table.append([text.get(style, style), loop, *cells])
        lines += ["", *_table([f"{side}: {axis} style", "loop", *transports], table)]

    img = plots.pop("matrix", None)
    if img is not None:
        lines += ["", f"![vchan / Unix sockets per cell]({img})"]

    lines += ["", "### Every cell", "",
              "MB/s, ratios, and CPU ns/B as sender / receiver."]
    headers = ["loop", "limit", "read", "write", *(f"{t} MB/s" for t in transports)]
    headers += [f"vchan/{t}" for t in transports if t != "vchan"]
    headers += [f"{t} CPU ns/B" for t in transports]
    table = []
    for loop, limit, read, write in itertools.product(loops, limits, reads, writes):
        cell = (loop, limit, read, write)
        if (limit, read, write) in na:
            table.append([loop, human_size(limit), READ_TEXT.get(read, read),
                          WRITE_TEXT.get(write, write), *(["n/a"] * (len(headers) - 4))])
            continue
        found = {t: by.get((*cell, t)) for t in transports}
        if all(r is None for r in found.values()):
            continue
        rates = {t: _rate(by, cell, t) for t in transports}
        v = rates.get("vchan")
        cells = [("failed" if (r := found[t]) is not None and r.get("ok") is False
                  else fmt_mbps(rates[t])) for t in transports]
        cells += [_fmt_ratio(v / other if v is not None and (other := rates[t]) else None)
                  for t in transports if t != "vchan"]
        cells += [f"{_ns(num((found[t] or {}).get('client_cpu_ns_per_byte')))} / "
                  f"{_ns(num((found[t] or {}).get('server_cpu_ns_per_byte')))}"
                  for t in transports]
        table.append([loop, human_size(limit), READ_TEXT.get(read, read),
                      WRITE_TEXT.get(write, write), *cells])
    lines += ["", *_table(headers, table, left=4)]
    return lines


def write_matrix_plot(results: Json, outdir: Path) -> Path | None:
    """``matrix.png``: vchan/unix per cell, a heat map per loop (None without data)."""
    cells = ratios(results)
    if not cells:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    loops, limits, reads, writes = _axes(results)
    loops = [lp for lp in loops if any(c["loop"] == lp for c in cells)]
    ylabels = [(lim, r) for lim in limits for r in reads]
    by = {(c["loop"], c["limit"], c["read"], c["write"]): c["vchan_vs_unix"] for c in cells}
    fig = Figure(figsize=(max(7.0, 1.1 * len(writes) * len(loops) + 3.6),
                          0.32 * len(ylabels) + 2.0), layout="constrained")
    axes = fig.subplots(1, len(loops), sharey=True, squeeze=False)[0]
    norm = LogNorm(vmin=0.25, vmax=4)
    image = None
    for ax, loop in zip(axes, loops, strict=True):
        grid = [[by.get((loop, lim, r, w), math.nan) for w in writes] for lim, r in ylabels]
        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
        for i, (lim, r) in enumerate(ylabels):
            for j, w in enumerate(writes):
                x = grid[i][j]
                text = "n/a" if cell_na(lim, r, w) else "" if math.isnan(x) else f"{x:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(writes)))
        ax.set_xticklabels([WRITE_TEXT.get(w, w) for w in writes], rotation=45, ha="right",
                           fontsize=8)
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels([f"{human_size(lim)}, {READ_TEXT.get(r, r)}" for lim, r in ylabels],
                           fontsize=8)
        ax.set_title(loop)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), label="vchan / Unix sockets (MB/s)")
        ticks = [0.25, 0.5, 1, 1.5, 2, 4]
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        bar.minorticks_off()
    fig.suptitle("Streams matrix: vchan / Unix sockets")
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "matrix.png"
    fig.savefig(path, dpi=110)
    return path
