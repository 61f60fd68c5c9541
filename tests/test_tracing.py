"""OpenTelemetry traces, read from the SDK's in-memory exporter of a real gateway in front of real
emulators: one payment that fails over is one trace, continuing the checkout's, with a span per
attempt carrying the attempt's facts; nothing of the trace context reaches a provider; the
trace ids are in the transaction line and the ops log; no span attribute ever holds card data,
a key or a token; and with tracing off there is no span and no middleware at all.
"""

from __future__ import annotations

import io
import itertools
import re
import string
import uuid
from pathlib import Path
from urllib.parse import quote

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from emulators.faults import FaultRule
from emulators.server import EmulatorServer
from gateway.app import build_app
from gateway.app_keys import CONSOLE, OPS_LOG, RECONCILER, TRACING
from gateway.certs.devca import DevCertLayout
from gateway.config import TracingConfig, parse_config
from gateway.api.tracing import tracing_middleware
from gateway.tracing.setup import build_tracing
from gateway.tracing.spans import NO_TRACING
from gateway.txlog import build_ops_logger
from gateway.redaction import Redactor
from tests.conftest import AUTH, card_payment, engine_config_data, idem, luhn_complete, pay, set_faults, txlog

CHECKOUT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CHECKOUT_SPAN = "00f067aa0ba902b7"
TRACED = {"observability": {"tracing": {"enabled": True}}}
# What a tree line shows of a span's attributes, in this order.
SHOWN = ("http.route", "http.response.status_code", "gateway.provider", "gateway.try", "gateway.outcome",
         "gateway.raw_code", "gateway.breaker_state", "gateway.failover_reason", "gateway.journal.kind",
         "gateway.payment_status")


def span_tree(spans: tuple[ReadableSpan, ...]) -> list[str]:
    """One line per span, children indented under their parent, in start order (README shows one)."""
    ids = {s.context.span_id for s in spans}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            attrs = span.attributes or {}
            shown = " ".join(f"{k.removeprefix('gateway.')}={attrs[k]}" for k in SHOWN if k in attrs)
            lines.append(f"{'  ' * depth}{span.name} [{span.kind.name.lower()}] {shown}".rstrip())
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


