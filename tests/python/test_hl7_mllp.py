"""HL7 v2 over MLLP against a real peer: python-hl7's `mllp_send` and `MLLPClient` as senders, its asyncio MLLP
server as the receiver of the hub's outbound SIU messages.

Covers: ACK codes for the repo's own fixtures and for every corpus message (expected outcomes listed in
hl7-corpus-outcomes.json), resends acknowledged with the original ACK and applied once, a kill -9 of the hub in
the middle of a stream (nothing lost, nothing applied twice), and outbound SIU/ADT through a `message`
Subscription with an mllp:// endpoint, in order.
"""

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import hl7
import pytest
import requests
from hl7.client import MLLPClient
from hl7.mllp import start_hl7_server

from conftest import REPO, start_server, stop_server
from helpers import new_nhs_number

CORPUS = REPO.parent / "shared" / "corpus" / "hl7v2"
FIXTURES = REPO / "tests" / "python" / "hl7"
OUTCOMES = json.loads((Path(__file__).parent / "hl7-corpus-outcomes.json").read_text())
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / "target" / "py-venv")) / "bin"
FHIR_JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    srv = start_server(tmp_path_factory, name="hl7hub", extra_args=["--mllp", "127.0.0.1:0"])
    assert srv.mllp, "the hub did not print its MLLP address"
    yield srv
    stop_server(srv)


def frame(msg: bytes) -> bytes:
    return b"\x0b" + msg + b"\x1c\r"


def send_ahead(srv, messages, timeout=30):
    """Send `messages` (control id, bytes) in one write on one MLLP connection without waiting for ACKs, then
    half-close; the ACKs received, in order."""
    host, port = srv.mllp
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"".join(frame(m) for _, m in messages))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [a for a in data.split(b"\x1c\r") if a.strip()]


def ack_fields(raw: bytes):
    """(MSA-1, MSA-2, ERR-8 or MSA-3) of a (possibly framed) ACK."""
    text = raw.strip(b"\x0b\x1c\r\n").decode()
    msg = hl7.parse(text)
    msa = msg.segment("MSA")
    code, control = str(msa[1]), str(msa[2])
    reason = ""
    try:
        err = msg.segment("ERR")
        reason = str(err[8]) if len(err) > 8 else str(err)
    except KeyError:
        reason = str(msa[3]) if len(msa) > 3 else ""
    return code, control, reason


def siu(trigger, control, time_, placer, start, nhs, minutes=30):
    h, m = int(start[:2]), int(start[2:])
    end = f"{h + (m + minutes) // 60:02d}{(m + minutes) % 60:02d}"
    return (
        f"MSH|^~\\&|PAS|RXX|HUB|RXX|{time_}||SIU^{trigger}^SIU_S12|{control}|P|2.5.1\r"
        f"SCH|{placer}^PAS|||||||||||||||||||||||||Booked\r"
        f"TQ1|1||||||20310506{start}00|20310506{end}00\r"
        f"PID|1||{nhs}^^^NHS^NH||Pyhl^Seven||19700101|M\r"
        f"RGS|1\r"
        f"AIP|1||PY{placer}^Doc^Py^^^^^^GMC|||20310506{start}00\r"
    ).encode()


def a28(control, nhs, family="Mllp"):
    return (
        f"MSH|^~\\&|PAS|RXX|HUB|RXX|20310101120000||ADT^A28^ADT_A05|{control}|P|2.4\r"
        f"EVN|A28|20310101120000\rPID|1||{nhs}^^^NHS^NH||{family}^Ann||19800101|F\rPV1|1|N\r"
    ).encode()


def fhir_get(srv, path):
    r = requests.get(f"{srv.base_url}/fhir/{path}", headers=FHIR_JSON, timeout=30, **srv.tls)
    r.raise_for_status()
    return r.json()


def patients_with(srv, nhs):
    return fhir_get(srv, f"Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}").get("entry", [])


def count_events(srv, kind=None):
    """Events in the hub's feed (all, or of one kind such as patient.registered), paging with the cursor."""
    n, cursor = 0, "0"
    params = {"limit": "1000"}
    if kind:
        params["type"] = f"carebridge.{kind}.v1"
    while True:
        body = requests.get(f"{srv.base_url}/events", params={**params, "after": cursor}, timeout=30).json()
        n += len(body["events"])
        if not body["events"]:
            return n
        cursor = body["next"]


