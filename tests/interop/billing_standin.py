"""A stand-in billaged: deploy.billaged.v1.BillingService on the Python `connectrpc` server.

An independent Connect implementation (connectrpc's ASGI application served by uvicorn over
HTTP/1.1), run in-process on a thread with its own event loop. It records every call — method,
request as a plain dict, the X-Tenant-ID header, all headers, arrival time, outcome — and can be
stopped (the port then refuses connections: an outage) and started again on the SAME port.

    standin = BillingStandin()          # needs the stubs in tests/interop/gen (conftest `stubs`)
    standin.start()                     # picks a free loopback port; standin.url, standin.port
    standin.stop()                      # outage: connection refused
    standin.start()                     # back on the same port, records kept
    standin.reject_vm("vm-1")           # SendMetricsBatch for vm-1 -> Connect invalid_argument
    standin.calls(method="SendMetricsBatch", vm_id="vm-1")

Request dicts use snake_case field names, int64 as Python ints, and each VMMetrics `timestamp` as
Unix nanoseconds (int), so timestamps compare exactly.

Needs `uvicorn` (tests/interop/requirements.txt).
"""

from __future__ import annotations

import asyncio
import copy
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GEN_DIR = Path(__file__).resolve().parent / "gen"

METHODS = ("SendMetricsBatch", "SendHeartbeat", "NotifyVmStarted", "NotifyVmStopped",
           "NotifyPossibleGap")


@dataclass
class Call:
    method: str
    request: dict
    tenant: str | None  # X-Tenant-ID, None when absent
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    arrived: float  # time.time() when the handler ran
    outcome: str = "ok"  # "ok" | "invalid_argument"

    @property
    def vm_id(self) -> str | None:
        return self.request.get("vm_id")

    def brief(self) -> str:
        req = dict(self.request)
        if "metrics" in req:
            ms = req["metrics"]
            req["metrics"] = (f"<{len(ms)} samples, ts {ms[0]['timestamp']}..{ms[-1]['timestamp']}>"
                              if ms else "<0 samples>")
        return (f"{self.arrived:.3f} {self.method} tenant={self.tenant!r} outcome={self.outcome} "
                f"{req}")


def _import_stubs():
    if str(GEN_DIR) not in sys.path:
        sys.path.insert(0, str(GEN_DIR))
    from deploy.billaged.v1 import billing_connect, billing_pb  # noqa: PLC0415

    return billing_pb, billing_connect


def _ts_nanos(ts) -> int | None:
    if ts is None:
        return None
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def request_dict(method: str, req) -> dict:
    """The request as a plain dict (explicit per message: exact ints, timestamps in ns)."""
    if method == "SendMetricsBatch":
        return {
            "vm_id": req.vm_id,
            "customer_id": req.customer_id,
            "metrics": [
                {
                    "timestamp": _ts_nanos(m.timestamp),
                    "cpu_time_nanos": int(m.cpu_time_nanos),
                    "memory_usage_bytes": int(m.memory_usage_bytes),
                    "disk_read_bytes": int(m.disk_read_bytes),
                    "disk_write_bytes": int(m.disk_write_bytes),
                    "network_rx_bytes": int(m.network_rx_bytes),
                    "network_tx_bytes": int(m.network_tx_bytes),
                }
                for m in req.metrics
            ],
        }
    if method == "SendHeartbeat":
        return {"instance_id": req.instance_id, "active_vms": list(req.active_vms)}
    if method == "NotifyVmStarted":
        return {"vm_id": req.vm_id, "customer_id": req.customer_id,
                "start_time": int(req.start_time)}
    if method == "NotifyVmStopped":
        return {"vm_id": req.vm_id, "stop_time": int(req.stop_time)}
    if method == "NotifyPossibleGap":
        return {"vm_id": req.vm_id, "last_sent": int(req.last_sent),
                "resume_time": int(req.resume_time)}
    raise ValueError(method)


