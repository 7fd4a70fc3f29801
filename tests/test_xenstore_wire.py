"""Every XenStore operation through vchan.xenstore.wire, both ways, no I/O.

The client side (the operations of vchan.xenstore.operations, which both
clients drive) encodes each request; xenstored's side (the decoders the
emulated xenstored uses) must read back what was meant, and the bytes must
be those the clients have always sent (oxenstored on the Xen rig sees the
same).  xenstored's reply then goes back through the client's decoder.  A
case per message type: a type without one fails the test.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import pytest

from vchan.xenstore import operations as ops
from vchan.xenstore import wire
from vchan.xenstore.wire import Op, Perm, TransactionConflict, WatchEvent

PERMS = [Perm(7, "n"), Perm(0, "r"), Perm(12, "b")]
CHILDREN = ["ring-ref", "event-channel", "x" * 40]


@dataclass(frozen=True)
class Case:
    """One operation: the request the client sends and how xenstored reads it,
    the reply xenstored sends and what the client makes of it."""

    call: Callable[[], Generator[ops.Request, bytes, Any]]   # the client's operation
    wire_request: bytes                                   # its payload, byte for byte
    server_reads: Callable[[bytes], Any]                  # xenstored's decoder
    meant: Any                                            # ...must give this back
    reply: bytes                                          # xenstored's answer
    result: Any                                           # the client's result from it


def _tool(op: Op, payload: bytes) -> Generator[ops.Request, bytes, str]:
    """An operation the clients have no method for, as tools send it: its
    strings; the reply read as one string."""
    return wire.reply_string((yield ops.Request(op, payload, "")))


CASES: dict[Op, Case] = {
    Op.READ: Case(lambda: ops.read("/local/domain/3/data/x"), b"/local/domain/3/data/x\0",
                  wire.one_arg, "/local/domain/3/data/x",
                  b"a value\0with a NUL", b"a value\0with a NUL"),
    Op.WRITE: Case(lambda: ops.write("data/x", b"\0\xff raw"), b"data/x\0\0\xff raw",
                   wire.decode_write, ("data/x", b"\0\xff raw"), wire.OK, None),
    Op.MKDIR: Case(lambda: ops.mkdir("data/d"), b"data/d\0", wire.one_arg, "data/d",
                   wire.OK, None),
    Op.RM: Case(lambda: ops.rm("/local/domain/3/data/d"), b"/local/domain/3/data/d\0",
                wire.one_arg, "/local/domain/3/data/d", wire.OK, None),
    Op.DIRECTORY: Case(lambda: ops.directory("data"), b"data\0", wire.one_arg, "data",
                       wire.strings_reply(CHILDREN), CHILDREN),
    Op.GET_PERMS: Case(lambda: ops.get_perms("data/x"), b"data/x\0", wire.one_arg, "data/x",
                       wire.perms_reply(PERMS), PERMS),
    Op.SET_PERMS: Case(lambda: ops.set_perms("data/x", [PERMS[0], "r0", PERMS[2]]),
                       b"data/x\0n7\0r0\0b12\0", wire.decode_set_perms,
                       ("data/x", ["n7", "r0", "b12"]), wire.OK, None),
    Op.WATCH: Case(lambda: ops.watch("@releaseDomain", "tok 1"), b"@releaseDomain\0tok 1\0",
                   wire.decode_watch, ("@releaseDomain", "tok 1", -1), wire.OK, None),
    Op.UNWATCH: Case(lambda: ops.unwatch("data", "t"), b"data\0t\0", wire.decode_unwatch,
                     ("data", "t"), wire.OK, None),
    Op.TRANSACTION_START: Case(ops.transaction_start, b"\0", lambda p: None, None,
                               wire.transaction_start_reply(4294967295), 4294967295),
    Op.TRANSACTION_END: Case(lambda: ops.transaction_end(9, True), b"T\0",
                             wire.decode_transaction_end, True, wire.OK, None),
    Op.GET_DOMAIN_PATH: Case(lambda: ops.get_domain_path(32751), b"32751\0",
                             lambda p: wire.decode_domid(wire.one_arg(p)), 32751,
                             wire.string_reply("/local/domain/32751"), "/local/domain/32751"),
    Op.IS_DOMAIN_INTRODUCED: Case(lambda: _tool(Op.IS_DOMAIN_INTRODUCED, wire.domid_request(5)),
                                  b"5\0", lambda p: wire.decode_domid(wire.one_arg(p)), 5,
                                  wire.bool_reply(True), "T"),
    Op.RESET_WATCHES: Case(ops.reset_watches, b"\0", lambda p: None, None, wire.OK, None),
    Op.CONTROL: Case(lambda: _tool(Op.CONTROL, wire.args("quota", "set", "nodes", "5")),
                     b"quota\0set\0nodes\0005\0", wire.request_strings,
                     ["quota", "set", "nodes", "5"], wire.string_reply("OK"), "OK"),
    Op.INTRODUCE: Case(lambda: _tool(Op.INTRODUCE, wire.args("5", "1234", "7")),
                       b"5\0001234\0007\0", wire.request_strings, ["5", "1234", "7"],
                       wire.OK, "OK"),
    Op.RELEASE: Case(lambda: _tool(Op.RELEASE, wire.args("5")), b"5\0",
                     wire.request_strings, ["5"], wire.OK, "OK"),
    Op.RESUME: Case(lambda: _tool(Op.RESUME, wire.args("5")), b"5\0",
                    wire.request_strings, ["5"], wire.OK, "OK"),
    Op.SET_TARGET: Case(lambda: _tool(Op.SET_TARGET, wire.args("5", "0")), b"5\0000\0",
                        wire.request_strings, ["5", "0"], wire.OK, "OK"),
}
# Messages that are not requests, tested on their own below.
NOT_REQUESTS = {Op.WATCH_EVENT, Op.ERROR, Op.DIRECTORY_PART}


def _finish(call: Generator[ops.Request, bytes, Any], reply: bytes) -> Any:
    with pytest.raises(StopIteration) as done:
        call.send(reply)
    return done.value.value


def test_every_message_type_has_a_round_trip_here() -> None:
    assert set(CASES) | NOT_REQUESTS == set(Op)


@pytest.mark.parametrize("op", list(CASES), ids=lambda op: op.name)
def test_an_operation_means_the_same_on_both_sides(op: Op) -> None:
    case = CASES[op]
    call = case.call()
    request = next(call)
    assert request.op == op
    assert request.payload == case.wire_request
    assert case.server_reads(request.payload) == case.meant
    # The request as framed on the wire comes out whole.
    framer = wire.Framer()
    framer.feed(wire.pack(op, 77, request.tx, request.payload))
    assert framer.next_message() == wire.Message(op, 77, request.tx, case.wire_request)
    assert _finish(call, case.reply) == case.result


def test_a_transaction_end_aborts_with_f_in_its_transaction() -> None:
    call = ops.transaction_end(9, False)
    request = next(call)
    assert (request.payload, request.tx) == (b"F\0", 9)
    assert wire.decode_transaction_end(request.payload) is False


def test_requests_in_a_transaction_carry_its_id() -> None:
    call = ops.in_transaction(ops.read("data/x"), 12)
    assert next(call).tx == 12
    assert _finish(call, b"v") == b"v"


def test_strings_come_back_to_the_client_byte_for_byte() -> None:
    # The client sends UTF-8, xenstored keeps bytes (Latin-1): an event it
    # makes of what it read is what the client asked to watch.
    call = ops.watch("data/é", "tökén ☃")
    path, token, _depth = wire.decode_watch(next(call).payload) or ("", "", 0)
    payload = wire.event_payload(path, token)
    assert payload is not None
    assert wire.decode_event(payload) == WatchEvent("data/é", "tökén ☃")


def test_a_watch_event_reaches_the_watch_whose_path_it_is_under() -> None:
    @dataclass
    class W:
        path: str
        token: str

    table: ops.WatchTable[W] = ops.WatchTable()
    a, b, other = W("/a", "t"), W("/b", "t"), W("/a", "u")
    for w in (a, b, other):
        table.add(w)
    payload = wire.event_payload("/b/c", "t")
    assert payload is not None
    assert table.route(payload) == [(b, WatchEvent("/b/c", "t"))]
    assert table.route(b"/b\0") == []                           # no token: ignored
    assert len(wire.event_payload("/" + "x" * wire.PAYLOAD_MAX, "t") or b"") == 0


@pytest.mark.parametrize("name", wire.XSD_ERRORS)
def test_every_error_name_xenstored_sends_is_the_errno_the_client_raises(name: str) -> None:
    err = wire.error_number(name)
    payload = wire.encode_error(err)
    assert payload == name.encode() + b"\0"
    assert wire.decode_error(payload) == err
    exc = wire.xs_error(err, Op.TRANSACTION_END, "T")
    assert exc.errno == err and str(exc).endswith(f"xenstore TRANSACTION_END T: {name}")
    assert isinstance(exc, TransactionConflict) == (err == errno.EAGAIN)


def test_an_error_reply_is_thrown_into_the_operation() -> None:
    call = ops.read("data/x")
    next(call)
    with pytest.raises(FileNotFoundError):
        call.throw(wire.xs_error(wire.decode_error(b"ENOENT\0"), Op.READ, "data/x"))


def _read_directory(children: list[str], change_at: int | None = None) -> tuple[list[str], int]:
    """Read ``children`` through DIRECTORY (E2BIG) then DIRECTORY_PART, as the
    client and xenstored do; the node changes once at part ``change_at``."""
    call = ops.directory("/big")
    assert next(call).op == Op.DIRECTORY
    request = call.throw(OSError(errno.E2BIG, "too big"))
    parts = 0
    while True:
        assert request.op == Op.DIRECTORY_PART
        parsed = wire.decode_directory_part(request.payload)
        assert parsed is not None and parsed[0] == "/big"
        offset = parsed[1]
        assert request.payload == f"/big\0{offset}\0".encode()
        generation = 5
        if change_at is not None and parts >= change_at:
            generation = 6
            if parts == change_at:
                children = [*children, "late-comer"]
        reply = wire.directory_part_reply(generation, children, offset)
        assert len(reply) <= wire.PAYLOAD_MAX
        # A part is some of the names still to come, or all of them and one
        # more NUL, which ends the list.
        rest, chunk = wire.strings_reply(children)[offset:], reply.partition(b"\0")[2]
        assert chunk == rest + b"\0" or (rest.startswith(chunk) and len(chunk) < len(rest))
        parts += 1
        try:
            request = call.send(reply)
        except StopIteration as done:
            return done.value, parts


def test_a_long_directory_is_read_in_parts_that_each_fit_a_message() -> None:
    children = [f"child-{i:05d}-" + "n" * (i % 50) for i in range(900)]
    names, parts = _read_directory(children)
    assert names == children and parts > 3


def test_a_directory_that_changes_while_read_in_parts_is_read_again() -> None:
    children = [f"c{i:04d}" + "m" * 30 for i in range(400)]
    names, _ = _read_directory(children, change_at=2)
    assert names == [*children, "late-comer"]


def test_an_empty_directory_part_ends_the_list() -> None:
    pager = wire.DirectoryPager()
    assert pager.feed(wire.directory_part_reply(3, [], 0)) == []
    assert pager.feed(b"3\0") is not None


def _stream() -> tuple[bytes, list[wire.Message]]:
    messages = [wire.Message(op, i, i % 3, case.wire_request)
                for i, (op, case) in enumerate(CASES.items(), 1)]
    messages += [wire.Message(op, i, 0, case.reply)
                 for i, (op, case) in enumerate(CASES.items(), 100)]
    messages.append(wire.Message(Op.WATCH_EVENT, 0, 0, b"/a\0t\0"))
    messages.append(wire.Message(Op.READ, 9, 0, b"x" * wire.PAYLOAD_MAX))  # the largest
    return b"".join(wire.pack(*m) for m in messages), messages


def _drain(framer: wire.Framer) -> list[wire.Message]:
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


def test_messages_split_at_every_byte_boundary_come_out_whole() -> None:
    stream, messages = _stream()
    for cut in range(len(stream) + 1):
        framer = wire.Framer()
        framer.feed(stream[:cut])
        got = _drain(framer)
        framer.feed(stream[cut:])
        got += _drain(framer)
        assert got == messages, cut


def test_messages_fed_a_byte_at_a_time_come_out_whole() -> None:
    stream, messages = _stream()
    framer = wire.Framer()
    got: list[wire.Message] = []
    for i in range(len(stream)):
        framer.feed(stream[i:i + 1])
        got += _drain(framer)
    assert got == messages


def test_a_message_longer_than_the_protocol_allows_is_a_protocol_error() -> None:
    good = wire.pack(Op.READ, 1, 0, b"ok")
    framer = wire.Framer()
    framer.feed(good + wire.HEADER.pack(Op.READ, 2, 0, wire.PAYLOAD_MAX + 1))
    assert framer.next_message() == wire.Message(Op.READ, 1, 0, b"ok")   # the one before it
    with pytest.raises(wire.ProtocolError, match="4097 bytes"):
        framer.next_message()


def test_a_request_too_long_to_send_is_refused_before_it_is_sent() -> None:
    with pytest.raises(OSError) as too_big:
        wire.check_size(Op.WRITE, "x", b"v" * (wire.PAYLOAD_MAX + 1))
    assert too_big.value.errno == errno.E2BIG
    wire.check_size(Op.WRITE, "x", b"v" * wire.PAYLOAD_MAX)


def test_strings_with_a_nul_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="NUL"):
        next(ops.read("a\0b"))


def test_malformed_requests_read_as_malformed_on_xenstoreds_side() -> None:
    assert wire.one_arg(b"a\0b\0") is None and wire.one_arg(b"") is None
    assert wire.decode_write(b"no nul") is None
    assert wire.decode_set_perms(b"path only\0") is None
    assert wire.decode_watch(b"p\0t\0-1\0") is None and wire.decode_watch(b"p\0") is None
    assert wire.decode_watch(b"p\0t\0002\0") == ("p", "t", 2)
    assert wire.decode_unwatch(b"p\0t\0x\0") is None
    assert wire.decode_transaction_end(b"X\0") is None
    assert wire.decode_domid("65536") is None and wire.decode_domid("-1") is None
    assert wire.decode_directory_part(b"p\0") is None
    assert wire.decode_directory_part(b"p\0 12junk\0") == ("p", 12)     # atoi, as xenstored
