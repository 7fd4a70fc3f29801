"""Reports of a benchmark run: Markdown, target checks, PNG plots.

Everything here is a pure function of the results dict that the measuring
side (:mod:`vchan.bench.suite`) produces and writes as ``results.json``:

* :func:`render_markdown` -- the whole report as Markdown (machine, settings,
  targets, bulk, ring-size sweep, ping-pong, connections, setup rate,
  drop-in and the streams matrix), section by section from
  :mod:`~vchan.bench.sections` and :mod:`~vchan.bench.matrix_report`;
* :func:`vchan.bench.targets.check_targets` -- the targets of issues #8,
  #13, #15 and #16, recorded, never asserted;
* :func:`vchan.bench.plots.write_plots` -- PNG plots (needs matplotlib, the
  ``bench`` extra; without it, returns ``[]`` and raises nothing: see
  :data:`PLOTS_HINT`);
* :func:`write_report` -- ``results.json``, ``report.md`` (embedding the
  PNGs by relative links) and the PNGs, in one directory.

Units: MB/s are decimal (1e6 bytes/s); latencies are in microseconds.  Every
ratio is oriented so that above 1 means vchan is better: throughput ratios
are vchan/other, latency ratios other/vchan.  Missing data renders as "-"
(:mod:`~vchan.bench.results`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from . import sections
from .common import Json
from .matrix_report import matrix_section
from .plots import write_plots

#: What to tell the user when :func:`write_plots` returned nothing because
#: matplotlib is missing.
PLOTS_HINT = "PNG plots need matplotlib: pip install 'vchan[bench]'"


def render_markdown(results: Json, plots: Iterable[Path | str] = ()) -> str:
    """The whole report of one run as Markdown.

    A header (machine, settings), then Targets, bulk one direction and both
    directions (per receiver), the vchan ring-size sweep, ping-pong, many
    connections, connection setup, drop-in by address and the streams
    matrix.  ``plots`` are image files (as :func:`write_plots` names them)
    to embed by relative link -- each under its section, by file name;
    images of unknown names go at the end.
    """
    links = {Path(p).stem: Path(p).name for p in plots}
    lines = sections.header(results)
    lines += sections.targets_section(results)
    lines += sections.bulk_sections(results, links)
    lines += sections.sweep_section(results, links)
    lines += sections.pingpong_section(results, links)
    lines += sections.connections_section(results, links)
    lines += sections.setup_section(results)
    lines += sections.dropin_section(results)
    lines += matrix_section(results, links)
    if links:
        lines += ["", "## More plots"]
        for stem, link in links.items():
            lines += ["", f"![{stem}]({link})"]
    return "\n".join(lines) + "\n"



def write_report(results: Json, outdir: Path) -> dict[str, Path]:
    """Write ``results.json``, the PNG plots and ``report.md`` into ``outdir``.

    Returns the paths by name: ``"json"``, ``"markdown"`` and one per plot
    under its file stem (e.g. ``"bulk_streams_one"``, ``"pingpong_cdf"``).
    ``report.md`` embeds the plots by relative links; without matplotlib
    there are no plots and the report says how to get them.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    json_path = outdir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    paths["json"] = json_path
    plots = write_plots(results, outdir)
    text = render_markdown(results, plots)
    if not plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            text += f"\n_No plots: {PLOTS_HINT}._\n"
    md_path = outdir / "report.md"
    md_path.write_text(text, encoding="utf-8")
    paths["markdown"] = md_path
    for p in plots:
        paths[p.stem] = p
    return paths
