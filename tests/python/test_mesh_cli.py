"""`carebridge mesh` against NHS England's mesh-sandbox, with NHS England's own `mesh_client` as the peer.

Each test starts from empty mailboxes. Messages go both ways between the hub's CLI and `mesh_client`, plain and
chunked (small chunk size, gzip per chunk), and are compared byte for byte; tracking, endpoint lookup, refusals
(wrong password, unknown recipient) and an optional mutual-TLS run complete the picture.
"""

import json
import os
import random
import shutil
import subprocess
import warnings

import pytest
from mesh_client import MeshClient

from conftest import _binary
from mesh_sandbox import PASSWORD, SHARED_KEY, sandbox, start_sandbox  # noqa: F401 (sandbox is a fixture)

SMALL_CHUNK = 1000  # bytes per chunk in the chunked cases (the sandbox has no lower limit)


@pytest.fixture(autouse=True)
def empty_mailboxes(sandbox):  # noqa: F811
    sandbox.reset()


def write_config(path, url, chunk_size=None, password=PASSWORD, extra=""):
    """A --config file with X26ABC1, X26ABC2 (and X26ABC3) as [[mesh.mailboxes]]."""
    blocks = []
    for mb in ("X26ABC1", "X26ABC2", "X26ABC3"):
        lines = [
            "[[mesh.mailboxes]]",
            f'url = "{url}"',
            f'mailbox = "{mb}"',
            f'password = "{password}"',
            f'shared_key = "{SHARED_KEY}"',
            'poll_interval = "1s"',
            'timeout = "30s"',
        ]
        if chunk_size:
            lines.append(f"chunk_size = {chunk_size}")
        if extra:
            lines.append(extra)
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


@pytest.fixture
def cfg(tmp_path, sandbox):  # noqa: F811
    return write_config(tmp_path / "carebridge.toml", sandbox.url)


def cb(config, *args, env=None, input=None):
    """Run `carebridge mesh --config CONFIG ARGS...`; returns the CompletedProcess (bytes)."""
    binary = _binary()
    if not binary.exists():
        pytest.exit(f"binary {binary} not found: run `cargo build -p carebridge` or set CAREBRIDGE_BIN", 2)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    full_env.update(env or {})
    return subprocess.run([str(binary), "mesh", "--config", str(config), *args], capture_output=True,
                          timeout=120, env=full_env, input=input)


def ok(p) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout[-2000:]!r}\nstderr: {p.stderr[-2000:]!r}"
    return p.stdout.decode()


def cb_json(config, *args):
    return json.loads(ok(cb(config, "--json", *args)))


def peer(sandbox, mailbox, **kw):  # noqa: F811
    """NHS England's mesh_client for a sandbox mailbox."""
    return MeshClient(sandbox.url, mailbox, PASSWORD, shared_key=SHARED_KEY.encode(), verify=sandbox.verify,
                      cert=sandbox.cert, **kw)


def payload(n, seed):
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(n))


# -- handshake ---------------------------------------------------------------------------------------------------


def test_handshake_ok(cfg):
    out = ok(cb(cfg, "handshake"))
    assert "X26ABC1" in out and "OK" in out
    j = cb_json(cfg, "--mailbox", "X26ABC3", "handshake")
    assert j["mailbox"] == "X26ABC3" and j["handshake"] == "ok"


def test_handshake_wrong_password_is_one_clean_line(tmp_path, sandbox):  # noqa: F811
    bad = write_config(tmp_path / "bad.toml", sandbox.url, password="not-the-password")
    p = cb(bad, "handshake")
    assert p.returncode == 1
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert "X26ABC1" in err and "403" in err, err
    assert p.stdout == b""


def test_secrets_from_environment_variables(tmp_path, sandbox):  # noqa: F811
    path = tmp_path / "env.toml"
    path.write_text(
        "[[mesh.mailboxes]]\n"
        f'url = "{sandbox.url}"\nmailbox = "X26ABC1"\n'
        'password_env = "TEST_MESH_PW"\nshared_key_env = "TEST_MESH_KEY"\n'
    )
    assert ok(cb(path, "handshake", env={"TEST_MESH_PW": PASSWORD, "TEST_MESH_KEY": SHARED_KEY}))
    p = cb(path, "handshake", env={"TEST_MESH_PW": PASSWORD})
    assert p.returncode == 1 and b"TEST_MESH_KEY" in p.stderr, p.stderr


# -- mesh_client -> carebridge --------------------------------------------------------------------------------------


