"""Traces (spec §11): with UNKEY_METALD_OTEL_ENABLED, metald exports spans by OTLP/HTTP.

A stand-in collector (otlp_standin.py, decoding with the OpenTelemetry project's own bindings)
receives the spans; the stand-in billaged (billing_standin.py) records the headers of metald's
billing calls. Checked: a server span `metald.<Method>` per RPC that continues the caller's
`traceparent`, child spans for the Docker calls it made, error status on a failed RPC, a fresh
trace when the caller sends none, and a `traceparent` on outgoing billing calls that names
metald's own client span.

Run alone: .venv/bin/python -m pytest -q -p no:cacheprovider tests/interop/test_tracing.py
"""

from __future__ import annotations

import secrets

import pytest

from billing_fixtures import (  # noqa: F401 — fixtures are used by name
    MiB,
    RpcError,
    billing_rig,
    metald_binary,
    uvicorn_available,
)
from otlp_standin import OtlpStandin

SERVICE_NAME = "metald-trace-test"


@pytest.fixture
def collector():
    standin = OtlpStandin()
    standin.start()
    yield standin
    standin.stop()


def traceparent(trace_id: str, parent_id: str) -> dict:
    return {"traceparent": f"00-{trace_id}-{parent_id}-01"}


def test_rpc_spans_continue_the_callers_trace(billing_rig, collector, test_image):
    rig = billing_rig(env={
        "UNKEY_METALD_OTEL_ENABLED": "true",
        "UNKEY_METALD_OTEL_ENDPOINT": collector.endpoint,
        "UNKEY_METALD_OTEL_SERVICE_NAME": SERVICE_NAME,
        "UNKEY_METALD_OTEL_PROMETHEUS_ENABLED": "false",
    })
    customer = f"trace{secrets.token_hex(4)}"
    trace_id = secrets.token_hex(16)
    create_parent, boot_parent, error_parent = (secrets.token_hex(8) for _ in range(3))
    config = {
        "cpu": {"vcpuCount": 1},
        "memory": {"sizeBytes": str(64 * MiB)},
        "boot": {"kernelPath": "/boot/vmlinux"},
        "storage": [{"id": "root", "path": "/dev/vda"}],
        "metadata": {"docker_image": test_image, "env_vars": "PORT=8080"},
    }
    metald = rig.metald
    vm_id = metald.rpc("CreateVm", {"config": config}, customer,
                       headers=traceparent(trace_id, create_parent))["vmId"]
    try:
        metald.rpc("BootVm", {"vmId": vm_id}, customer, headers=traceparent(trace_id, boot_parent))
        metald.rpc("GetVmInfo", {"vmId": vm_id}, customer)  # no traceparent: a trace of its own
        with pytest.raises(RpcError) as refused:
            metald.rpc("GetVmInfo", {"vmId": "vm-trace-no-such-vm"}, customer,
                       headers=traceparent(trace_id, error_parent))
        assert refused.value.code == "not_found"
        started = rig.standin.wait_for(
            lambda: rig.standin.calls("NotifyVmStarted", vm_id=vm_id), timeout=20)
        assert started, f"no NotifyVmStarted for {vm_id}:\n{rig.standin.dump(30)}"
    finally:
        metald.rpc("DeleteVm", {"vmId": vm_id, "force": True}, customer)
    # SIGTERM: metald flushes its span queue before it exits.
    assert metald.stop() == 0, metald.log_tail()

    spans = collector.spans()
    dump = f"\n--- exported spans ---\n{collector.dump()}\n--- metald log ---\n{metald.log_tail(30)}"

    def one(name: str, parent: str) -> "object":
        found = [s for s in spans if s.name == name and s.parent_span_id == parent]
        assert len(found) == 1, f"expected one {name} span with parent {parent}{dump}"
        return found[0]

    def children(span) -> list[str]:
        return sorted(s.name for s in spans if s.parent_span_id == span.span_id)

    assert spans, f"the collector received no spans{dump}"
    assert {s.service for s in spans} == {SERVICE_NAME}, dump

    create = one("metald.CreateVm", create_parent)
    assert (create.trace_id, create.kind) == (trace_id, "server"), dump
    assert create.attributes.get("rpc.method") == "CreateVm", create.attributes
    assert create.attributes.get("rpc.service") == "metal.vmprovisioner.v1.VmService"
    assert "docker.create" in children(create), f"CreateVm children {children(create)}{dump}"

    boot = one("metald.BootVm", boot_parent)
    assert boot.trace_id == trace_id and boot.status_code != 2, dump
    assert "docker.start" in children(boot), f"BootVm children {children(boot)}{dump}"
    docker_start = next(s for s in spans if s.parent_span_id == boot.span_id
                        and s.name == "docker.start")
    assert docker_start.kind == "client" and docker_start.trace_id == trace_id, dump

    failed = one("metald.GetVmInfo", error_parent)
    assert failed.trace_id == trace_id and failed.status_code == 2, dump
    assert failed.attributes.get("rpc.connect_rpc.error_code") == "not_found", failed.attributes

    fresh = [s for s in spans if s.name == "metald.GetVmInfo" and not s.parent_span_id]
    assert len(fresh) == 1 and fresh[0].trace_id != trace_id, dump

    # Billing: the call carries a traceparent naming metald's own client span.
    header = started[0].headers.get("traceparent", "")
    assert header, f"NotifyVmStarted without traceparent: {started[0].headers}"
    _, call_trace, call_span, _ = header.split("-")
    client = [s for s in spans if s.span_id == call_span]
    assert len(client) == 1, f"no exported span {call_span} for {header}{dump}"
    assert (client[0].name, client[0].kind, client[0].trace_id) == (
        "billaged.NotifyVmStarted", "client", call_trace), dump


def test_no_traceparent_on_billing_calls_when_tracing_is_off(billing_rig):
    rig = billing_rig()
    rig.boot_vm()
    got = rig.standin.wait_for(lambda: rig.standin.calls("NotifyVmStarted"), timeout=20)
    assert got, rig.standin.dump(30)
    assert "traceparent" not in got[0].headers, got[0].headers
