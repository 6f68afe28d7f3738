"""Session fixtures for the metald interoperability suite.

One metald process serves the whole session, in a Docker scope of its own; everything the suite
creates (containers, data dir, the process) is removed at the end, pass or fail.

Environment knobs:
  METALD_BIN            the server binary (default: <repo>/target/debug/metald)
  METALD_READY_TIMEOUT  seconds to wait for GET /health == 200 (default 60)
  METALD_TEST_IMAGE     the VM image (default metald-test-busybox:latest, built by
                        scripts/build-test-image.sh)
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

INTEROP_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEROP_DIR.parents[1]
PROTO_DIR = REPO_ROOT / "proto"
GEN_DIR = INTEROP_DIR / "gen"
PROTO_FILES = [
    "metal/vmprovisioner/v1/vmprovisioner.proto",
    "deploy/billaged/v1/billing.proto",
]
TEST_IMAGE = os.environ.get("METALD_TEST_IMAGE", "metald-test-busybox:latest")

# Lines for the end-of-run summary (metald log location, exit status, leftovers).
_SUMMARY: list[str] = []


@dataclass(frozen=True)
class Metald:
    base_url: str  # http://127.0.0.1:<port>
    port: int
    scope: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def venv_tool(name: str) -> str:
    """A console script of the running interpreter's venv, else one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install -r tests/interop/requirements.txt")
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scope_containers(scope: str) -> list[str]:
    out = _run(["docker", "ps", "-aq", "--filter", f"label=unkey.vm.scope={scope}"])
    return out.stdout.split()


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_image() -> str:
    """The VM image: built locally (no registry on this machine), idempotent."""
    script = REPO_ROOT / "scripts" / "build-test-image.sh"
    res = _run(["bash", str(script), TEST_IMAGE])
    if res.returncode != 0:
        pytest.fail(f"{script} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return TEST_IMAGE


@pytest.fixture(scope="session")
def stubs() -> types.SimpleNamespace:
    """Python stubs generated fresh from proto/ into tests/interop/gen/ (protobuf-py + connectrpc).

    Returns a namespace: .pb (messages), .connect (clients).
    """
    shutil.rmtree(GEN_DIR, ignore_errors=True)
    GEN_DIR.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--plugin=protoc-gen-py={venv_tool('protoc-gen-py')}",
        f"--plugin=protoc-gen-connectrpc={venv_tool('protoc-gen-connectrpc')}",
        f"--py_out={GEN_DIR}",
        f"--connectrpc_out={GEN_DIR}",
        *PROTO_FILES,
    ]
    res = _run(cmd, cwd=PROTO_DIR)
    if res.returncode != 0:
        pytest.fail(f"stub generation failed:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    if str(GEN_DIR) not in sys.path:
        sys.path.insert(0, str(GEN_DIR))
    importlib.invalidate_caches()
    return types.SimpleNamespace(
        pb=importlib.import_module("metal.vmprovisioner.v1.vmprovisioner_pb"),
        connect=importlib.import_module("metal.vmprovisioner.v1.vmprovisioner_connect"),
    )


@pytest.fixture(scope="session")
def metald(test_image, stubs, tmp_path_factory) -> Metald:
    """Starts metald on a free loopback port in a fresh Docker scope; yields its address."""
    binary = Path(os.environ.get("METALD_BIN", REPO_ROOT / "target" / "debug" / "metald"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"metald binary not found or not executable: {binary} (build it, or set METALD_BIN)")

    port = _free_port()
    scope = f"interop-{uuid.uuid4().hex[:10]}"
    workdir = tmp_path_factory.mktemp("metald")
    data_dir = workdir / "data"
    data_dir.mkdir()
    log_path = workdir / "metald.log"
    env = dict(os.environ)
    env.update(
        UNKEY_METALD_ADDRESS="127.0.0.1",
        UNKEY_METALD_PORT=str(port),
        UNKEY_METALD_DOCKER_SCOPE=scope,
        UNKEY_METALD_DATA_DIR=str(data_dir),
        UNKEY_METALD_BILLING_ENABLED="false",
        UNKEY_METALD_DOCKER_PORT_HOST_IP="127.0.0.1",
        UNKEY_METALD_LOG_LEVEL="info",
    )
    _SUMMARY.append(f"metald: {binary} on 127.0.0.1:{port}, scope {scope}, log {log_path}")
    server = Metald(base_url=f"http://127.0.0.1:{port}", port=port, scope=scope, log_path=log_path)

    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=workdir)
    try:
        wait_healthy(proc, server.base_url, server.log_tail,
                     float(os.environ.get("METALD_READY_TIMEOUT", "60")))
        yield server
    finally:
        _stop(proc)
        leftovers = _scope_containers(scope)
        if leftovers:
            _SUMMARY.append(f"removing {len(leftovers)} container(s) left in scope {scope}")
            _run(["docker", "rm", "-f", *leftovers])


def wait_healthy(proc: subprocess.Popen, base_url: str, log_tail, timeout: float,
                 interval: float = 0.25) -> None:
    """Polls GET /health of our metald until it answers 200; fails with the log's tail if the
    process exits first or the time runs out. `log_tail` is called only on failure."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"metald exited with {proc.returncode} before it was healthy; log tail:\n"
                        f"{log_tail()}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(interval)
    pytest.fail(f"metald not healthy after {timeout}s (last: {last}); log tail:\n{log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM our own process (by pid), then SIGKILL it if it does not exit in 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _SUMMARY.append("metald did not exit within 15 s of SIGTERM: killed")
            proc.kill()
            proc.wait()
            return
    _SUMMARY.append(f"metald exit status after SIGTERM: {proc.returncode} (spec §2: 0)")


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("metald interop")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
