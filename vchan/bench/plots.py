"""PNG plots of a benchmark run (matplotlib, the ``bench`` extra).

Each plot only when there is data for it; without matplotlib, nothing (see
:data:`vchan.bench.report.PLOTS_HINT`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import DIRECTIONS, RECEIVERS, Json, human_size
from .matrix_report import write_matrix_plot
from .results import (
    DIRECTION_TEXT,
    SWEEP_RECEIVERS,
    default_ring_size,
    find_row,
    loops_of,
    main_bulk,
    num,
    ordered,
    ping_rows,
    rows_of,
    settings_of,
    sweep_rows,
    transports_of,
)

_COLORS = {"vchan": "tab:blue", "unix": "tab:orange", "tcp": "tab:green"}
_STYLES = {"asyncio": ("-", "o"), "uvloop": ("--", "s")}
_DPI = 110


def _size_axis(ax: Any, sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(list(sizes))
        ax.set_xticklabels([human_size(x).replace(" ", "\u2009") for x in sizes],
                           rotation=45, fontsize=8)
        ax.minorticks_off()


def write_plots(results: Json, outdir: Path) -> list[Path]:
    """PNG plots of ``results`` in ``outdir``; the files written.

    ``bulk_<receiver>_<direction>.png`` (MB/s by write size, a line per
    transport, a panel per loop), ``ring_sizes.png`` (vchan MB/s by write size
    per ring size), ``pingpong_cdf.png`` (latency CDFs per transport, a panel
    per loop and message size), ``matrix.png`` (vchan/unix per cell of the
    streams matrix, a heat map per loop) and ``connections.png`` (aggregate MB/s and
    memory per connection by number of connections) -- each only when there
    is data for it.  Returns ``[]`` without error when matplotlib is not
    installed (tell the user :data:`PLOTS_HINT`).
    """
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        path = outdir / f"{name}.png"
        fig.savefig(path, dpi=_DPI)
        written.append(path)

    loops = loops_of(results)
    rows = main_bulk(results)
    for direction in ordered(list(DIRECTIONS), (r.get("direction") for r in rows)):
        for receiver in ordered(list(RECEIVERS), (r.get("receiver") for r in rows)):
            rrows = [r for r in rows if r.get("direction") == direction
                     and r.get("receiver") == receiver
                     and num(r.get("bytes_per_s")) and isinstance(r.get("write_size"), int)]
            plot_loops = [lp for lp in loops if any(r.get("loop") == lp for r in rrows)]
            if not plot_loops:
                continue
            fig = Figure(figsize=(4.2 * len(plot_loops) + 0.8, 4.2), layout="constrained")
            axes = fig.subplots(1, len(plot_loops), sharey=True, squeeze=False)[0]
            sizes = ordered(None, (r["write_size"] for r in rrows))
            for ax, loop in zip(axes, plot_loops, strict=True):
                for t in transports_of(results):
                    pts = sorted((r["write_size"], r["bytes_per_s"] / 1e6) for r in rrows
                                 if r.get("loop") == loop and r.get("transport") == t)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", label=t,
                                color=_COLORS.get(t))
                _size_axis(ax, sizes)
                ax.set_yscale("log")
                ax.set_title(loop)
                ax.set_xlabel("write size")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
            axes[0].set_ylabel("MB/s (log scale)")
            fig.suptitle(f"Bulk throughput, {DIRECTION_TEXT.get(direction, direction)}, "
                         f"receiver: {receiver}")
            save(fig, f"bulk_{receiver}_{direction}")

    sweep = [r for r in sweep_rows(results) if r.get("direction", "one") == "one"
             and num(r.get("bytes_per_s")) and isinstance(r.get("write_size"), int)]
    if len(ordered(None, (r["ring_size"] for r in sweep))) >= 2:
        receivers = [x for x in ordered(list(SWEEP_RECEIVERS), (r.get("receiver") for r in sweep))
                     if len({r["ring_size"] for r in sweep if r.get("receiver") == x}) >= 2]
        plot_loops = [lp for lp in loops if any(r.get("loop") == lp for r in sweep)]
        fig = Figure(figsize=(4.2 * len(plot_loops) + 0.8, 3.6 * len(receivers) + 0.6),
                     layout="constrained")
        grid = fig.subplots(len(receivers), len(plot_loops), sharey=True, squeeze=False)
        default = default_ring_size(results)
        for i, receiver in enumerate(receivers):
            for j, loop in enumerate(plot_loops):
                ax = grid[i][j]
                sel = [r for r in sweep if r.get("receiver") == receiver
                       and r.get("loop") == loop]
                for ring in ordered(None, (r["ring_size"] for r in sel)):
                    pts = sorted((r["write_size"], r["bytes_per_s"] / 1e6) for r in sel
                                 if r["ring_size"] == ring)
                    label = f"ring {human_size(ring)}" + (" (default)" if ring == default
                                                         else "")
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
                _size_axis(ax, ordered(None, (r["write_size"] for r in sel)))
                ax.set_yscale("log")
                ax.set_title(f"{receiver}, {loop}")
                ax.set_xlabel("write size")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            grid[i][0].set_ylabel("vchan MB/s (log scale)")
        fig.suptitle("vchan bulk throughput by ring size (one direction)")
        save(fig, "ring_sizes")

    ping = [r for r in ping_rows(results)
            if isinstance(r.get("cdf_us"), list) and len(r["cdf_us"]) >= 2]
    if ping:
        msizes = ordered(settings_of(results).get("ping_sizes"),
                          (r.get("message_size") for r in ping))
        msizes = [m for m in msizes if any(r.get("message_size") == m for r in ping)]
        plot_loops = [lp for lp in loops if any(r.get("loop") == lp for r in ping)]
        fig = Figure(figsize=(4.2 * len(plot_loops) + 0.8, 3.4 * len(msizes) + 0.6),
                     layout="constrained")
        grid = fig.subplots(len(msizes), len(plot_loops), sharex=True, squeeze=False)
        for i, size in enumerate(msizes):
            for j, loop in enumerate(plot_loops):
                ax = grid[i][j]
                for t in transports_of(results):
                    row = find_row(ping, message_size=size, loop=loop, transport=t)
                    if row is None:
                        continue
                    vals = [num(x) for x in row["cdf_us"]]
                    xs = [x for x in vals if x is not None and x > 0]
                    if len(xs) != len(vals):
                        continue
                    n = len(xs) - 1
                    ax.plot(xs, [k / n for k in range(n + 1)], label=t, color=_COLORS.get(t))
                ax.set_xscale("log")
                ax.set_ylim(0, 1)
                ax.set_title(f"{human_size(size)} messages, {loop}")
                ax.set_xlabel("round trip (us, log scale)")
                ax.set_ylabel("fraction of round trips")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(loc="lower right")
        fig.suptitle("Ping-pong latency distribution (CDF)")
        save(fig, "pingpong_cdf")

    conns = [r for r in rows_of(results, "connections")
             if isinstance(r.get("connections"), int) and r.get("ok") is not False]
    if conns:
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        ax_rate, ax_mem = fig.subplots(1, 2)
        counts = ordered(None, (r["connections"] for r in conns))
        for t in transports_of(results):
            for loop in loops:
                sel = [r for r in conns if r.get("transport") == t and r.get("loop") == loop]
                line, marker = _STYLES.get(loop, (":", "^"))
                style = dict(color=_COLORS.get(t), linestyle=line, marker=marker,
                             label=f"{t}, {loop}")
                pts = sorted((r["connections"], r["bytes_per_s"] / 1e6) for r in sel
                             if num(r.get("bytes_per_s")))
                if pts:
                    ax_rate.plot(*zip(*pts, strict=True), **style)
                mem = sorted((r["connections"],
                              (r["server_rss_per_conn"] + r["client_rss_per_conn"]) / 1024)
                             for r in sel if num(r.get("server_rss_per_conn")) is not None
                             and num(r.get("client_rss_per_conn")) is not None)
                if mem:
                    ax_mem.plot(*zip(*mem, strict=True), **style)
        for ax in (ax_rate, ax_mem):
            ax.set_xscale("log")
            ax.set_xticks(counts)
            ax.set_xticklabels([f"{c:,}" for c in counts])
            ax.minorticks_off()
            ax.set_xlabel("concurrent connections")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
        ax_rate.set_ylabel("aggregate MB/s")
        ax_rate.set_title("Aggregate throughput")
        ax_mem.set_ylabel("KiB per connection (server + client RSS)")
        ax_mem.set_title("Memory per connection")
        fig.suptitle("Many concurrent connections")
        save(fig, "connections")
    matrix = write_matrix_plot(results, outdir)
    if matrix is not None:
        written.append(matrix)
    return written
