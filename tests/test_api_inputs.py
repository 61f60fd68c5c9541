"""Bad input at the front door (DESIGN rule 7): every malformed body, header or JSON document
gets a JSON `{code, message, field}` error, on the payment route and on every follow-up, and
leaves nothing behind (no charge, no claimed key, no traceback in the ops log).

Real HTTP against the real app; where the aiohttp client cannot send what a broken or hostile
client sends (a non-ASCII header, a connection closed mid-body), raw bytes over a socket.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import time
import uuid
import zlib
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.http.errors import ApiError
from gateway.http.inputs import parse_timeout_ms
from gateway.txlog import build_ops_logger
from tests.conftest import AUTH, card_payment

BODY = orjson.dumps(card_payment())
FOLLOW_UPS = ("capture", "void", "refunds")


class Gateway:
    def __init__(self, client: TestClient, ops: io.StringIO) -> None:
        self.client = client
        self.ops = ops

    async def post(self, path: str, body: bytes, headers: dict[str, str] | list[tuple[str, str]]) -> tuple[int, Any]:
        base = [("Content-Type", "application/json")]
        resp = await self.client.post(path, data=body, headers=base + list(dict(headers).items()
                                                                              if isinstance(headers, dict) else headers))
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()

    async def authorised(self, capture: bool = False) -> str:
        """An approved payment (authorised only, unless `capture`) to follow up on."""
        status, doc = await self.post("/v1/payments", orjson.dumps(card_payment(capture=capture)), key())
        assert status == 201 and doc["status"] == "approved", doc
        return doc["id"]

    async def metric(self, line: str) -> float | None:
        text = await (await self.client.get("/metrics")).text()
        for row in text.splitlines():
            if row.startswith(line + " "):
                return float(row.rsplit(" ", 1)[1])
        return None

    def assert_no_traceback(self) -> None:
        log = self.ops.getvalue()
        assert "Traceback" not in log and "unhandled_error" not in log, log


@pytest.fixture
async def gateway(make_config, start_gateway) -> Gateway:
    ops = io.StringIO()
    return Gateway(await start_gateway(make_config(), ops_log=build_ops_logger(ops)), ops)


def key() -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": str(uuid.uuid4())}


async def route(gateway: Gateway, name: str) -> str:
    if name == "payment":
        return "/v1/payments"
    payment_id = await gateway.authorised(capture=name == "refunds")
    return f"/v1/payments/{payment_id}/{name}"


def charges(emulators) -> int:
    return sum(len(server.emulator.ledger.charges()) for server in emulators.values())


# -- Content-Encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["payment", *FOLLOW_UPS])
@pytest.mark.parametrize(("encoding", "body", "status", "code"), [
    ("gzip", b"definitely not gzip", 400, "malformed_body"),
    ("deflate", b"definitely not zlib", 400, "malformed_body"),
    ("gzip", gzip.compress(b'{"amount": 1}')[:-6], 400, "malformed_body"),      # truncated
    ("gzip", gzip.compress(b"{}") + b"junk", 400, "malformed_body"),            # bytes after the end
    ("gzip", gzip.compress(b" " * 200_000), 413, "body_too_large"),            # 200 kB from a 200-byte bomb
    ("br", BODY, 415, "unsupported_encoding"),        # aiohttp's parser: a bare-text 400 before any middleware
    ("zstd", BODY, 415, "unsupported_encoding"),
    ("x-custom", BODY, 415, "unsupported_encoding"),  # passed through as if it were plain JSON
    ("gzip, gzip", gzip.compress(gzip.compress(BODY)), 415, "unsupported_encoding"),
])
async def test_a_body_that_cannot_be_decoded_is_a_json_error_with_no_traceback(
        gateway, emulators, name, encoding, body, status, code) -> None:
    path = await route(gateway, name)
    before = charges(emulators)
    headers = {**key(), "Content-Encoding": encoding}

    got, doc = await gateway.post(path, body, headers)

    assert (got, doc["code"]) == (status, code), doc
    assert doc["message"] and set(doc) == {"code", "message", "field"}
    assert doc["field"] in (None, "Content-Encoding")
    gateway.assert_no_traceback()
    assert charges(emulators) == before
    # nothing was claimed: the same key with a decodable body goes through
    if name == "payment":
        again, doc = await gateway.post(path, gzip.compress(BODY), {**headers, "Content-Encoding": "gzip"})
        assert again == 201 and doc["status"] == "approved"


@pytest.mark.parametrize(("encoding", "compress"), [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("identity", bytes)])
async def test_a_compressed_body_is_decoded(gateway, emulators, encoding, compress) -> None:
    status, doc = await gateway.post("/v1/payments", compress(BODY), {**key(), "Content-Encoding": encoding})

    assert status == 201 and doc["status"] == "approved"
    assert charges(emulators) == 1


async def test_unsupported_encoding_names_what_is_accepted(gateway) -> None:
    resp = await gateway.client.post("/v1/payments", data=BODY, headers={
        **key(), "Content-Type": "application/json", "Content-Encoding": "br"})

    assert resp.status == 415
    assert resp.headers["Accept-Encoding"] == "gzip, deflate"


# -- a client that hangs up ------------------------------------------------------------------------


async def test_a_client_hanging_up_mid_body_is_counted_not_logged(gateway) -> None:
    head = (f"POST /v1/payments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Idempotency-Key: {uuid.uuid4()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode()
    for _ in range(3):
        _reader, writer = await asyncio.open_connection(gateway.client.host, gateway.client.port)
        writer.write(head + BODY[:20])
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    deadline = time.monotonic() + 5  # the server notices each hang-up on its own schedule
    while await gateway.metric("gateway_client_disconnects_total") != 3.0:
        assert time.monotonic() < deadline, gateway.ops.getvalue()
        await asyncio.sleep(0.01)
    gateway.assert_no_traceback()


async def test_malformed_http_framing_is_counted_not_logged(gateway, caplog) -> None:
    """What aiohttp's parser refuses never reaches a handler (it answers a bare-text 400): it
    must not cost a traceback in the log either."""
    head = (f"POST /v1/payments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Idempotency-Key: {uuid.uuid4()}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode()  # "zz" is no chunk size
    reader, writer = await asyncio.open_connection(gateway.client.host, gateway.client.port)
    try:
        writer.write(head)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()

    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400"
    assert await gateway.metric("gateway_malformed_http_total") == 1.0
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    gateway.assert_no_traceback()


# -- duplicate JSON keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    (BODY[:-1] + b',"amount":999999}', "amount"),
    (BODY.replace(b'"type":"card"', b'"type":"card","number":"4000000000000002"'), "payment_method.number"),
    # colons inside strings (the slow count), and an escaped quote (the regex count)
    (BODY[:-1] + b',"description":"at 20:00","description":"at 21:00"}', "description"),
    (BODY[:-1] + b',"metadata":{"k":"a\\":b","k" : "c"}}', "metadata.k"),
])
async def test_a_key_sent_twice_is_refused_with_its_path(gateway, emulators, body, field) -> None:
    status, doc = await gateway.post("/v1/payments", body, key())

    assert (status, doc["code"], doc["field"]) == (400, "duplicate_json_key", field), doc
    assert charges(emulators) == 0


async def test_a_key_sent_twice_in_a_follow_up_is_refused(gateway, emulators) -> None:
    path = await route(gateway, "refunds")

    status, doc = await gateway.post(path, b'{"amount": 1, "amount": 1299}', key())

    assert (status, doc["code"], doc["field"]) == (400, "duplicate_json_key", "amount")
    payment = await (await gateway.client.get(path.removesuffix("/refunds"), headers=AUTH)).json()
    assert payment["refunded_amount"] == 0


async def test_colons_and_escapes_in_strings_are_not_duplicates(gateway) -> None:
    body = orjson.dumps(card_payment(description='a "quoted": 20:00 note', metadata={
        "return_url": "https://shop.example/return?o=1", "k:1": "v\\:"}))

    status, doc = await gateway.post("/v1/payments", body, key())

    assert status == 201 and doc["status"] == "approved"


# -- headers that must come once -------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Idempotency-Key", "Authorization", "Request-Timeout", "Content-Encoding"])
@pytest.mark.parametrize("name", ["payment", *FOLLOW_UPS])
async def test_a_header_sent_twice_is_refused_by_name(gateway, emulators, header, name) -> None:
    path = await route(gateway, name)
    before = charges(emulators)
    headers = {**key(), "Request-Timeout": "4000", "Content-Encoding": "identity"}
    twice = [(k, v) for k, v in headers.items() if k != header] + [(header, headers[header])] * 2

    status, doc = await gateway.post(path, BODY if name == "payment" else b"{}", twice)

    assert (status, doc["code"], doc["field"]) == (400, "duplicate_header", header), doc
    assert charges(emulators) == before


async def test_two_authorization_headers_on_a_read_are_refused(gateway) -> None:
    payment_id = await gateway.authorised()

    resp = await gateway.client.get(f"/v1/payments/{payment_id}", headers=[("Authorization", AUTH["Authorization"])] * 2)

    assert resp.status == 400
    assert (await resp.json())["field"] == "Authorization"


# -- Request-Timeout -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["payment", *FOLLOW_UPS])
@pytest.mark.parametrize("value", ["+8000", "8_000", "8000.0", "0x10", "-5", "0", "120001", "8 000", "1e3"])
async def test_request_timeout_must_be_plain_ascii_digits(gateway, emulators, name, value) -> None:
    path = await route(gateway, name)
    before = charges(emulators)

    status, doc = await gateway.post(path, BODY if name == "payment" else b"{}",
                                     {**key(), "Request-Timeout": value})

    assert (status, doc["code"], doc["field"]) == (400, "invalid_header", "Request-Timeout"), doc
    assert charges(emulators) == before


async def test_request_timeout_in_non_ascii_digits_is_refused(gateway, emulators) -> None:
    """The aiohttp client will not send `٨٠٠٠` (Arabic-Indic digits); a raw client can, as UTF-8."""
    head = (f"POST /v1/payments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Idempotency-Key: {uuid.uuid4()}\r\nContent-Type: application/json\r\nRequest-Timeout: ٨٠٠٠\r\n"
            f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(gateway.client.host, gateway.client.port)
    try:
        writer.write(head + BODY)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()

    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"400", answer
    doc = orjson.loads(rest.partition(b"\r\n\r\n")[2])
    assert (doc["code"], doc["field"]) == ("invalid_header", "Request-Timeout")
    assert charges(emulators) == 0


@pytest.mark.parametrize("value", [" 8000", "8000 ", "\t8000", "٨٠٠٠", "８０００", "+1", "1_0"])
def test_parse_timeout_takes_nothing_python_int_would_forgive(value) -> None:
    """Leading or trailing whitespace never reaches a handler over HTTP (the parser strips it,
    RFC 9110 5.5), so the parser of the header value is checked on its own too."""
    int(value)  # what the old parser accepted
    with pytest.raises(ApiError) as err:
        parse_timeout_ms(value)
    assert err.value.field == "Request-Timeout"


async def test_a_plain_request_timeout_is_accepted(gateway) -> None:
    status, doc = await gateway.post("/v1/payments", BODY, {**key(), "Request-Timeout": "08000"})

    assert status == 201 and doc["status"] == "approved"


async def _raw(gateway: Gateway, head: bytes, body: bytes = b"") -> int:
    """One request written as bytes (the aiohttp client refuses these headers): its status."""
    reader, writer = await asyncio.open_connection(gateway.client.host, gateway.client.port)
    try:
        writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(answer.split(b" ", 2)[1])


BEARER = AUTH["Authorization"].encode()
FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


@pytest.mark.parametrize(("head", "body", "expected"), [
    (b"GET /v1/payments/pay_abc HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer \xff\r\n", b"", 401),
    (b"POST /v1/payments HTTP/1.1\r\nHost: g\r\nAuthorization: " + BEARER + b"\xe9\r\n"
     b"Idempotency-Key: a1b2c3x\r\nContent-Type: application/json\r\n", BODY, 401),
    (b"GET /console HTTP/1.1\r\nHost: g\r\nCookie: gateway_console=ops.1.\xe9\xe9\r\n", b"", 401),
    (b"POST /console/login HTTP/1.1\r\nHost: g\r\n" + FORM, b"key=\xe9\xff", 400),
    (b"POST /console/login HTTP/1.1\r\nHost: g\r\nContent-Type: application/x-www-form-urlencoded; charset=utf-99\r\n",
     b"key=x", 400),
    (b"POST /console/login HTTP/1.1\r\nHost: g\r\nContent-Type: multipart/form-data\r\n", b"junk", 400),
], ids=["auth-byte", "auth-trailing-byte", "console-cookie", "login-undecodable", "login-charset", "login-multipart"])
async def test_bytes_past_ascii_in_credentials_and_forms_are_refused_not_a_500(
        gateway: Gateway, head: bytes, body: bytes, expected: int) -> None:
    """An outside attack answered each of these 500 (an encode of the key, compare_digest on
    non-ASCII text, the form's decoding): each is the client's mistake, answered as such."""
    assert await _raw(gateway, head, body) == expected
    gateway.assert_no_traceback()


async def test_a_body_that_never_finishes_arriving_is_408_and_the_connection_closed(make_config,
                                                                                    start_gateway) -> None:
    """Outside attack: full headers, `Content-Length: 500` and 9 bytes of body held the handler
    and the socket for 150 s and more (a slowloris of bodies). Now the handler answers 408 with
    `Connection: close`; aiohttp then drains the socket for at most its lingering time (10 s)."""
    client = await start_gateway(make_config(server={"body_timeout_s": 0.3}))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b"POST /v1/payments HTTP/1.1\r\nHost: g\r\nAuthorization: " + BEARER + b"\r\n"
                     b"Idempotency-Key: k-slow-body\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                     b'{"amount"')
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
        answer = head + await asyncio.wait_for(reader.readexactly(length), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.split(b" ", 2)[1] == b"408", answer
    assert b"Connection: close" in head and b'"body_timeout"' in answer