class BillingStandin:
    """See the module docstring. Thread-safe; all public methods are called from test code."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port  # 0 until the first start picks one; then fixed for restarts
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._reject_vms: set[str] = set()
        self._server = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.starts = 0

    # ---- control ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def reject_vm(self, vm_id: str, reject: bool = True) -> None:
        """SendMetricsBatch for vm_id answers Connect invalid_argument (recorded as such)."""
        with self._lock:
            (self._reject_vms.add if reject else self._reject_vms.discard)(vm_id)

    def start(self, timeout: float = 10.0) -> None:
        import uvicorn  # noqa: PLC0415 — only the billing tests need it

        if self.running:
            return
        billing_pb, billing_connect = _import_stubs()
        app = billing_connect.BillingServiceASGIApplication(self._service(billing_pb))
        # Bind ourselves (SO_REUSEADDR: the same port again right after a stop, despite
        # TIME_WAIT) so that the first start can take a free port and every restart reuses it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.bind((self.host, self.port))
                break
            except OSError:
                if self.port == 0 or time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.1)
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2, timeout_keep_alive=5)
        server = uvicorn.Server(config)
        self._server, self._error = server, None

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            except BaseException as e:  # noqa: BLE001 — surfaced by start()/stop()
                self._error = e
            finally:
                try:
                    sock.close()
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name=f"billing-standin-{self.port}",
                                        daemon=True)
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"billing stand-in did not start on {self.url}: {self._error!r}")
            time.sleep(0.02)
        self.starts += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Outage: close the listener and every connection; the port refuses connections after."""
        if self._thread is None:
            return
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._thread, self._server = None, None

    def refuses_connections(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return False
        except OSError:
            return True

    # ---- records ---------------------------------------------------------------------------

    def calls(self, method: str | None = None, vm_id: str | None = None,
              since: float | None = None) -> list[Call]:
        with self._lock:
            out = list(self._calls)
        return [copy.deepcopy(c) for c in out
                if (method is None or c.method == method)
                and (vm_id is None or c.vm_id == vm_id)
                and (since is None or c.arrived >= since)]

    def samples(self, vm_id: str, accepted_only: bool = True) -> list[dict]:
        """Every VMMetrics received for vm_id, in arrival order (batches concatenated)."""
        out = []
        for c in self.calls("SendMetricsBatch", vm_id):
            if accepted_only and c.outcome != "ok":
                continue
            for m in c.request["metrics"]:
                out.append({**m, "_arrived": c.arrived})
        return out

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    def dump(self, limit: int = 200) -> str:
        calls = self.calls()
        lines = [c.brief() for c in calls[-limit:]]
        if len(calls) > limit:
            lines.insert(0, f"... {len(calls) - limit} earlier calls")
        return "\n".join(lines) or "(no calls)"

    def wait_for(self, predicate, timeout: float, interval: float = 0.1):
        """Polls predicate() until truthy; returns its value, or None after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                return None
            time.sleep(interval)

    # ---- the service -------------------------------------------------------------------------

    def _record(self, method: str, request, ctx) -> Call:
        headers: dict[str, str] = {}
        for k, v in ctx.request_headers.allitems():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        call = Call(method=method, request=request_dict(method, request),
                    tenant=headers.get("x-tenant-id"), headers=headers, arrived=time.time())
        with self._lock:
            if method == "SendMetricsBatch" and call.vm_id in self._reject_vms:
                call.outcome = "invalid_argument"
            self._calls.append(call)
        return call

    def _service(self, pb):
        from connectrpc.code import Code  # noqa: PLC0415
        from connectrpc.errors import ConnectError  # noqa: PLC0415

        standin = self

        class Service:
            async def send_metrics_batch(self, request, ctx):
                call = standin._record("SendMetricsBatch", request, ctx)
                if call.outcome == "invalid_argument":
                    raise ConnectError(Code.INVALID_ARGUMENT,
                                       f"stand-in rejects batches for vm {call.vm_id}")
                return pb.SendMetricsBatchResponse(success=True, message="recorded")

            async def send_heartbeat(self, request, ctx):
                standin._record("SendHeartbeat", request, ctx)
                return pb.SendHeartbeatResponse(success=True)

            async def notify_vm_started(self, request, ctx):
                standin._record("NotifyVmStarted", request, ctx)
                return pb.NotifyVmStartedResponse(success=True)

            async def notify_vm_stopped(self, request, ctx):
                standin._record("NotifyVmStopped", request, ctx)
                return pb.NotifyVmStoppedResponse(success=True)

            async def notify_possible_gap(self, request, ctx):
                standin._record("NotifyPossibleGap", request, ctx)
                return pb.NotifyPossibleGapResponse(success=True)

        return Service()


# ---- self-check: python tests/interop/billing_standin.py ------------------------------------


def _selfcheck() -> None:
    from connectrpc.code import Code  # noqa: PLC0415
    from connectrpc.codec import proto_binary_codec  # noqa: PLC0415
    from connectrpc.errors import ConnectError  # noqa: PLC0415
    from pyqwest import HTTPVersion, SyncClient, SyncHTTPTransport  # noqa: PLC0415

    pb, conn = _import_stubs()
    s = BillingStandin()
    s.start()
    port = s.port

    def client():
        t = SyncHTTPTransport(http_version=HTTPVersion.HTTP1, timeout=5)
        return conn.BillingServiceClientSync(s.url, codec=proto_binary_codec(),
                                             http_client=SyncClient(t), send_compression=None), t

    c, t = client()
    from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp  # noqa: PLC0415

    ts = Timestamp(seconds=1700000000, nanos=123)
    c.send_metrics_batch(pb.SendMetricsBatchRequest(
        vm_id="vm-a", customer_id="cust",
        metrics=[pb.VMMetrics(timestamp=ts, cpu_time_nanos=5, network_tx_bytes=2**40)]),
        headers={"X-Tenant-ID": "cust"})
    c.send_heartbeat(pb.SendHeartbeatRequest(instance_id="i", active_vms=["vm-a"]))
    s.reject_vm("vm-b")
    try:
        c.send_metrics_batch(pb.SendMetricsBatchRequest(vm_id="vm-b"), headers={"X-Tenant-ID": "x"})
        raise AssertionError("vm-b not rejected")
    except ConnectError as e:
        assert e.code == Code.INVALID_ARGUMENT, e
    c.close()
    t.close()
    s.stop()
    assert s.refuses_connections(), "port still open after stop"
    s.start()
    assert s.port == port
    c, t = client()
    c.notify_possible_gap(pb.NotifyPossibleGapRequest(vm_id="vm-a", last_sent=1, resume_time=2),
                          headers={"X-Tenant-ID": "cust"})
    c.close()
    t.close()
    s.stop()
    calls = s.calls()
    print(s.dump())
    assert [c.method for c in calls] == ["SendMetricsBatch", "SendHeartbeat", "SendMetricsBatch",
                                         "NotifyPossibleGap"], calls
    m = calls[0].request["metrics"][0]
    assert m["timestamp"] == 1700000000_000000123 and m["network_tx_bytes"] == 2**40, m
    assert calls[0].tenant == "cust" and calls[1].tenant is None
    assert calls[2].outcome == "invalid_argument"
    print("stand-in self-check ok")


if __name__ == "__main__":
    _selfcheck()
