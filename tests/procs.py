"""One child process of a test: started, read, written, stopped -- and always reaped.

Every cross-process test starts its peers with :class:`Proc` (through the
``children`` fixture of ``conftest.py``, which reaps them even when the test
fails): a peer script that reports JSON lines (``peer_events.emit``), a
``vchan`` command, a C program, Debian's tools, a test-code agent.

* the environment: the test's (or ``base_env``), plus ``env``, plus
  ``VCHAN_DOMID`` when ``domid`` is given (the emulated domain the process
  plays);
* stdout: read by a thread as lines (``stdout="lines"``: :meth:`line`,
  :meth:`event`, :meth:`aevent`, :meth:`expect`, :meth:`wait_event`) or as
  bytes (``"bytes"``: :meth:`read_bytes`, :meth:`wait_eof`), or handed to
  ``subprocess`` as it is (a file, ``DEVNULL``, ``PIPE`` the test reads
  itself); ``events_fd`` reads the lines from a pipe the child writes to
  instead (its stdout stays free);
* stderr: an unnamed temporary file, never a pipe that could fill up
  (:attr:`stderr`, :meth:`wait_stderr`); every failure quotes it;
* stdin: a pipe (:meth:`send`, :meth:`feed`, :meth:`close_stdin`) unless
  told otherwise;
* the end: :meth:`kill` (and when), :meth:`stop` (SIGTERM), :meth:`wait`,
  and :meth:`close`: stdin closed, ``grace`` seconds to finish, then SIGKILL;
  with ``new_session`` the process leads a process group of its own (a
  terminal's foreground job): :meth:`ctrl_c` sends SIGINT to the group, and
  :meth:`close` kills the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

TIMEOUT = 60.0

#: ``stdout`` modes read by the helper's thread.
_MODES = ("lines", "bytes")


class Proc:
    """A child process of a test (see the module's docstring)."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], *, domid: int | None = None,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 name: str | None = None, stdin: Any = subprocess.PIPE,
                 stdout: Any = "lines", events_fd: int | None = None,
                 pass_fds: Sequence[int] = (), grace: float = 20.0,
                 base_env: Mapping[str, str] | None = None, new_session: bool = False) -> None:
        self.name = name or os.path.basename(str(argv[0]))
        self.grace = grace
        self.new_session = new_session
        full_env = dict(os.environ if base_env is None else base_env, **(env or {}))
        if domid is not None:
            full_env["VCHAN_DOMID"] = str(domid)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close()
        mode = stdout if isinstance(stdout, str) else None
        if mode is not None and mode not in _MODES:
            raise ValueError(f"stdout must be one of {_MODES} or what Popen takes")
        self._lines: list[str] = []
        self._next = 0
        self.data = bytearray()
        self.eof = False
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [str(a) for a in argv], env=full_env, cwd=cwd, stdin=stdin,
            stdout=subprocess.PIPE if mode is not None and events_fd is None else
            (None if mode is not None else stdout),
            stderr=self._err, pass_fds=tuple(pass_fds), start_new_session=new_session)
        source: IO[bytes] | None = None
        if events_fd is not None:
            source = os.fdopen(events_fd, "rb")
        elif mode is not None:
            source = self.proc.stdout
        self._source = source
        self._thread: threading.Thread | None = None
        if source is not None:
            target = self._read_bytes if mode == "bytes" else self._read_lines
            self._thread = threading.Thread(target=target, args=(source,), daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"<Proc {self.name} pid={self.proc.pid} {state}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    # -- reading ------------------------------------------------------------------------

    def _read_lines(self, source: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):      # closed under us by close()
            for raw in source:
                with self._cond:
                    self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def _read_bytes(self, source: IO[bytes]) -> None:
        fd = source.fileno()
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 1 << 16):
                with self._cond:
                    self.data += chunk
                    self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        """All the process wrote on stderr so far."""
        return os.pread(self._err.fileno(), 1 << 24, 0).decode(errors="replace")

    def _failed(self, what: str) -> AssertionError:
        return AssertionError(f"{self.name}: {what}; stderr: {self.stderr}")

    def readline(self, timeout: float | None = TIMEOUT) -> str | None:
        """The next line of output, ``None`` once the output has ended (as a file's
        ``readline`` says ``""``); fails the test if none comes within ``timeout``
        (``None``: no limit)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._next < len(self._lines) or self.eof,
                                       timeout):
                raise self._failed(f"nothing said within {timeout} s")
            if self._next == len(self._lines):
                return None
            self._next += 1
            return self._lines[self._next - 1]

    def line(self, timeout: float = TIMEOUT) -> str:
        """The next line of output; fails the test (quoting stderr) if none comes."""
        text = self.readline(timeout)
        if text is None:
            status = self.proc.wait(10)
            raise self._failed(f"exited ({status})")
        return text

    def rest(self, timeout: float = TIMEOUT) -> list[str]:
        """The lines not read yet, once the output has ended."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.eof, timeout):
                raise self._failed(f"output still open after {timeout} s")
            rest, self._next = self._lines[self._next:], len(self._lines)
            return rest

    def quiet(self, timeout: float = 0.2) -> bool:
        """True if no more output (nor its end) comes within ``timeout``."""
        with self._cond:
            return not self._cond.wait_for(
                lambda: self._next < len(self._lines) or self.eof, timeout)

    def event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next JSON line."""
        answer: dict[str, Any] = json.loads(self.line(timeout))
        return answer

    async def aevent(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """:meth:`event` without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.event, timeout)

    def expect(self, key: str, timeout: float = TIMEOUT) -> Any:
        """The next event must have ``key`` (or be ``{"event": key}``): its value
        (the whole event for the latter)."""
        answer = self.event(timeout)
        assert key in answer or answer.get("event") == key, f"{self.name}: {answer}"
        return answer.get(key, answer)

    def wait_event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Skip events until ``{"event": name, ...}`` (or a ``result``, which is last:
        it fails the test) and return it."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.event(max(0.0, deadline - time.monotonic()))
            if answer.get("event") == name:
                return answer
            if "result" in answer:
                raise self._failed(f"ended with {answer} before {name!r}")

    async def await_event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """:meth:`wait_event` without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.wait_event, name,
                                                                timeout)

    def wait_stderr(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Until stderr matches ``pattern``; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.stderr)
            if m:
                return m
            if self.proc.poll() is not None:
                raise self._failed(f"exited {self.proc.returncode}")
            time.sleep(0.05)
        raise self._failed(f"no {pattern!r} within {timeout} s")

    def read_bytes(self, n: int, timeout: float = TIMEOUT) -> bytes:
        """(``stdout="bytes"``) The first ``n`` bytes of stdout, waiting for them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.data) >= n or self.eof, timeout):
                raise self._failed(f"{len(self.data)} of {n} bytes within {timeout} s")
            return bytes(self.data[:n])

    def wait_eof(self, timeout: float = TIMEOUT) -> bytes:
        """(``stdout="bytes"``) Everything on stdout up to its end."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.eof, timeout), f"{self.name}: no EOF"
            return bytes(self.data)

    # -- writing ------------------------------------------------------------------------

    def send(self, text: str = "go") -> None:
        """One line on stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def feed(self, data: bytes, *, close: bool = False) -> threading.Thread:
        """Write ``data`` to stdin on a thread (the process reads it as it can)."""
        stdin = self.proc.stdin
        assert stdin is not None

        def run() -> None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                stdin.write(data)
                stdin.flush()
                if close:
                    stdin.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close_stdin(self) -> None:
        """End the process's input (a peer script takes that as "finish now")."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()

    # -- the end ---------------------------------------------------------------------------

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` (if it still runs); the ``time.monotonic()`` it was sent."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return t

    def ctrl_c(self, timeout: float = 10.0) -> tuple[int, str]:
        """(``new_session``) SIGINT to the process group, as a terminal's Ctrl-C:
        the exit status, and what stderr got after it."""
        assert self.new_session, "Ctrl-C goes to a process group: start with new_session"
        before = len(self.stderr)
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise self._failed(f"still running {timeout} s after Ctrl-C") from None
        time.sleep(0.2)         # children that print late would print by now
        return status, self.stderr[before:]

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Its exit status; fails the test if it still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._failed(f"still runs after {timeout} s") from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then its exit status."""
        self.kill(signal.SIGTERM)
        return self.wait(timeout)

    def close(self, grace: float | None = None) -> None:
        """Close stdin, give the process ``grace`` seconds (default: the one given
        at start) to finish, then SIGKILL; reap it and close every file."""
        grace = self.grace if grace is None else grace
        if self.proc.poll() is None:
            self.close_stdin()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.new_session:            # what the group's leader left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.close_stdin()
        if self._thread is not None:
            self._thread.join(5)
        for f in (self.proc.stdout, self._source):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._err.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Children:
    """The processes of one test, closed in reverse order at its end (clients,
    started last, go before the servers that wait for their connections)."""

    def __init__(self) -> None:
        self._started: list[Proc] = []

    def start(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> Proc:
        """A :class:`Proc` (same arguments), closed with the others."""
        p = Proc(argv, **kwargs)
        self._started.append(p)
        return p

    def adopt(self, p: Proc) -> Proc:
        """Close ``p`` (started elsewhere, a subclass perhaps) with the others."""
        self._started.append(p)
        return p

    def __iter__(self) -> Iterator[Proc]:
        return iter(self._started)

    def close(self) -> None:
        while self._started:
            self._started.pop().close()
