"""Suite-wide configuration: the --soak flag and the emulator fixture."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", default=False,
        help="also run long soak and fuzz tests (VCHAN_SOAK_SECONDS bounds each one)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


# -- the emulated hypervisor ------------------------------------------------


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private emulator for the test session (and VCHAN_* pointing at it)."""
    from vchan import backend, sim

    directory = tmp_path_factory.mktemp("sim")
    saved = {k: os.environ.get(k) for k in ("VCHAN_SIM_DIR", "VCHAN_BACKEND", "VCHAN_DOMID")}
    os.environ["VCHAN_SIM_DIR"] = str(directory)
    os.environ["VCHAN_BACKEND"] = "sim"
    os.environ.pop("VCHAN_DOMID", None)
    backend._reset_for_tests()
    sim.ensure_running(directory)
    try:
        yield directory
    finally:
        sim.stop(directory)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        backend._reset_for_tests()
