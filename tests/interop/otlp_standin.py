"""A stand-in OpenTelemetry collector: OTLP/HTTP traces (`POST /v1/traces`, binary protobuf).

It decodes every export with the OpenTelemetry project's own Python bindings
(`opentelemetry-proto`), so what metald sends is read by code none of us wrote, and keeps each
span as a plain `Span`. Loopback only; started and stopped by the test that owns it.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

KINDS = {v: k.removeprefix("SPAN_KIND_").lower() for k, v in PbSpan.SpanKind.items()}


@dataclass
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "server", "client", "internal", ...
    service: str  # the resource's service.name
    attributes: dict = field(default_factory=dict)
    status_code: int = 0  # 0 unset, 1 ok, 2 error

    def brief(self) -> str:
        parent = self.parent_span_id or "-"
        return (f"{self.name} [{self.kind}] trace={self.trace_id} span={self.span_id} "
                f"parent={parent} status={self.status_code}")


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpStandin:
    def __init__(self, host: str = "127.0.0.1"):
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self.exports = 0
        self.content_types: set[str] = set()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest()
                try:
                    request.ParseFromString(body)
                except Exception:  # noqa: BLE001 (any decode failure is a 400)
                    self.send_error(400, "not an ExportTraceServiceRequest")
                    return
                standin._record(request, self.headers.get("Content-Type", ""))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """host:port, the compat form of UNKEY_METALD_OTEL_ENDPOINT."""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, request: ExportTraceServiceRequest, content_type: str) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = ""
            for kv in resource_spans.resource.attributes:
                if kv.key == "service.name":
                    service = _value(kv.value)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(Span(
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), name=s.name,
                        kind=KINDS.get(s.kind, str(s.kind)), service=service,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        status_code=s.status.code))
        with self._lock:
            self.exports += 1
            self.content_types.add(content_type)
            self._spans.extend(spans)

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, predicate, timeout: float, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while True:
            got = predicate(self.spans())
            if got or time.monotonic() > deadline:
                return got
            time.sleep(interval)

    def dump(self, limit: int = 80) -> str:
        return "\n".join(s.brief() for s in self.spans()[-limit:]) or "(no spans)"