async def test_a_payment_that_fails_over_is_one_trace_with_a_span_per_attempt(
        tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer]) -> None:
    exporter = InMemorySpanExporter()
    ops_stream = io.StringIO()
    config = parse_config(engine_config_data(tmp_path, dev_certs, stripes, ("primary", "backup"), **TRACED))
    app = build_app(config, reconcile_interval_s=3600, span_exporter=exporter,
                    ops_log=build_ops_logger(ops_stream, redactor=Redactor(secrets=config.secret_values())))
    async with TestClient(TestServer(app)) as client:
        await stripes["primary"].set_outage(True)
        exporter.clear()  # start-up's spans (the reconciler's first pass finds nothing) are not this test's
        headers = {**idem(), "traceparent": f"00-{CHECKOUT_TRACE}-{CHECKOUT_SPAN}-01", "tracestate": "ck=1"}
        status, doc = await pay(client, headers=headers)
        assert status == 201 and doc["provider"] == "backup"
        [line] = await txlog(client, doc["id"])
        failures = client.app[CONSOLE].stats.failures()
        spans = exporter.get_finished_spans()
        with app[TRACING].span("ops.check"):
            app[OPS_LOG].info("inside_a_span")

    assert span_tree(spans) == [
        "POST /v1/payments [server] http.route=/v1/payments http.response.status_code=201",
        "  journal.claim [internal] provider=primary journal.kind=payment payment_status=attempting",
        # The first try has no journal.save: the claim's row holds its attempt (its write-ahead).
        "  provider.authorize [client] provider=primary try=1 outcome=unavailable raw_code=connect_failed"
        " breaker_state=closed",
        "  provider.authorize [client] provider=primary try=2 outcome=unavailable raw_code=connect_failed"
        " breaker_state=closed",
        "    journal.save [internal] provider=primary journal.kind=payment payment_status=attempting",
        "  provider.authorize [client] http.response.status_code=200 provider=backup try=1 outcome=approved"
        " raw_code=succeeded breaker_state=closed failover_reason=unavailable:connect_failed",
        "    journal.save [internal] provider=backup journal.kind=payment payment_status=attempting",
        "  journal.commit [internal] provider=backup journal.kind=payment payment_status=approved",
    ]
    # One trace, the checkout's, under the checkout's span; the caller's tracestate is not carried.
    assert {format(s.context.trace_id, "032x") for s in spans} == {CHECKOUT_TRACE}
    [server] = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.parent is not None and format(server.parent.span_id, "016x") == CHECKOUT_SPAN
    assert all(len(s.context.trace_state) == 0 for s in spans)
    assert all(s.attributes.get("gateway.payment_id") == doc["id"] for s in spans if s.name.startswith("journal."))
    # The provider call is the gateway's own request: no trace context reaches the provider.
    received = list(stripes["backup"].emulator.received_headers)
    assert received and not any(name.lower() in ("traceparent", "tracestate") for h in received for name in h)
    # The transaction line and the ops log name the trace and the span they were written in.
    assert line["trace_id"] == CHECKOUT_TRACE and line["span_id"] == format(server.context.span_id, "016x")
    # The console's last failures: the primary's two refused connections, each with the trace.
    assert [(f["provider"], f["code"], f["trace_id"]) for f in failures] == [
        ("primary", "connect_failed", CHECKOUT_TRACE)] * 2
    [inside] = [orjson.loads(t) for t in ops_stream.getvalue().splitlines() if "inside_a_span" in t]
    [check] = [s for s in exporter.get_finished_spans() if s.name == "ops.check"]
    assert (inside["trace_id"], inside["span_id"]) == (format(check.context.trace_id, "032x"),
                                                       format(check.context.span_id, "016x"))


async def test_the_reconciler_settling_a_pending_payment_is_a_trace_of_its_own(
        tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer]) -> None:
    exporter = InMemorySpanExporter()
    config = parse_config(engine_config_data(
        tmp_path, dev_certs, stripes, ("primary", "backup"),
        providers={"primary": {"timeout_ms": 300, "retry": {"max_attempts": 1}}}, **TRACED))
    set_faults(stripes["primary"], FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",)),
               FaultRule(kind="latency", latency_ms=1500, operations=("status",)))
    async with TestClient(TestServer(build_app(config, reconcile_interval_s=3600, span_exporter=exporter))) as client:
        status, doc = await pay(client)
        assert status == 201 and doc["status"] == "pending"
        stripes["primary"].emulator.faults.clear()
        exporter.clear()
        assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 1
        [_, settled] = await txlog(client, doc["id"])
    spans = exporter.get_finished_spans()
    assert span_tree(spans) == [
        "reconcile.payment [internal] provider=primary journal.kind=reconciliation payment_status=pending",
        "  provider.status [client] http.response.status_code=200 provider=primary try=0 outcome=approved"
        " raw_code=succeeded breaker_state=closed",
        "  journal.commit [internal] provider=primary journal.kind=reconciliation payment_status=approved",
    ]
    [root] = [s for s in spans if s.parent is None]
    assert settled["event"] == "reconciliation" and settled["trace_id"] == format(root.context.trace_id, "032x")


