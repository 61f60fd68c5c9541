"""`/openapi.json` is a valid OpenAPI 3.1 document a client can follow, and it cannot drift from
the server: the request constraints it publishes give the same verdict as the pydantic models
that validate requests, on bodies hypothesis draws around every bound; every answer a real
gateway gives (payments, follow-ups, each error status) is listed for its operation and matches
the published schema, with `Retry-After` where a 503 or a busy key says to retry; and the links
from `POST /v1/payments` reach the read and follow-up operations with the payment's id.
"""

from __future__ import annotations

import string
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from pydantic import ValidationError

from emulators.server import EmulatorServer
from gateway.api.currencies import ISO_4217
from gateway.api.openapi import build_openapi
from gateway.api.schemas import PaymentCreate
from tests.conftest import AUTH, READER_KEY, card_payment, idem, luhn_complete

DOCUMENT = build_openapi()


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A JSON Schema validator for a schema of the document (its `#/components/...` refs resolve
    against the document's components)."""
    return Draft202012Validator({"components": DOCUMENT["components"], **schema})


def operation(operation_id: str) -> tuple[str, str, dict[str, Any]]:
    for path, methods in DOCUMENT["paths"].items():
        for method, op in methods.items():
            if op.get("operationId") == operation_id:
                return method.upper(), path, op
    raise AssertionError(f"no operation {operation_id}")


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    validate_openapi(DOCUMENT)  # raises with the path of whatever is wrong
    ids = [op["operationId"] for methods in DOCUMENT["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))


# -- the published constraints are the models' ----------------------------------------------------

_ODD_LETTERS = "ıſK"  # upper-case to ASCII letters in Python ("ınr".upper() == "INR")
_LOOKALIKE = str.maketrans({"I": "ı", "S": "ſ", "K": "K"})


def _any_case(code: str, flips: list[bool]) -> str:
    return "".join(c.lower() if flip else c for c, flip in zip(code, flips))


currencies = st.one_of(
    st.builds(_any_case, st.sampled_from(sorted(ISO_4217)), st.lists(st.booleans(), min_size=3, max_size=3)),
    st.sampled_from(sorted(c.translate(_LOOKALIKE) for c in ISO_4217 if set(c) & set("ISK"))),
    st.text(string.ascii_letters + _ODD_LETTERS, min_size=2, max_size=4),
    st.integers(0, 999),
)
amounts = st.one_of(st.integers(-2, 2), st.integers(10**12 - 2, 10**12 + 2), st.sampled_from([0.5, "100", True]))
texts = st.text(string.ascii_letters + " -", max_size=3)


def _near(limit: int) -> st.SearchStrategy[str]:
    return st.builds(lambda n: "x" * n, st.integers(max(0, limit - 2), limit + 2))


@st.composite
def card_numbers(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["digits", "other", "int"]))
    if kind == "digits":  # always Luhn-valid: the one rule JSON Schema cannot say
        return luhn_complete(draw(st.text(string.digits, min_size=9, max_size=20)))
    if kind == "other":
        return draw(st.text(string.digits + "a ٣", min_size=11, max_size=20))
    return 4242424242424242


# One field at a time is varied (a body wrong in two ways is refused whatever either rule says):
# the field's path, and the values drawn for it around its bounds.
_FIELDS: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("amount",): amounts,
    ("currency",): currencies,
    ("merchant_reference",): st.one_of(_near(1), _near(128), st.integers(-9, 9)),
    ("capture",): st.one_of(st.booleans(), st.integers(0, 1), st.none()),
    ("country",): st.one_of(st.none(), st.text("DEde1", min_size=1, max_size=3)),
    ("description",): st.one_of(st.none(), _near(255)),
    ("metadata",): st.dictionaries(st.one_of(texts, _near(40)), st.one_of(texts, _near(500), st.integers(-9, 9)),
                                   max_size=22),
    ("unknown_field",): st.just(1),
    ("payment_method", "type"): st.sampled_from(["card", "token", "cash", "CARD"]),
    ("payment_method", "number"): card_numbers(),
    ("payment_method", "exp_month"): st.integers(-1, 14),
    ("payment_method", "exp_year"): st.integers(1998, 2102),
    ("payment_method", "cvc"): st.one_of(st.none(), st.text(string.digits + "a", min_size=2, max_size=5)),
    ("payment_method", "holder_name"): st.one_of(st.none(), _near(100)),
}
_REQUIRED = [("amount",), ("currency",), ("payment_method",), ("merchant_reference",),
             ("payment_method", "number"), ("payment_method", "exp_month")]
_MISSING = object()


@st.composite
def payment_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid card or token payment with one field set to a drawn value, or one required field left out."""
    body: dict[str, Any] = card_payment()
    if draw(st.booleans()):
        body["payment_method"] = {"type": "token", "token": draw(st.one_of(_near(3), _near(255), st.integers(-9, 9)))}
        return body
    path = draw(st.sampled_from(sorted(_FIELDS) + _REQUIRED))
    value = draw(_FIELDS[path]) if path in _FIELDS and draw(st.integers(0, 5)) else _MISSING
    *parents, name = path
    target = body
    for parent in parents:
        target = target[parent]
    if value is _MISSING:
        target.pop(name, None)
    else:
        target[name] = value
    return body


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(body=payment_bodies())
def test_the_published_request_schema_gives_the_models_verdict(body: dict[str, Any]) -> None:
    data = orjson.loads(orjson.dumps(body))  # what the server's JSON decoding hands the model
    published = validator({"$ref": "#/components/schemas/PaymentCreate"}).is_valid(data)
    try:
        PaymentCreate.model_validate(data)
        accepted = True
    except ValidationError:
        accepted = False
    assert published == accepted, f"the document says {published}, the server says {accepted}"


# -- real answers are the published ones -------------------------------------------------------------

READER = {"Authorization": f"Bearer {READER_KEY}"}


async def _answer(client: TestClient, operation_id: str, payment_id: str | None = None, *,
                  body: Any = None, headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, Any]:
    """Call an operation by its operationId and check its answer against the document."""
    method, path, op = operation(operation_id)
    url = path.replace("{payment_id}", payment_id or "pay_none")
    resp = await client.request(method, url, json=body, headers=headers if headers is not None else idem(), **kwargs)
    doc = await resp.json()
    listed = op["responses"]
    assert str(resp.status) in listed, f"{operation_id} answered {resp.status}, not in the document: {doc}"
    spec = listed[str(resp.status)]
    errors = sorted(validator(spec["content"]["application/json"]["schema"]).iter_errors(doc), key=str)
    assert not errors, f"{operation_id} {resp.status}: {[e.message for e in errors]} in {doc}"
    if resp.status == 503 or (resp.status == 409 and doc["code"] == "idempotency_key_in_use"):
        assert "headers" in spec and resp.headers["Retry-After"].isdigit()
    return resp.status, doc


async def test_every_answer_is_listed_and_matches_its_schema(make_config: Any, start_gateway: Any,
                                                            emulators: dict[str, EmulatorServer]) -> None:
    client = await start_gateway(make_config())
    seen: set[tuple[str, int]] = set()

    async def call(operation_id: str, payment_id: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        status, doc = await _answer(client, operation_id, payment_id, **kwargs)
        seen.add((operation_id, status))
        return status, doc

    _, captured = await call("createPayment", body=card_payment())
    _, held = await call("createPayment", body=card_payment(capture=False))
    key = idem()
    await call("createPayment", body=card_payment(), headers=key)
    await call("createPayment", body=card_payment(amount=1), headers=key)  # 422 idempotency_key_reused
    await call("createPayment", body=card_payment(currency="XXX"))  # 422 invalid_field
    await call("createPayment", body=card_payment(), headers=AUTH)  # 400 no key
    await call("createPayment", body=card_payment(), headers={"Idempotency-Key": "k"})  # 401
    await call("createPayment", body=card_payment(), headers={**READER, "Idempotency-Key": "k"})  # 403
    await call("createPayment", data=b"amount=1", headers={**idem(), "Content-Type": "text/plain"})  # 415
    await call("createPayment", data=b"{" + b" " * 70_000 + b"}",
               headers={**idem(), "Content-Type": "application/json"})  # 413
    await call("getPayment", captured["id"], headers=AUTH)
    await call("getPayment", "pay_unknown", headers=AUTH)  # 404
    await call("voidPayment", captured["id"], body={})  # 409: captured already
    await call("refundPayment", captured["id"], body={"amount": 10**9})  # 422 amount_too_large
    await call("refundPayment", captured["id"], body={"amount": 100})
    await call("capturePayment", "pay_unknown", body={})  # 404
    await emulators["stripe"].set_outage(True)
    await call("capturePayment", held["id"], body={})  # 503 provider_unavailable, Retry-After
    for server in emulators.values():
        await server.set_outage(True)
    await call("createPayment", body=card_payment())  # 502: no provider took it
    assert seen >= {("createPayment", s) for s in (201, 400, 401, 403, 413, 415, 422, 502)} | {
        ("getPayment", 200), ("getPayment", 404), ("voidPayment", 409), ("refundPayment", 422),
        ("refundPayment", 200), ("capturePayment", 404), ("capturePayment", 503)}


async def test_the_links_from_a_new_payment_lead_to_its_read_and_follow_ups(make_config: Any,
                                                                           start_gateway: Any) -> None:
    client = await start_gateway(make_config())
    links = operation("createPayment")[2]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} == {"getPayment", "capturePayment", "voidPayment",
                                                                "refundPayment"}
    assert all(link["parameters"] == {"payment_id": "$response.body#/id"} for link in links.values())
    # Two authorisations, each followed through the links: read and void; capture and refund.
    for chain in (("GetPayment", "VoidPayment"), ("CapturePayment", "RefundPayment")):
        status, created = await _answer(client, "createPayment", body=card_payment(capture=False))
        assert status == 201
        payment_id = created["id"]  # $response.body#/id
        for name in chain:
            operation_id = links[name]["operationId"]
            status, doc = await _answer(client, operation_id, payment_id, body=None if name == "GetPayment" else {},
                                        headers=AUTH if name == "GetPayment" else idem())
            assert status == 200 and doc["id"] == payment_id, (name, doc)
        assert doc["status"] == ("voided" if chain[1] == "VoidPayment" else "refunded")