def test_message_from_mesh_client_is_listed_downloaded_and_acknowledged(cfg, sandbox, tmp_path):  # noqa: F811
    body = b"MSH|^~\\&|PAS|RXX|HUB|RXX|20300101120000||ADT^A01|M1|P|2.4\rPID|1||9000000009^^^NHS^NH\r" + bytes(
        range(256))
    with peer(sandbox, "X26ABC1") as a:
        mid = a.send_message("X26ABC2", body, workflow_id="TEST_WORKFLOW", subject="adt a01", local_id="pas-42",
                             filename="adt.hl7")
    listed = cb_json(cfg, "--mailbox", "X26ABC2", "inbox")
    assert listed["messages"] == [mid] and listed["count"] == 1
    assert ok(cb(cfg, "--mailbox", "X26ABC2", "inbox")).split() == [mid]

    out = tmp_path / "got.bin"
    meta = cb_json(cfg, "--mailbox", "X26ABC2", "download", mid, "--out", str(out))
    assert out.read_bytes() == body
    assert meta["from"] == "X26ABC1" and meta["to"] == "X26ABC2"
    assert meta["workflow_id"] == "TEST_WORKFLOW" and meta["local_id"] == "pas-42"
    assert meta["subject"] == "adt a01" and meta["file_name"] == "adt.hl7"
    assert meta["message_type"] == "DATA" and meta["bytes"] == len(body)
    assert meta["headers"]["mex-messageid"] == mid

    # Without --out the body goes to standard output, unchanged.
    assert cb(cfg, "--mailbox", "X26ABC2", "download", mid).stdout == body

    assert mid in ok(cb(cfg, "--mailbox", "X26ABC2", "ack", mid))
    assert cb_json(cfg, "--mailbox", "X26ABC2", "inbox")["messages"] == []
    with peer(sandbox, "X26ABC1") as a:
        assert a.track_message(mid)["status"] == "acknowledged"


def test_chunked_gzip_message_from_mesh_client(cfg, sandbox, tmp_path):  # noqa: F811
    body = payload(5 * SMALL_CHUNK + 321, seed=1)
    with peer(sandbox, "X26ABC1", max_chunk_size=SMALL_CHUNK, transparent_compress=True) as a:
        mid = a.send_message("X26ABC2", body, workflow_id="TEST_WORKFLOW", local_id="big-1")
    stored = sandbox.admin_message(mid)
    assert stored["chunk_count"] == 6 and stored["content_encoding"] == "gzip", stored
    out = tmp_path / "big.bin"
    meta = cb_json(cfg, "--mailbox", "X26ABC2", "download", mid, "--out", str(out), "--ack")
    assert out.read_bytes() == body
    assert meta["acknowledged"] is True and meta["local_id"] == "big-1"
    assert cb_json(cfg, "--mailbox", "X26ABC2", "inbox")["messages"] == []


# -- carebridge -> mesh_client --------------------------------------------------------------------------------------


def test_message_from_carebridge_reaches_mesh_client_intact(cfg, sandbox, tmp_path):  # noqa: F811
    body = "MSH|^~\\&|HUB|RXX|GP|Y01|20300101120000||SIU^S12|S1|P|2.4\rSCH|1\r".encode() + "é".encode()
    src = tmp_path / "siu.hl7"
    src.write_bytes(body)
    sent = cb_json(cfg, "send", "--to", "X26ABC2", "--workflow-id", "TEST_WORKFLOW", "--subject", "booking",
                   "--local-id", "hub-evt-77", "--content-type", "text/plain", str(src))
    mid = sent["message_id"]
    assert sent["chunks"] == 1 and sent["compressed"] is False and sent["local_id"] == "hub-evt-77"
    with peer(sandbox, "X26ABC2") as b:
        assert b.list_messages() == [mid]
        msg = b.retrieve_message(mid)
        assert msg.read() == body
        assert msg.subject == "booking"
        assert msg.local_id == "hub-evt-77"
        assert msg.workflow_id == "TEST_WORKFLOW"
        assert msg.filename == "siu.hl7"
        assert msg.sender == "X26ABC1"
        assert msg.message_type == "DATA"
        msg.acknowledge()
        assert b.list_messages() == []

    # Plain output is just the id; tracking after the ack says acknowledged, by id and by LocalID.
    tracked = cb_json(cfg, "track", mid)
    assert tracked["status"] == "acknowledged" and tracked["local_id"] == "hub-evt-77"
    assert "status=acknowledged" in ok(cb(cfg, "track", "--local-id", "hub-evt-77"))
    assert ok(cb(cfg, "track", mid)).startswith(mid)


def test_chunked_gzip_message_from_carebridge(tmp_path, sandbox):  # noqa: F811
    small = write_config(tmp_path / "small.toml", sandbox.url, chunk_size=SMALL_CHUNK)
    body = payload(4 * SMALL_CHUNK + 17, seed=2)
    src = tmp_path / "big.bin"
    src.write_bytes(body)
    sent = cb_json(small, "send", "--to", "X26ABC2", "--workflow-id", "TEST_WORKFLOW", "--local-id", "chunky",
                   str(src))
    assert sent["chunks"] == 5 and sent["compressed"] is True
    stored = sandbox.admin_message(sent["message_id"])
    assert stored["chunk_count"] == 5 and stored["content_encoding"] == "gzip", stored
    with peer(sandbox, "X26ABC2") as b:
        msg = b.retrieve_message(sent["message_id"])
        assert msg.read() == body
        assert msg.local_id == "chunky"
        msg.acknowledge()