async def test_a_request_without_traceparent_starts_its_own_trace_and_a_bad_one_is_ignored(
        tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer]) -> None:
    exporter = InMemorySpanExporter()
    config = parse_config(engine_config_data(tmp_path, dev_certs, stripes, ("primary",), **TRACED))
    async with TestClient(TestServer(build_app(config, reconcile_interval_s=3600, span_exporter=exporter))) as client:
        exporter.clear()
        for traceparent in (None, "00-zz-not-a-trace-01", f"00-{'0' * 32}-{CHECKOUT_SPAN}-01"):
            headers = idem() if traceparent is None else {**idem(), "traceparent": traceparent}
            status, _ = await pay(client, headers=headers)
            assert status == 201
        assert (await client.get("/readyz")).status == 200  # health checks are not traced
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == 3 and all(s.parent is None for s in servers)
    assert len({s.context.trace_id for s in servers}) == 3


async def test_tracing_off_is_no_middleware_and_no_span(tmp_path: Path, dev_certs: DevCertLayout,
                                                        stripes: dict[str, EmulatorServer]) -> None:
    config = parse_config(engine_config_data(tmp_path, dev_certs, stripes, ("primary",)))
    assert config.observability.tracing.enabled is False  # the default
    app = build_app(config, reconcile_interval_s=3600, span_exporter=(exporter := InMemorySpanExporter()))
    assert tracing_middleware not in app.middlewares
    async with TestClient(TestServer(app)) as client:
        assert client.app[TRACING] is NO_TRACING
        status, doc = await pay(client, headers={**idem(), "traceparent": f"00-{CHECKOUT_TRACE}-{CHECKOUT_SPAN}-01"})
        assert status == 201
        [line] = await txlog(client, doc["id"])
    assert exporter.get_finished_spans() == ()
    assert "trace_id" not in line and "span_id" not in line


