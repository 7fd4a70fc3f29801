"""Write flow control shared by vchan's transports (asyncio's _FlowControlMixin).

Copied in behaviour, not imported: asyncio's private helpers move between
Python versions.  A transport using this mixin defines
``get_write_buffer_size()`` and sets ``_loop`` and ``_protocol``.
"""

from __future__ import annotations

import asyncio
from typing import Any


class WriteFlowControl:
    """High/low water marks and pause_writing()/resume_writing() calls."""

    _loop: asyncio.AbstractEventLoop
    _protocol: Any
    _high_water: int
    _low_water: int
    _protocol_paused: bool

    def get_write_buffer_size(self) -> int:
        raise NotImplementedError

    def _maybe_pause_protocol(self) -> None:
        if self.get_write_buffer_size() <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": "protocol.pause_writing() failed",
                "exception": exc, "transport": self, "protocol": self._protocol,
            })

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler({
                    "message": "protocol.resume_writing() failed",
                    "exception": exc, "transport": self, "protocol": self._protocol,
                })

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def _set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._set_write_buffer_limits(high=high, low=low)
        self._maybe_pause_protocol()
