"""Start NHS England's `mesh-sandbox` (a local MESH API server) for tests, on a free loopback port.

The sandbox runs under uvicorn from the same Python environment as pytest, with full NHSMESH authentication
(`AUTH_MODE=full`), an in-memory store and a test shared key. Its fixed test mailboxes are X26ABC1, X26ABC2 and
X26ABC3, all with password `password`; workflows TEST_WORKFLOW (X26ABC1 -> X26ABC2) and friends exist for
endpoint lookup.

This module's name equals the sandbox package's name, so the server is started with `python -P` from a
scratch directory: neither the current directory nor this test directory may end up first on its import path.

Use `sandbox` (module scope) in a test module:  `from mesh_sandbox import sandbox  # noqa: F401`.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

SHARED_KEY = "CarebridgeTestKey"
PASSWORD = "password"
MAILBOXES = ("X26ABC1", "X26ABC2", "X26ABC3")
STARTUP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sandbox:
    """A running sandbox: `url` (http:// or https://), `reset()` empties every mailbox, `stop()` ends it."""

    def __init__(self, proc, url, log_path, verify=None, cert=None):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.verify = verify
        self.cert = cert

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def _get(self, path, method="GET"):
        return requests.request(method, self.url + path, timeout=10, verify=self.verify, cert=self.cert)

    def reset(self):
        r = self._get("/messageexchange/admin/reset", method="DELETE")
        assert r.status_code == 200, f"sandbox reset failed: {r.status_code} {r.text}"

    def admin_message(self, message_id) -> dict:
        """The sandbox's stored view of a message (chunk count, content encoding...), from its admin API."""
        r = self._get(f"/messageexchange/admin/message/{message_id}")
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        return r.json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sandbox(workdir: Path, tls: dict = None) -> Sandbox:
    """Start the sandbox in `workdir`. `tls` may hold `certfile`, `keyfile` (server) and `ca` (require client
    certificates signed by it); the URL is then https://localhost:PORT."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(AUTH_MODE="full", STORE_MODE="memory", SHARED_KEY=SHARED_KEY)
    cmd = [sys.executable, "-P", "-m", "uvicorn", "mesh_sandbox.api:app",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"]
    scheme, host, verify, cert = "http", "127.0.0.1", None, None
    if tls:
        cmd += ["--ssl-certfile", str(tls["certfile"]), "--ssl-keyfile", str(tls["keyfile"])]
        scheme, host, verify = "https", "localhost", str(tls["ca"])
        if tls.get("require_client_cert"):
            cmd += ["--ssl-ca-certs", str(tls["ca"]), "--ssl-cert-reqs", "2"]
            cert = (str(tls["client_cert"]), str(tls["client_key"]))
    log_path = workdir / "sandbox.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    sb = Sandbox(proc, f"{scheme}://{host}:{port}", log_path, verify=verify, cert=cert)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mesh-sandbox exited with {proc.returncode} during startup:\n{sb.log()}")
        try:
            if sb._get("/health").status_code == 200:
                return sb
        except requests.RequestException:
            pass
        time.sleep(0.2)
    sb.stop()
    pytest.fail(f"mesh-sandbox did not answer /health within {STARTUP_TIMEOUT_S} s:\n{sb.log()}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A mesh-sandbox for the test module, emptied before each test by the test module's own fixture."""
    # Probe in a subprocess: in this process the name `mesh_sandbox` is this file.
    probe = subprocess.run([sys.executable, "-P", "-c", "import mesh_sandbox.api"],
                           cwd=str(tmp_path_factory.getbasetemp()), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("mesh-sandbox is not installed in this Python environment "
                    f"(pip install -r tests/python/requirements.txt): {probe.stderr.strip()[-300:]}")
    sb = start_sandbox(tmp_path_factory.mktemp("mesh-sandbox"))
    yield sb
    sb.stop()
