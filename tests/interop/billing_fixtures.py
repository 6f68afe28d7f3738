"""Fixtures and helpers for the billing proof tests (test_billing.py).

Each test gets a rig of its own: a stand-in billaged (billing_standin.py) and one metald process
with billing enabled, in a fresh Docker scope and data dir; the metald can be SIGKILLed and started
again on the same port and data dir. Teardown stops only the processes the rig started (by pid),
removes the scope's containers by label, and stops the stand-in — pass or fail.

Independent readings of a container's usage (to compare metald's samples against) come straight
from the kernel: the container's cgroup (v1 on this host, v2 as a fallback) and its network
namespace's /proc/<pid>/net/dev.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from billing_standin import BillingStandin
from conftest import REPO_ROOT, wait_healthy

VM_SERVICE = "metal.vmprovisioner.v1.VmService"
RPC_TENANT = "billing-proof-tenant"  # X-Tenant-ID of our VmService calls (not the billing one)
MiB = 1 << 20


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# metald binary: pinned once per session
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def metald_binary(tmp_path_factory) -> Path:
    """A pinned copy (hard link) of the metald binary: the rebuilds that happen while the suite
    runs must not change the binary between a kill -9 and the restart within one test."""
    binary = Path(os.environ.get("METALD_BIN", REPO_ROOT / "target" / "debug" / "metald"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"metald binary not found or not executable: {binary}")
    pinned = tmp_path_factory.mktemp("bin") / "metald"
    try:
        os.link(binary, pinned)
    except OSError:
        shutil.copy2(binary, pinned)
    res = _run([str(pinned), "--print-config"])
    if not any(line.startswith("billing_heartbeat_interval") for line in res.stdout.splitlines()):
        pytest.fail(f"{binary} has no billing build (--print-config shows no "
                    f"billing_heartbeat_interval):\n{res.stdout}{res.stderr}")
    return pinned


@pytest.fixture(scope="session")
def uvicorn_available() -> None:
    try:
        import uvicorn  # noqa: F401, PLC0415
    except ImportError:
        pytest.fail("the billing stand-in needs uvicorn: "
                    "pip install -r tests/interop/requirements.txt")


# --------------------------------------------------------------------------------------------
# One metald process (restartable)
# --------------------------------------------------------------------------------------------


class RpcError(Exception):
    def __init__(self, method: str, status: int, body: str):
        super().__init__(f"{method}: HTTP {status}: {body[:500]}")
        self.status, self.body = status, body
        try:
            self.code = json.loads(body).get("code")
        except ValueError:
            self.code = None


class MetaldProc:
    """metald with billing pointed at the stand-in; its log file collects every run."""

    def __init__(self, binary: Path, workdir: Path, standin_url: str, env_overrides: dict):
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.scope = f"bill-{uuid.uuid4().hex[:10]}"
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "metald.log"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update(
            UNKEY_METALD_ADDRESS="127.0.0.1",
            UNKEY_METALD_PORT=str(self.port),
            UNKEY_METALD_DOCKER_SCOPE=self.scope,
            UNKEY_METALD_DATA_DIR=str(self.data_dir),
            UNKEY_METALD_DOCKER_PORT_HOST_IP="127.0.0.1",
            UNKEY_METALD_OTEL_PROMETHEUS_ENABLED="false",  # no shared :9464 between parallel runs
            UNKEY_METALD_LOG_LEVEL="info,metald::billing=debug",
            UNKEY_METALD_BILLING_ENABLED="true",
            UNKEY_METALD_BILLING_ENDPOINT=standin_url,
            UNKEY_METALD_BILLING_INTERVAL="1s",
            UNKEY_METALD_BILLING_FLUSH_INTERVAL="2s",
            UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL="2s",
            UNKEY_METALD_BILLING_RETRY_MAX="1s",
        )
        self.env.update({k: str(v) for k, v in env_overrides.items()})
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    # ---- process control ------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "metald already running"
        self.runs += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== metald run {self.runs} at {time.time():.3f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen([str(self.binary)], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir)
        wait_healthy(self.proc, self.base_url, self.log_tail, timeout, interval=0.1)

    def kill9(self) -> None:
        """SIGKILL our metald (by pid): a crash, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM our metald (by pid); SIGKILL after 15 s. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 60, grep: str | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        if grep:
            rx = re.compile(grep, re.I)
            text = [t for t in text if rx.search(t)]
        return "\n".join(text[-lines:])

    # ---- HTTP -------------------------------------------------------------------------------

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as resp:
                body = json.loads(resp.read())
                body["_http_status"] = resp.status
                return body
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            body["_http_status"] = e.code
            return body

    def billing_health(self) -> dict:
        return (self.health().get("checks") or {}).get("billing") or {}

    def rpc(self, method: str, body: dict, customer: str, timeout: float = 60,
            headers: dict | None = None) -> dict:
        """Connect JSON unary call to the VmService (extra headers, e.g. traceparent, added)."""
        req = urllib.request.Request(
            f"{self.base_url}/{VM_SERVICE}/{method}", data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer dev_user_{customer}", "X-Tenant-ID": RPC_TENANT,
                     **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RpcError(method, e.code, e.read().decode(errors="replace")) from None


# --------------------------------------------------------------------------------------------
# VMs and their containers
# --------------------------------------------------------------------------------------------


class Vm:
    def __init__(self, rig: "BillingRig", vm_id: str, customer: str):
        self.rig, self.vm_id, self.customer = rig, vm_id, customer
        self._cid: str | None = None

    def info(self) -> dict:
        return self.rig.metald.rpc("GetVmInfo", {"vmId": self.vm_id}, self.customer)

    def boot(self) -> dict:
        got = self.rig.metald.rpc("BootVm", {"vmId": self.vm_id}, self.customer)
        self._cid = None
        return got

    def shutdown(self, force: bool = False, timeout_seconds: int = 1) -> dict:
        return self.rig.metald.rpc(
            "ShutdownVm", {"vmId": self.vm_id, "force": force, "timeoutSeconds": timeout_seconds},
            self.customer)

    def delete(self, force: bool = True) -> dict:
        return self.rig.metald.rpc("DeleteVm", {"vmId": self.vm_id, "force": force},
                                   self.customer)

    @property
    def container_id(self) -> str:
        if self._cid is None:
            out = _run(["docker", "ps", "-aq", "--no-trunc",
                        "--filter", f"label=unkey.vm.scope={self.rig.metald.scope}",
                        "--filter", f"label=unkey.vm.id={self.vm_id}"]).stdout.split()
            assert len(out) == 1, f"containers for {self.vm_id} in scope: {out}"
            self._cid = out[0]
        return self._cid

    def host_port(self, container_port: int = 8080) -> int:
        info = self.info()
        for pm in (info.get("networkInfo") or {}).get("portMappings") or []:
            if int(pm.get("containerPort", 0)) == container_port and int(pm.get("hostPort", 0)):
                return int(pm["hostPort"])
        raise AssertionError(f"no host port for {container_port}: {info.get('networkInfo')}")

    def exec(self, script: str, detach: bool = False, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = ["docker", "exec", *(["-d"] if detach else []), self.container_id, "sh", "-c", script]
        res = _run(cmd, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}{res.stderr}")
        return res

    def pid(self) -> int:
        return int(_run(["docker", "inspect", "-f", "{{.State.Pid}}", self.container_id])
                   .stdout.strip() or 0)

    # ---- independent readings ---------------------------------------------------------------

    def cgroup_file(self, controller: str, name: str) -> Path | None:
        """The container's cgroup file: v1 (cgroupfs or systemd driver), else v2."""
        cid = self.container_id
        roots = {
            "cpuacct": ["cpuacct", "cpu,cpuacct", "cpuacct,cpu", "cpu"],
            "memory": ["memory"],
            "blkio": ["blkio"],
        }[controller]
        for root in roots:
            for sub in (f"docker/{cid}", f"system.slice/docker-{cid}.scope"):
                p = Path("/sys/fs/cgroup") / root / sub / name
                if p.exists():
                    return p
        return None

    def cgroup_v2_dir(self) -> Path | None:
        for sub in (f"system.slice/docker-{self.container_id}.scope", f"docker/{self.container_id}"):
            p = Path("/sys/fs/cgroup") / sub
            if (p / "cpu.stat").exists():
                return p
        return None

    def cpu_usage_ns(self) -> int:
        """The container's cumulative CPU time: cpuacct.usage (v1) or cpu.stat usage_usec (v2)."""
        p = self.cgroup_file("cpuacct", "cpuacct.usage")
        if p is not None:
            return int(p.read_text())
        v2 = self.cgroup_v2_dir()
        assert v2 is not None, f"no cgroup for container {self.container_id}"
        for line in (v2 / "cpu.stat").read_text().splitlines():
            k, v = line.split()
            if k == "usage_usec":
                return int(v) * 1000
        raise AssertionError("cpu.stat without usage_usec")

    def memory(self) -> dict:
        """usage (including page cache) and memory.stat of the container's cgroup."""
        p = self.cgroup_file("memory", "memory.usage_in_bytes")
        if p is not None:
            stat_path = p.parent / "memory.stat"
            usage = int(p.read_text())
        else:
            v2 = self.cgroup_v2_dir()
            assert v2 is not None
            usage = int((v2 / "memory.current").read_text())
            stat_path = v2 / "memory.stat"
        stat = {}
        for line in stat_path.read_text().splitlines():
            k, v = line.split()
            stat[k] = int(v)
        return {"usage": usage, "stat": stat}

    def blkio(self) -> tuple[int, int]:
        """(read, write) bytes from the cgroup's block-I/O accounting (v1 throttle, v2 io.stat)."""
        p = self.cgroup_file("blkio", "blkio.throttle.io_service_bytes_recursive")
        read = write = 0
        if p is not None:
            for line in p.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1].lower() == "read":
                    read += int(parts[2])
                elif len(parts) == 3 and parts[1].lower() == "write":
                    write += int(parts[2])
            return read, write
        v2 = self.cgroup_v2_dir()
        assert v2 is not None
        for line in (v2 / "io.stat").read_text().splitlines():
            for kv in line.split()[1:]:
                k, _, v = kv.partition("=")
                if k == "rbytes":
                    read += int(v)
                elif k == "wbytes":
                    write += int(v)
        return read, write

    def net_dev(self) -> tuple[int, int]:
        """(rx, tx) bytes summed over the container's interfaces except lo (as docker stats)."""
        rx = tx = 0
        for line in Path(f"/proc/{self.pid()}/net/dev").read_text().splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            f = rest.split()
            rx += int(f[0])
            tx += int(f[8])
        return rx, tx


# --------------------------------------------------------------------------------------------
# The rig: stand-in + metald + VMs, with cleanup
# --------------------------------------------------------------------------------------------


class BillingRig:
    def __init__(self, binary: Path, workdir: Path, image: str, env: dict, start_standin: bool):
        self.image = image
        self.standin = BillingStandin()
        self.standin.start()
        if not start_standin:
            self.standin.stop()  # the port is known, nothing listens
        self.metald = MetaldProc(binary, workdir, self.standin.url, env)
        self.vms: list[Vm] = []

    def create_vm(self, customer: str | None = None, memory_mib: int = 128,
                  ports: str = "8080/tcp", env: str = "PORT=8080",
                  vm_id: str | None = None) -> Vm:
        customer = customer or f"cust{uuid.uuid4().hex[:8]}"
        metadata = {"docker_image": self.image, "exposed_ports": ports, "env_vars": env}
        config = {
            "cpu": {"vcpuCount": 1},
            "memory": {"sizeBytes": str(memory_mib * MiB)},
            "boot": {"kernelPath": "/boot/vmlinux"},
            "storage": [{"id": "root", "path": "/dev/vda"}],
            "metadata": metadata,
        }
        body = {"config": config}
        if vm_id:
            body["vmId"] = vm_id
        got = self.metald.rpc("CreateVm", body, customer)
        vm = Vm(self, got["vmId"], customer)
        self.vms.append(vm)
        return vm

    def boot_vm(self, **kw) -> Vm:
        vm = self.create_vm(**kw)
        vm.boot()
        return vm

    # ---- stand-in queries ---------------------------------------------------------------------

    def wait_samples(self, vm: Vm, n: int = 1, after_ns: int | None = None,
                     timeout: float = 15) -> list[dict]:
        """Waits until the stand-in holds ≥ n samples of vm (with timestamp > after_ns)."""
        def enough():
            got = [s for s in self.standin.samples(vm.vm_id)
                   if after_ns is None or s["timestamp"] > after_ns]
            return got if len(got) >= n else None

        got = self.standin.wait_for(enough, timeout)
        if got is None:
            self.fail(f"{n} sample(s) of {vm.vm_id}"
                      f"{f' with timestamp > {after_ns}' if after_ns else ''} within {timeout}s",
                      f"{len(self.standin.samples(vm.vm_id))} samples in all")
        return got

    def context(self, log_lines: int = 40) -> str:
        return (f"\n--- stand-in calls (last 60) ---\n{self.standin.dump(60)}"
                f"\n--- metald log {self.metald.log_path} (billing lines, last {log_lines}) ---\n"
                f"{self.metald.log_tail(log_lines, grep='billing|billaged|spool|meter|sample|warn|error')}")

    def fail(self, expected: str, actual: str) -> None:
        pytest.fail(f"expected: {expected}\nactual: {actual}{self.context()}", pytrace=False)

    def check(self, cond: bool, expected: str, actual) -> None:
        if not cond:
            self.fail(expected, actual if isinstance(actual, str) else repr(actual))

    # ---- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.metald.stop()
        finally:
            try:
                leftovers = _run(["docker", "ps", "-aq", "--filter",
                                  f"label=unkey.vm.scope={self.metald.scope}"]).stdout.split()
                if leftovers:
                    _run(["docker", "rm", "-f", *leftovers])
            finally:
                self.standin.stop()


@pytest.fixture
def billing_rig(metald_binary, uvicorn_available, test_image, stubs, tmp_path):
    """Factory: billing_rig(env={...}, start_standin=True, start_metald=True) -> BillingRig."""
    rigs: list[BillingRig] = []

    def make(env: dict | None = None, start_standin: bool = True,
             start_metald: bool = True) -> BillingRig:
        workdir = tmp_path / f"rig{len(rigs)}"
        workdir.mkdir()
        rig = BillingRig(metald_binary, workdir, test_image, env or {}, start_standin)
        rigs.append(rig)
        if start_metald:
            rig.metald.start()
        return rig

    yield make
    for rig in rigs:
        rig.close()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def now_ns() -> int:
    return time.time_ns()


def http_get(port: int, path: str = "/", timeout: float = 10, tries: float = 20) -> bytes:
    deadline = time.monotonic() + tries
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def block_device_for(path: str) -> str | None:
    """'MAJ:MIN' of the whole disk holding path (blk-throttle rules take disks, not partitions)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysdev = Path(f"/sys/dev/block/{dev}")
    if not sysdev.exists():
        return None
    if (sysdev / "partition").exists():
        parent = sysdev.resolve().parent / "dev"
        if parent.exists():
            return parent.read_text().strip()
    return dev