def mllp_send(srv, files):
    """python-hl7's console script; files must hold one MLLP-framed message each."""
    host, port = srv.mllp
    out = subprocess.run(
        [str(VENV_BIN / "mllp_send"), "-p", str(port), "-f", str(files), host],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def test_own_fixtures_over_mllp_send(hub, tmp_path):
    fixtures = sorted(FIXTURES.glob("*.hl7"))
    assert fixtures, f"no fixtures in {FIXTURES}"
    expected = json.loads((FIXTURES / "expected.json").read_text())
    for f in fixtures:
        framed = tmp_path / (f.name + ".mllp")
        framed.write_bytes(frame(f.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")))
        out = mllp_send(hub, framed)
        code, _, reason = ack_fields(out)
        assert code == expected[f.name], f"{f.name}: got {code} ({reason}), expected {expected[f.name]}"


def test_corpus_over_mllp_send(hub, tmp_path):
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not present ({CORPUS} is absent): skipped")
    files = sorted(p for p in CORPUS.rglob("*.hl7"))
    seen = {}
    for f in files:
        rel = str(f.relative_to(CORPUS))
        framed = tmp_path / (f.name + ".mllp")
        framed.write_bytes(frame(f.read_bytes()))
        code, control, reason = ack_fields(mllp_send(hub, framed))
        seen[rel] = (code, reason)
        want = OUTCOMES.get(rel, {"ack": "AA"})
        assert code == want["ack"], f"{rel}: got {code} ({reason}); expected {want}"
        if code != "AA":
            assert want["reason"].lower() in reason.lower(), f"{rel}: reason {reason!r} does not mention {want['reason']!r}"
    unknown = set(OUTCOMES) - set(seen)
    assert not unknown, f"outcomes listed for files not in the corpus: {unknown}"


def test_resend_gets_the_original_ack_and_changes_nothing(hub):
    nhs = new_nhs_number()
    host, port = hub.mllp
    msg = a28("RESEND1", nhs)
    with MLLPClient(host, port, encoding="utf-8") as c:
        first = c.send_message(msg)
        events_before = count_events(hub)
        second = c.send_message(msg)
    assert ack_fields(first)[0] == "AA"
    assert first == second, "a resend must get the original ACK byte for byte"
    events_after = count_events(hub)
    assert events_after == events_before
    found = patients_with(hub, nhs)
    assert len(found) == 1 and found[0]["resource"]["meta"]["versionId"] == "1"


def a31(control, nhs, family, time_="20310101120100"):
    return (
        f"MSH|^~\\&|PAS|RXX|HUB|RXX|{time_}||ADT^A31^ADT_A05|{control}|P|2.4\r"
        f"EVN|A31|{time_}\rPID|1||{nhs}^^^NHS^NH||{family}^Ann||19800101|F\rPV1|1|N\r"
    ).encode()


def test_messages_sent_ahead_are_applied_and_acknowledged_in_order(hub):
    """A sender that does not wait for each ACK: forty messages in one write, then a half-close. Every one is
    acknowledged, in order, and applied in order: each patient's A28 is version 1 and its later A31 version 2
    (applied the other way round, the A28 would be older than the patient and change nothing)."""
    sent = []
    numbers = [new_nhs_number() for _ in range(20)]
    for i, nhs in enumerate(numbers):
        sent.append((f"AHEAD{i}A", a28(f"AHEAD{i}A", nhs, family="First")))
        sent.append((f"AHEAD{i}B", a31(f"AHEAD{i}B", nhs, family="Second")))
    acks = send_ahead(hub, sent)
    assert [ack_fields(a)[1] for a in acks] == [control for control, _ in sent]
    assert [ack_fields(a)[0] for a in acks] == ["AA"] * len(sent)
    for nhs in numbers:
        found = patients_with(hub, nhs)
        assert len(found) == 1, nhs
        patient = found[0]["resource"]
        assert patient["meta"]["versionId"] == "2", patient["meta"]
        assert patient["name"][0]["family"] == "Second"
        history = fhir_get(hub, f"Patient/{patient['id']}/_history")
        families = sorted(
            (int(e["resource"]["meta"]["versionId"]), e["resource"]["name"][0]["family"]) for e in history["entry"]
        )
        assert families == [(1, "First"), (2, "Second")]


def test_kill_9_mid_stream_loses_nothing_and_applies_nothing_twice(tmp_path_factory):
    srv = start_server(tmp_path_factory, name="hl7kill", extra_args=["--mllp", "127.0.0.1:0"])
    numbers = [new_nhs_number() for _ in range(400)]
    msgs = [a28(f"K{i}", n) for i, n in enumerate(numbers)]
    acked = set()
    host, port = srv.mllp

    def stream():
        try:
            with MLLPClient(host, port, encoding="utf-8") as c:
                for i, m in enumerate(msgs):
                    ack = c.send_message(m)
                    if ack_fields(ack)[0] == "AA":
                        acked.add(i)
        except (OSError, hl7.exceptions.HL7Exception, Exception):
            pass  # the hub was killed

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while len(acked) < 100 and time.time() < deadline:
        time.sleep(0.005)
    srv.proc.kill()
    srv.proc.wait()
    t.join(30)
    assert 0 < len(acked) < len(msgs), f"the kill did not land mid-stream ({len(acked)} acked)"
    # Every ACKed message is durable; resend everything (as a sender that saw no ACK would) after a restart.
    srv2 = start_server(tmp_path_factory, name="hl7kill2", extra_args=["--mllp", "127.0.0.1:0"], data_dir=srv.data_dir)
    try:
        host, port = srv2.mllp
        with MLLPClient(host, port, encoding="utf-8") as c:
            for m in msgs:
                assert ack_fields(c.send_message(m))[0] == "AA"
        for n in numbers:
            found = patients_with(srv2, n)
            assert len(found) == 1, f"{n}: {len(found)} patients"
            assert found[0]["resource"]["meta"]["versionId"] == "1", "applied twice"
        assert count_events(srv2, "patient.registered") == len(msgs)
    finally:
        stop_server(srv2)


class Receiver:
    """python-hl7's asyncio MLLP server in a thread: records each message and answers AA (or `reply`)."""

    def __init__(self):
        self.messages = []
        self.reply = "AA"
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def handle(reader, writer):
            try:
                while not writer.is_closing():
                    msg = await reader.readmessage()
                    self.messages.append(msg)
                    writer.writemessage(msg.create_ack(ack_code=self.reply))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        async def main():
            srv = await start_hl7_server(handle, host="127.0.0.1", port=self.port, encoding="utf-8")
            self.ready.set()
            async with srv:
                await srv.serve_forever()

        self.loop.run_until_complete(main())

    def wait_for(self, n, timeout=20):
        deadline = time.time() + timeout
        while len(self.messages) < n and time.time() < deadline:
            time.sleep(0.05)
        return self.messages


def test_outbound_siu_reaches_a_python_hl7_server_in_order(hub):
    rx = Receiver()
    sub = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "PAS feed",
        "criteria": "Appointment?status=booked,cancelled",
        "channel": {"type": "message", "endpoint": f"mllp://127.0.0.1:{rx.port}"},
    }
    r = requests.post(f"{hub.base_url}/fhir/Subscription", json=sub, headers=FHIR_JSON, timeout=30)
    assert r.status_code == 201, r.text
    nhs = new_nhs_number()
    host, port = hub.mllp
    with MLLPClient(host, port, encoding="utf-8") as c:
        assert ack_fields(c.send_message(siu("S12", "OUT1", "20310101090000", "OUTA", "0900", nhs)))[0] == "AA"
        assert ack_fields(c.send_message(siu("S15", "OUT2", "20310101100000", "OUTA", "0900", nhs)))[0] == "AA"
    msgs = rx.wait_for(2)
    assert len(msgs) >= 2, f"received {len(msgs)} messages"
    ours = [m for m in msgs if "OUTA" in str(m.segment("SCH")[1])]
    triggers = [str(m.segment("MSH")[9][0][1]) for m in ours]
    assert triggers[:2] == ["S12", "S15"], triggers
    pid = ours[0].segment("PID")
    assert nhs in str(pid[3]), str(pid)
    # MSH-10 is stable per event, so a receiver can deduplicate retries.
    assert str(ours[0].segment("MSH")[10]).startswith("CB")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: TLS test skipped")
    d = tmp_path_factory.mktemp("mllp-tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    # v3 client certificates (webpki refuses v1 ones).
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n")
    for name, ext in (("server", True), ("client", False), ("stranger", False)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "client.ext", "-out", "client.pem", cwd=d)
    # A client certificate from a CA the hub does not trust.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Other CA",
             "-keyout", "other.key", "-out", "other.pem", cwd=d)
    _openssl("x509", "-req", "-in", "stranger.csr", "-CA", "other.pem", "-CAkey", "other.key",
             "-CAcreateserial", "-days", "2", "-extfile", "client.ext", "-out", "stranger.pem", cwd=d)
    return d


def _tls_send(port, d, msg, cert=None):
    import ssl

    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(d / f"{cert}.pem"), str(d / f"{cert}.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(frame(msg))
            data = b""
            while not data.endswith(b"\x1c\r"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data


def test_mllp_over_mutual_tls(tmp_path_factory, tls_files):
    d = tls_files
    srv = start_server(
        tmp_path_factory,
        name="hl7tls",
        extra_args=["--mllp", "127.0.0.1:0", "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
                    "--client-ca", str(d / "ca.pem")],
    )
    try:
        # The TLS flags apply to the HTTP listener too: https, with the same client certificates.
        assert srv.base_url.startswith("https://"), srv.base_url
        srv.tls = {"verify": str(d / "ca.pem"), "cert": (str(d / "client.pem"), str(d / "client.key"))}
        _, port = srv.mllp
        nhs = new_nhs_number()
        ack = _tls_send(port, d, a28("TLS1", nhs), cert="client")
        assert ack_fields(ack)[0] == "AA"
        assert len(patients_with(srv, nhs)) == 1
        # No client certificate, or one from an untrusted CA: the handshake is refused, nothing applied.
        for cert in (None, "stranger"):
            other = new_nhs_number()
            with pytest.raises((OSError, ConnectionError)):
                got = _tls_send(port, d, a28(f"TLS-{cert}", other), cert=cert)
                if not got:
                    raise ConnectionError("closed without an ACK")
            assert patients_with(srv, other) == []
        # Plain MLLP to the TLS listener gets no ACK.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(frame(a28("PLAIN", new_nhs_number())))
            try:
                assert b"MSA" not in s.recv(65536)
            except (ConnectionError, socket.timeout):
                pass
    finally:
        stop_server(srv)


def _cli(*args):
    binary = Path(os.environ.get("CAREBRIDGE_BIN") or REPO / "target" / "debug" / "carebridge")
    return subprocess.run([str(binary), *args], capture_output=True, timeout=60)


def test_cli_convert_and_send(hub):
    out = _cli("hl7", "convert", str(FIXTURES / "siu-s12-booking.hl7"))
    assert out.returncode == 0, out.stderr.decode()
    bundle = json.loads(out.stdout)
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["Patient", "Practitioner", "Location", "Schedule", "Slot", "Appointment"], types
    appt = bundle["entry"][-1]["resource"]
    assert appt["status"] == "booked" and appt["start"] == "2031-03-15T10:40:00.000Z"
    bad = _cli("hl7", "convert", str(FIXTURES / "adt-a28-invalid-nhs-number.hl7"))
    assert bad.returncode == 1 and b"not a valid NHS number" in bad.stderr

    host, port = hub.mllp
    sent = _cli("hl7", "send", "--to", f"{host}:{port}", str(FIXTURES / "adt-a31-hn-variant-lf.hl7"))
    assert sent.returncode == 0, sent.stderr.decode()
    assert b"MSA|AA|FX0002" in sent.stdout
    refused = _cli("hl7", "send", "--to", f"{host}:{port}", str(FIXTURES / "oru-r01-unsupported.hl7"))
    assert refused.returncode == 1 and b"MSA|AR|FX0005" in refused.stdout


def test_outbound_ar_is_a_dead_letter_at_once(hub):
    rx = Receiver()
    rx.reply = "AR"
    sub = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "rejecting PAS",
        "criteria": "Patient?family=Rejectme",
        "channel": {"type": "message", "endpoint": f"mllp://127.0.0.1:{rx.port}"},
    }
    r = requests.post(f"{hub.base_url}/fhir/Subscription", json=sub, headers=FHIR_JSON, timeout=30)
    assert r.status_code == 201, r.text
    sub_id = r.json()["id"]
    host, port = hub.mllp
    with MLLPClient(host, port, encoding="utf-8") as c:
        assert ack_fields(c.send_message(a28("REJ1", new_nhs_number(), family="Rejectme")))[0] == "AA"
    deadline = time.time() + 20
    dead = []
    while time.time() < deadline and not dead:
        dead = requests.get(f"{hub.base_url}/admin/deliveries", params={"subscription": sub_id, "state": "dead"},
                            timeout=30).json()["deliveries"]
        time.sleep(0.1)
    assert len(dead) == 1, "an AR must dead-letter the delivery without retries"
    assert dead[0]["attempts"] == 1 and "AR" in dead[0]["lastError"], dead[0]
    msgs = rx.wait_for(1)
    assert str(msgs[0].segment("MSH")[9][0][1]) == "A28"
