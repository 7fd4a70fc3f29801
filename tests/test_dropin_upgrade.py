"""The drop-in negotiation's messages and sniffers (vchan.upgrade): pure, no I/O."""

from __future__ import annotations

import pytest

from vchan.errors import RemoteProtocolError
from vchan.upgrade import (
    HELLO_SIZE,
    MAGIC_HELLO,
    Accept,
    AnswerReader,
    Claim,
    Decline,
    Hello,
    HelloSniffer,
    Offer,
    dropin_port,
)

NONCE = bytes(range(16))
TOKEN = bytes(range(16, 32))


def test_messages_round_trip() -> None:
    hello = Hello(7, NONCE)
    assert len(hello.encode()) == HELLO_SIZE
    assert Hello.decode(hello.encode()) == hello
    assert Claim.decode(Claim(TOKEN).encode()) == Claim(TOKEN)
    assert Accept.decode(Accept(NONCE).encode()) == Accept(NONCE)
    reader = AnswerReader()
    assert reader.feed(Offer(3, TOKEN, dropin_port(8080)).encode()) == \
        Offer(3, TOKEN, "tcp-8080")


@pytest.mark.parametrize("split", [1, 5, 8, 9, 25])
def test_sniffer_takes_a_hello_in_pieces(split: int) -> None:
    data = Hello(2, NONCE).encode()
    sniffer = HelloSniffer()
    assert sniffer.feed(data[:split]) is None
    assert sniffer.feed(data[split:]) == Hello(2, NONCE)


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", b"*1\r\n$4\r\nPING\r\n",
                                   b"\x16\x03\x01\x02\x00", b"\x00\x00\x00\x08\x04\xd2\x16/",
                                   MAGIC_HELLO[:3] + b"x"])
def test_sniffer_gives_up_at_the_first_byte_that_differs(first: bytes) -> None:
    sniffer = HelloSniffer()
    # Byte by byte, as a slow client sends: the decision comes at the first
    # byte that is not HELLO's, and every byte is kept for the application.
    for i in range(len(first)):
        result = sniffer.feed(first[i:i + 1])
        if result is False:
            break
        assert result is None
    assert result is False
    assert bytes(sniffer.data) == first[:i + 1]
    assert i == next(j for j in range(len(first)) if first[j] != MAGIC_HELLO[j])


def test_sniffer_refuses_bytes_after_a_hello_and_use_after_its_decision() -> None:
    with pytest.raises(RemoteProtocolError, match="after the drop-in HELLO"):
        HelloSniffer().feed(Hello(2, NONCE).encode() + b"x")
    sniffer = HelloSniffer()
    assert sniffer.feed(b"G") is False
    with pytest.raises(ValueError, match="after its decision"):
        sniffer.feed(b"E")


def test_a_hello_naming_no_domain_is_the_peers_error() -> None:
    data = MAGIC_HELLO + b"\x7f\xff" + NONCE
    with pytest.raises(RemoteProtocolError, match="not a domain id"):
        HelloSniffer().feed(data)


@pytest.mark.parametrize("split", [1, 9, 10, 27, 30])
def test_answer_reader_takes_an_offer_in_pieces(split: int) -> None:
    data = Offer(1, TOKEN, "tcp-80").encode()
    reader = AnswerReader()
    assert reader.feed(data[:split]) is None
    assert reader.feed(data[split:]) == Offer(1, TOKEN, "tcp-80")


def test_a_decline_keeps_the_bytes_after_it() -> None:
    reader = AnswerReader()
    assert reader.feed(Decline("no vchan here").encode() + b"220 smtp ready\r\n") == \
        Decline("no vchan here")
    assert reader.rest == b"220 smtp ready\r\n"


@pytest.mark.parametrize(("data", "match"), [
    (b"HTTP/1.1 400 Bad Request\r\n", "not a vchan drop-in server"),
    (b"\xf5vchan\x01\x02\x07", "unknown drop-in answer"),
    (Offer(1, TOKEN, "p").encode() + b"x", "bytes after the drop-in OFFER"),
    (b"\xf5vchan\x01\x02\x00\x00\x01" + TOKEN + b"\x01\xff", "non-ASCII"),
])
def test_answers_no_drop_in_server_sends_are_the_peers_error(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        AnswerReader().feed(data)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Hello(-1, NONCE).encode(), r"domid must be a domain id in 0\.\.32751, got -1"),
    (lambda: Hello(1, b"short").encode(), "nonce must be 16 bytes"),
    (lambda: Offer(1, TOKEN, "x" * 300).encode(), "too long"),
    (lambda: Claim(b"").encode(), "token must be 16 bytes"),
])
def test_bad_arguments_are_value_errors(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_malformed_claims_and_accepts() -> None:
    with pytest.raises(RemoteProtocolError, match="malformed drop-in CLAIM"):
        Claim.decode(Accept(NONCE).encode())
    with pytest.raises(RemoteProtocolError, match="malformed drop-in ACCEPT"):
        Accept.decode(Claim(TOKEN).encode())
