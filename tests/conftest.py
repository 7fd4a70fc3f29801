"""Suite-wide configuration.

* ``--soak`` enables the long soak and fuzz tests.
* Every async test runs twice, on asyncio's default loop and on uvloop, both
  in debug mode; a test fails if anything reaches the loop's exception
  handler (mark it ``expect_loop_errors`` when that is the point).
* ``sim_dir``: a private emulated hypervisor for the session.
* ``rig_domus``: on the Xen rig, its two PV domUs for the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from procs import Children


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", default=False,
        help="also run long soak and fuzz tests (VCHAN_SOAK_SECONDS bounds each one)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_loop_errors: the test expects calls to the loop's exception handler")


# -- both event loops, debug on, no silent errors ----------------------------

_loop_errors: list[dict[str, Any]] = []


def _checked(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    loop.set_debug(True)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        _loop_errors.append(context)
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return loop


def _uvloop() -> asyncio.AbstractEventLoop:
    import uvloop

    return _checked(uvloop.new_event_loop())


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item,
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": lambda: _checked(asyncio.new_event_loop()), "uvloop": _uvloop}


@pytest.fixture(autouse=True)
def _fail_on_loop_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    _loop_errors.clear()
    yield
    if _loop_errors and request.node.get_closest_marker("expect_loop_errors") is None:
        messages = "; ".join(str(c.get("message") or c.get("exception")) for c in _loop_errors)
        _loop_errors.clear()
        pytest.fail(f"the event loop's exception handler was called: {messages}")


@pytest.fixture
def loop_errors() -> list[dict[str, Any]]:
    """What reached the exception handler so far (for expect_loop_errors tests)."""
    return _loop_errors


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


# -- child processes ---------------------------------------------------------


@pytest.fixture
def children() -> Iterator[Children]:
    """``children.start(argv, ...)``: a ``procs.Proc`` closed (and reaped) when
    the test ends, however it ends; the last started is closed first."""
    started = Children()
    try:
        yield started
    finally:
        started.close()


# -- the emulated hypervisor ------------------------------------------------


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private emulator for the test session (and VCHAN_* pointing at it; this
    process is domain 0 with VCHAN_DOMID unset)."""
    from vchan.sim.private import Emulator

    with Emulator(tmp_path_factory.mktemp("sim"), own_domid=None) as emulator:
        yield emulator.directory


# -- the Xen rig ----------------------------------------------------------------


@pytest.fixture(scope="session")
def rig_domus() -> Iterator[tuple[Any, Any]]:
    """The Xen rig's two PV domUs, guest-a and guest-b, booted side by side once
    for the session (a minute or more under TCG), each with a vif on xenbr0:
    ``tests/xen/test_cross_domain.py`` and ``tests/test_devices.py`` share them.
    Only in the rig's dom0 (callers skip elsewhere)."""
    from domains import rig_harness

    harness = rig_harness()
    a = harness.Domu.create("guest-a", vif=True)
    try:
        b = harness.Domu.create("guest-b", vif=True)
    except BaseException:
        a.close()
        raise
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.close()
        b.close()