def test_chunked_round_trip_carebridge_to_carebridge_from_stdin(tmp_path, sandbox):  # noqa: F811
    small = write_config(tmp_path / "small.toml", sandbox.url, chunk_size=SMALL_CHUNK)
    body = payload(3 * SMALL_CHUNK, seed=3)  # an exact multiple: no short last chunk
    p = cb(small, "--json", "--mailbox", "X26ABC2", "send", "--to", "X26ABC1", "--workflow-id",
           "TEST_WORKFLOW_ACK", "--local-id", "stdin-1", "-", input=body)
    sent = json.loads(ok(p))
    assert sent["chunks"] == 3
    out = tmp_path / "back.bin"
    meta = cb_json(small, "download", sent["message_id"], "--out", str(out), "--ack")
    assert out.read_bytes() == body
    assert meta["from"] == "X26ABC2" and meta["file_name"] != "-"


# -- lookup and refusals ----------------------------------------------------------------------------------------------


def test_endpoint_lookup(cfg):
    assert cb_json(cfg, "lookup", "X26", "TEST_WORKFLOW")["results"] == [
        {"mailbox_id": "X26ABC2", "mailbox_name": "TESTMB2"}]
    assert ok(cb(cfg, "lookup", "X26", "TEST_WORKFLOW")).split("\t")[0] == "X26ABC2"


def test_unknown_recipient_names_the_mesh_error(cfg, tmp_path):
    src = tmp_path / "x.txt"
    src.write_bytes(b"x")
    p = cb(cfg, "send", "--to", "NOSUCHMB", "--workflow-id", "TEST_WORKFLOW", str(src))
    assert p.returncode == 1
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "X26ABC1" in err and "417" in err and "12" in err, err


def test_download_of_unknown_message_fails_cleanly(cfg):
    p = cb(cfg, "--mailbox", "X26ABC2", "download", "NOSUCHMESSAGE")
    assert p.returncode == 1
    err = p.stderr.decode().strip()
    assert "X26ABC2" in err and "404" in err, err


def test_unconfigured_mailbox_is_refused(cfg):
    p = cb(cfg, "--mailbox", "X99XXX9", "handshake")
    assert p.returncode == 1 and b"not configured" in p.stderr


# -- mutual TLS (optional) ----------------------------------------------------------------------------------------


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_mutual_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a throwaway CA for the mutual TLS test")
    d = tmp_path / "tls"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Carebridge Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out",
             "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
             "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=X26ABC1.X26.api.mesh-client.nhs.uk", "-keyout",
             "client.key", "-out", "client.csr", cwd=d)
    # An extension file makes it an X.509 v3 certificate (rustls refuses v1 ones, which `x509 -req` makes without).
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
             "2", "-extfile", "client.ext", "-out", "client.pem", cwd=d)
    sb = start_sandbox(tmp_path / "sandbox", tls={
        "certfile": d / "server.pem", "keyfile": d / "server.key", "ca": d / "ca.pem",
        "require_client_cert": True, "client_cert": d / "client.pem", "client_key": d / "client.key"})
    try:
        tls = (f'client_cert = "{d / "client.pem"}"\nclient_key = "{d / "client.key"}"\n'
               f'ca_bundle = "{d / "ca.pem"}"')
        good = write_config(tmp_path / "mtls.toml", sb.url, extra=tls)
        assert "OK" in ok(cb(good, "handshake"))
        src = tmp_path / "m.txt"
        src.write_bytes(b"over mutual TLS")
        mid = ok(cb(good, "send", "--to", "X26ABC2", "--workflow-id", "TEST_WORKFLOW", "--local-id", "tls-1",
                    str(src))).strip()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with peer(sb, "X26ABC2") as b:
                msg = b.retrieve_message(mid)
                assert msg.read() == b"over mutual TLS"
                msg.acknowledge()

        # Without a client certificate the TLS handshake is refused: a transport error, exit 1.
        no_cert = write_config(tmp_path / "nocert.toml", sb.url, extra=f'ca_bundle = "{d / "ca.pem"}"')
        p = cb(no_cert, "handshake")
        assert p.returncode == 1 and b"X26ABC1" in p.stderr and b"transport error" in p.stderr, p.stderr
        # Without the CA bundle the self-made server certificate is not trusted.
        untrusted = write_config(tmp_path / "untrusted.toml", sb.url,
                                 extra=f'client_cert = "{d / "client.pem"}"\nclient_key = "{d / "client.key"}"')
        p = cb(untrusted, "handshake")
        assert p.returncode == 1 and b"transport error" in p.stderr, p.stderr
    finally:
        sb.stop()
