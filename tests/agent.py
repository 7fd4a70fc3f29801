"""A process playing one domain, driven by a test over a pipe or a socket.

Started by ``domains.DomainProcess`` (a process of an emulated domain, or of
dom0 on the Xen rig), or forked in a rig domU by the ``domain-host`` role
(``tests/xen/roles.py``).  Reads JSON lines ``{"code": str}``, runs the code
in one persistent namespace and answers one JSON line: ``{"value": ...}``
(the value of the last expression, if any) or
``{"error": "Type: message", "errno": n}``.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any, TextIO


def run(code: str, ns: dict[str, Any]) -> Any:
    tree = ast.parse(code)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        body = ast.Module(body=tree.body[:-1], type_ignores=[])
        exec(compile(body, "<test>", "exec"), ns)
        return eval(compile(ast.Expression(last.value), "<test>", "eval"), ns)
    exec(compile(tree, "<test>", "exec"), ns)
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1")
    return repr(value)


def namespace() -> dict[str, Any]:
    """A fresh namespace for test code, with what the tests use imported."""
    ns: dict[str, Any] = {"__name__": "__agent__"}
    exec("import os, sys, time, select, signal, ctypes, errno\n"
         "from vchan.devices import GrantSharer, GrantMapper, EventChannel", ns)
    return ns


def serve(requests: Iterable[str], out: TextIO, ns: dict[str, Any]) -> None:
    """Answer each request line until the requests end."""
    for line in requests:
        request = json.loads(line)
        try:
            value = run(request["code"], ns)
            answer = json.dumps({"value": value}, default=_plain)
        except BaseException as exc:
            answer = json.dumps({
                "error": f"{type(exc).__name__}: {exc}",
                "type": type(exc).__name__,
                "errno": getattr(exc, "errno", None),
                "traceback": traceback.format_exc(),
            })
        out.write(answer + "\n")
        out.flush()


def main() -> None:
    out = os.fdopen(int(sys.argv[1]), "w", buffering=1) if len(sys.argv) > 1 else sys.stdout
    serve(sys.stdin, out, namespace())


if __name__ == "__main__":
    main()
