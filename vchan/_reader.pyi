"""vchan._reader (vchan/_reader.c): the per-call fast paths of vchan.StreamReader."""

from collections import deque
from collections.abc import Coroutine, Generator
from typing import Any, final

from _typeshed import ReadableBuffer

class ReaderCore:
    """The slots and fast paths of vchan.StreamReader."""

    _exception: BaseException | None
    _paused: bool
    _limit: int
    _chunks: deque[bytes]
    _pos: int
    _size: int
    _ring: int
    _source: Any

    def _set_direct(self, address: int, owner: object, /) -> None: ...
    def _take_ring(self, n: int, /) -> bytes: ...
    def _find_ring(self, sep: int, limit: int, /) -> int: ...
    def read(self, n: int = -1) -> Coroutine[Any, Any, bytes]: ...
    def readexactly(self, n: int) -> Coroutine[Any, Any, bytes]: ...
    def readline(self) -> Coroutine[Any, Any, bytes]: ...
    def readuntil(
        self, separator: ReadableBuffer | tuple[ReadableBuffer, ...] = b"\n"
    ) -> Coroutine[Any, Any, bytes]: ...

@final
class Call(Coroutine[Any, Any, bytes]):
    """A StreamReader call being awaited."""

    __name__: str
    __qualname__: str
    cr_await: Any
    def send(self, value: Any, /) -> Any: ...
    def throw(self, typ: Any, val: Any = ..., tb: Any = ..., /) -> Any: ...
    def close(self) -> None: ...
    def __await__(self) -> Generator[Any, None, bytes]: ...

@final
class Done(Coroutine[Any, Any, None]):
    """An awaitable over at once with None."""

    __name__: str
    __qualname__: str
    cr_await: None
    def send(self, value: Any, /) -> Any: ...
    def throw(self, typ: Any, val: Any = ..., tb: Any = ..., /) -> Any: ...
    def close(self) -> None: ...
    def __await__(self) -> Generator[Any]: ...

DONE: Done

def set_direct_functions(take: int, find: int, rest: int, due: int, /) -> None: ...