async def test_spans_reach_an_otlp_collector_at_the_configured_endpoint(
        tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer]) -> None:
    """The real exporter: OTLP/HTTP protobuf to a collector on loopback, flushed when the app stops."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    collector = web.Application()
    collector.router.add_post("/v1/traces", traces)
    async with TestServer(collector) as sink:
        config = parse_config(engine_config_data(tmp_path, dev_certs, stripes, ("primary",), observability={
            "tracing": {"enabled": True, "endpoint": str(sink.make_url("/v1/traces")), "service_name": "gw-test"}}))
        async with TestClient(TestServer(build_app(config, reconcile_interval_s=3600))) as client:
            status, doc = await pay(client, headers={**idem(), "traceparent": f"00-{CHECKOUT_TRACE}-{CHECKOUT_SPAN}-01"})
            assert status == 201
    spans = [(resource.resource, span) for message in received for resource in message.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert {span.name for _, span in spans} >= {"POST /v1/payments", "journal.claim", "provider.authorize",
                                                "journal.commit"}
    assert {span.trace_id.hex() for _, span in spans if span.name != "reconcile.payment"} == {CHECKOUT_TRACE}
    assert all(any(a.key == "service.name" and a.value.string_value == "gw-test" for a in resource.attributes)
               for resource, _ in spans)


def test_tracing_settings_are_validated_with_their_field_path(tmp_path: Path, dev_certs: DevCertLayout) -> None:
    servers = {name: type("S", (), {"url": "https://127.0.0.1:1"})() for name in ("primary",)}
    for bad, field in (({"sample_ratio": 1.5}, "sample_ratio"), ({"endpoint": "collector:4318"}, "endpoint"),
                       ({"exporter": "zipkin"}, "exporter")):
        data = engine_config_data(tmp_path, dev_certs, servers, ("primary",),
                                  observability={"tracing": {"enabled": True, **bad}})
        try:
            parse_config(data)
        except Exception as exc:  # noqa: BLE001 - the message is what is checked
            assert f"observability.tracing.{field}" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
    assert build_tracing(TracingConfig(), Redactor()) is NO_TRACING


# -- no card data, key or token in any span ---------------------------------------------------------

_examples = itertools.count()
_LETTERS = string.ascii_letters


@st.composite
def pans(draw: st.DrawFn) -> str:
    length = draw(st.sampled_from([15, 16, 19]))
    body = draw(st.text(string.digits, min_size=length - 2, max_size=length - 2).filter(lambda b: len(set(b)) >= 4))
    return luhn_complete("4" + body)


@st.composite
def secrets_cases(draw: st.DrawFn) -> dict[str, str]:
    """A card (number, CVC), a token, a provider-style key, and where they are smuggled: a
    provider's decline code, a payment id in a URL, the caller's metadata (the card and the key,
    written as the log's detector knows them), and the caller's `tracestate` (the token). The
    token is also a payment method; no record the spans are made from ever holds it."""
    pan = draw(pans())
    key = "sk_live_" + draw(st.text(_LETTERS + string.digits, min_size=12, max_size=24))
    token = "tok_" + draw(st.text(_LETTERS + string.digits, min_size=12, max_size=24))
    smuggled = draw(st.sampled_from([pan, f"{pan[:4]} {pan[4:8]} {pan[8:12]} {pan[12:]}", key,
                                     f"Bearer {token}"]))
    wrap = st.text(_LETTERS + "_", max_size=6)
    return {"pan": pan, "cvc": draw(st.text(string.digits, min_size=3, max_size=4)), "key": key, "token": token,
            "smuggled": draw(wrap) + smuggled + draw(wrap)}


def _leaks(value: object, case: dict[str, str]) -> list[str]:
    text = str(value)
    digits = re.sub(r"[^0-9]", "", text)
    found = [name for name in ("key", "token") if case[name] in text]
    if case["pan"] in digits:
        found.append("pan")
    if re.search(rf"(?<![0-9]){case['cvc']}(?![0-9])", text) and not isinstance(value, int):
        found.append("cvc")
    return found


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=secrets_cases())
async def test_no_span_attribute_ever_holds_card_data_a_key_or_a_token(
        case: dict[str, str], tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer]) -> None:
    exporter = InMemorySpanExporter()
    config = parse_config(engine_config_data(tmp_path / f"ex-{next(_examples)}", dev_certs, stripes,
                                             ("primary", "backup"), route={"cascade_on": [case["smuggled"]]},
                                             **TRACED))
    # The provider answers with the smuggled text as its decline code (cascaded to the backup).
    set_faults(stripes["primary"], FaultRule(kind="decline", decline_code=case["smuggled"]))
    set_faults(stripes["backup"], FaultRule(kind="decline", decline_code=case["smuggled"]))
    try:
        async with TestClient(TestServer(build_app(config, reconcile_interval_s=3600, span_exporter=exporter))) as c:
            parent = {"traceparent": f"00-{uuid.uuid4().hex}-{CHECKOUT_SPAN}-01", "tracestate": f"x={case['token']}"}
            card = card_payment(case["pan"])
            card["payment_method"]["cvc"] = case["cvc"]
            for body in (card, {**card_payment(), "payment_method": {"type": "token", "token": case["token"]}},
                         {**card_payment(), "metadata": {"note": case["smuggled"]}}):
                resp = await c.post("/v1/payments", json=body, headers={**idem(), **parent})
                assert resp.status in (201, 402, 422, 502), await resp.text()
            await c.get(f"/v1/payments/{quote(case['smuggled'], safe='')}", headers={**AUTH, **parent})
            await c.post(f"/v1/payments/{quote(case['smuggled'], safe='')}/refunds", json={},
                         headers={**idem(), **parent})
    finally:
        for server in stripes.values():
            server.emulator.reset()
    spans = exporter.get_finished_spans()
    assert any(s.attributes.get("gateway.raw_code") for s in spans), "the decline code reached a span"
    for span in spans:
        assert not _leaks(span.name, case), span.name
        assert not _leaks(span.context.trace_state.to_header(), case)
        for name, value in (span.attributes or {}).items():
            assert not _leaks(value, case), f"{span.name} {name}={value!r}"
        for event in span.events:
            assert not _leaks(dict(event.attributes or {}), case), event.name
