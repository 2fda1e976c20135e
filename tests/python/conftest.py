"""Session fixtures: one `carebridge serve` process for the whole suite, and a fhirpy client on it.

The server binary is $CAREBRIDGE_BIN (default <repo>/target/debug/carebridge). It is started with
`--http 127.0.0.1:0` and a temporary data dir; its address comes from the `listening on http(s)://IP:PORT` line
it prints on stdout. At the end of the session it gets SIGTERM and must exit 0 within a few seconds (graceful
shutdown is part of what is tested).
"""

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests
from fhirpy import SyncFHIRClient

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 10
LISTENING = re.compile(r"listening on (https?://[0-9A-Za-z.\[\]:]+)")
MLLP_LISTENING = re.compile(r"MLLP listening on ([0-9A-Za-z.\[\]:]+)")

FHIR_JSON = "application/fhir+json"


class Server:
    def __init__(self, proc, base_url, log_path, data_dir=None, mllp=None):
        self.proc = proc
        # (host, port) of the MLLP listener when the hub was started with --mllp.
        self.mllp = mllp
        self.base_url = base_url
        self.log_path = log_path
        self.data_dir = data_dir
        # requests keyword arguments for a hub on TLS (verify=CA bundle, cert=(cert, key)); empty for http.
        self.tls = {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""


def _binary() -> Path:
    return Path(os.environ.get("CAREBRIDGE_BIN") or REPO / "target" / "debug" / "carebridge")


def start_server(tmp_path_factory, name="carebridge", extra_args=None, data_dir=None, auth=False, env_extra=None):
    """Start `carebridge serve` on a fresh data dir (or on `data_dir`, e.g. a previous server's, to restart
    it); `extra_args` are appended to the command line (e.g. delivery flags). Authentication is off
    (CAREBRIDGE_AUTH=none, loopback only) unless `auth` is true. Returns a Server."""
    binary = _binary()
    if not binary.exists():
        pytest.exit(f"server binary {binary} not found: run `cargo build -p carebridge` or set CAREBRIDGE_BIN", 2)
    root = tmp_path_factory.mktemp(name)
    data_dir = Path(data_dir) if data_dir is not None else root / "data"
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    if not auth:
        env["CAREBRIDGE_AUTH"] = "none"
    env.update(env_extra or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "serve", "--http", "127.0.0.1:0", "--data-dir", str(data_dir), *(extra_args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    found = {}
    ready = threading.Event()

    def read_stdout():
        # Reads stdout for the life of the process, so the server never blocks on a full pipe.
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            mm = MLLP_LISTENING.search(line)
            if mm:
                host, _, port = mm.group(1).rpartition(":")
                found["mllp"] = (host, int(port))
            m = LISTENING.search(line)
            if m and not ready.is_set():
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    ready.wait(STARTUP_TIMEOUT_S)
    srv = Server(proc, found.get("url"), log_path, data_dir, found.get("mllp"))
    if srv.base_url is None:
        proc.kill()
        proc.wait()
        pytest.exit(f"carebridge did not print 'listening on http(s)://...' (exit {proc.returncode}); log:\n{srv.log()}", 2)
    return srv


def run_cli(srv, *args, check=True):
    """`carebridge ARGS --data-dir <the server's data dir>` (e.g. `clients add`), output as text; asserts success
    unless `check` is false."""
    out = subprocess.run([str(_binary()), *args, "--data-dir", str(srv.data_dir)],
                         capture_output=True, timeout=60, text=True)
    if check:
        assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out


def stop_server(srv):
    """SIGTERM; the hub must drain and exit 0 within a few seconds."""
    proc = srv.proc
    if proc.poll() is not None:
        pytest.fail(f"carebridge died during the session with exit {proc.returncode}; log:\n{srv.log()}")
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"carebridge did not exit within {SHUTDOWN_TIMEOUT_S} s of SIGTERM; log:\n{srv.log()}")
    assert code == 0, f"carebridge exited {code} after SIGTERM (expected 0); log:\n{srv.log()}"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def base_url(server) -> str:
    """http://127.0.0.1:PORT"""
    return server.base_url


@pytest.fixture(scope="session")
def fhir(base_url) -> str:
    """The FHIR base URL, http://127.0.0.1:PORT/fhir"""
    return base_url + "/fhir"


@pytest.fixture(scope="session")
def client(fhir) -> SyncFHIRClient:
    return SyncFHIRClient(fhir, requests_config={"timeout": 30})


class Raw:
    """Thin requests wrapper for checks fhirpy does not expose (status codes, headers)."""

    def __init__(self, fhir_base):
        self.fhir = fhir_base

    def url(self, path):
        return path if path.startswith("http") else f"{self.fhir}/{path.lstrip('/')}"

    def request(self, method, path, body=None, headers=None, **kw):
        h = {"Accept": FHIR_JSON}
        data = None
        if body is not None:
            h["Content-Type"] = FHIR_JSON
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        h.update(headers or {})
        return requests.request(method, self.url(path), data=data, headers=h, timeout=30, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def put(self, path, body, **kw):
        return self.request("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def create(self, resource) -> dict:
        """POST and return the stored resource (asserting 201)."""
        r = self.post(resource["resourceType"], resource)
        assert r.status_code == 201, describe(r)
        return r.json()

    def all_pages(self, path, **kw):
        """Every Bundle of a paged GET, following `next` links."""
        pages = []
        url = path
        for _ in range(200):
            r = self.get(url, **kw)
            assert r.status_code == 200, describe(r)
            b = r.json()
            pages.append(b)
            nxt = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
            if not nxt:
                return pages
            url = nxt
        raise AssertionError(f"more than 200 pages from {path}")


@pytest.fixture(scope="session")
def raw(fhir) -> Raw:
    return Raw(fhir)


def describe(r: requests.Response) -> str:
    """A failing request and its response, for assertion messages (and bug reports)."""
    req = r.request
    body = req.body.decode(errors="replace") if isinstance(req.body, bytes) else (req.body or "")
    hdrs = "\n".join(f"  {k}: {v}" for k, v in r.headers.items())
    return (
        f"\n>>> {req.method} {req.url}\n{body[:2000]}\n"
        f"<<< {r.status_code} {r.reason}\n{hdrs}\n{r.text[:4000]}"
    )


def issues_with_expression(outcome: dict, prefix: str):
    return [
        i
        for i in outcome.get("issue", [])
        if i.get("severity") in ("error", "fatal") and any(e.startswith(prefix) for e in i.get("expression", []))
    ]


def error_issues(outcome: dict):
    return [i for i in outcome.get("issue", []) if i.get("severity") in ("error", "fatal")]
