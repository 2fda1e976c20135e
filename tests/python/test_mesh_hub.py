"""MESH inside the hub, against NHS England's mesh-sandbox, with NHS England's `mesh_client` as the partner.

`carebridge serve --config` with a `[[mesh.mailboxes]]` entry polls that mailbox: HL7 v2 and FHIR transaction
Bundles sent by `mesh_client` are applied and acknowledged (inbox empty afterwards), chunked messages are joined,
unrecognised payloads are kept and flagged (`carebridge mesh-inbound`), a resent HL7 message under a new MESH id
changes nothing, REPORTs are recorded, and a kill -9 in the middle of polling ends, after a restart, with every
message applied exactly once. Outbound, a `mesh://` Subscription delivers resource versions that `mesh_client`
receives intact and in order.
"""

import base64
import json
import os
import subprocess
import time
import uuid

import pytest
import requests
from mesh_client import MeshClient

from conftest import _binary, start_server, stop_server
from helpers import NHS_SYSTEM, new_nhs_number, unique_family
from mesh_sandbox import PASSWORD, SHARED_KEY, sandbox  # noqa: F401 (sandbox is a fixture)

HUB_MAILBOX = "X26ABC2"  # the module hub's mailbox
RESTART_MAILBOX = "X26ABC3"  # the restart test's own hub (so two hubs never poll one mailbox)
PARTNER = "X26ABC1"
WORKFLOW = "TEST_WORKFLOW"
FHIR_JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
TEST_SYSTEM = "urn:carebridge:test:mesh"


@pytest.fixture(autouse=True)
def empty_mailboxes(sandbox):  # noqa: F811
    sandbox.reset()


def write_config(path, url, mailbox, poll="200ms"):
    path.write_text(
        "[[mesh.mailboxes]]\n"
        f'url = "{url}"\nmailbox = "{mailbox}"\npassword = "{PASSWORD}"\nshared_key = "{SHARED_KEY}"\n'
        f'poll_interval = "{poll}"\ntimeout = "30s"\n'
    )
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory, sandbox):  # noqa: F811
    cfg = write_config(tmp_path_factory.mktemp("meshcfg") / "hub.toml", sandbox.url, HUB_MAILBOX)
    srv = start_server(tmp_path_factory, name="meshhub", extra_args=["--config", str(cfg)])
    srv.config = cfg
    yield srv
    stop_server(srv)


def peer(sandbox, mailbox=PARTNER, **kw):  # noqa: F811
    return MeshClient(sandbox.url, mailbox, PASSWORD, shared_key=SHARED_KEY.encode(), **kw)


def wait_until(check, timeout=30, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def inbox(sandbox, mailbox):  # noqa: F811
    with peer(sandbox, mailbox) as c:
        return c.list_messages()


def send(sandbox, body: bytes, to=HUB_MAILBOX, **kw):  # noqa: F811
    with peer(sandbox, **kw) as c:
        return c.send_message(to, body, workflow_id=WORKFLOW, subject="test", local_id=str(uuid.uuid4()))


def a28(control, nhs, family, pad=0):
    msg = (
        f"MSH|^~\\&|PAS|RXX|HUB|RXX|20310101120000||ADT^A28^ADT_A05|{control}|P|2.4\r"
        f"EVN|A28|20310101120000\rPID|1||{nhs}^^^NHS^NH||{family}^Ann||19800101|F\rPV1|1|N\r"
    )
    if pad:
        msg += f"NTE|1||{'x' * pad}\r"
    return msg.encode()


def fhir_get(srv, path):
    r = requests.get(f"{srv.base_url}/fhir/{path}", headers=FHIR_JSON, timeout=30)
    r.raise_for_status()
    return r.json()


def patients(srv, query):
    return [e["resource"] for e in fhir_get(srv, f"Patient?{query}").get("entry", [])]


def count_events(srv, kind):
    n, cursor = 0, "0"
    while True:
        body = requests.get(f"{srv.base_url}/events",
                            params={"limit": "1000", "type": f"carebridge.{kind}.v1", "after": cursor},
                            timeout=30).json()
        n += len(body["events"])
        if not body["events"]:
            return n
        cursor = body["next"]


def inbound_records(srv, all_=True):
    """`carebridge mesh-inbound --json` on the hub's store (works while serve runs)."""
    args = [str(_binary()), "mesh-inbound", "--data-dir", str(srv.data_dir), "--json", "--limit", "1000"]
    if all_:
        args.append("--all")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    p = subprocess.run(args, capture_output=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return json.loads(p.stdout)


def record_of(srv, message_id, all_=True):
    return next((r for r in inbound_records(srv, all_) if r["messageId"] == message_id), None)


def done_record(srv, message_id, all_=True):
    return wait_until(lambda: (lambda r: r if r and r["state"] == "done" else None)(record_of(srv, message_id, all_)),
                      what=f"the record of {message_id}")


def tx_bundle(*resources):
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r,
             "request": {"method": "POST", "url": r["resourceType"]}}
            for r in resources
        ],
    }


def local_patient(value, family):
    """A Patient identified only by a test identifier: applying its create twice would make two Patients."""
    return {"resourceType": "Patient", "identifier": [{"system": TEST_SYSTEM, "value": value}],
            "name": [{"family": family, "given": ["Mesh"]}], "gender": "female", "birthDate": "1990-02-03"}


# -- inbound ----------------------------------------------------------------------------------------------------


def test_hl7_a28_is_applied_and_acknowledged(hub, sandbox):  # noqa: F811
    nhs, family = new_nhs_number(), unique_family()
    mid = send(sandbox, a28("MESHA28", nhs, family))
    found = wait_until(lambda: patients(hub, f"identifier={NHS_SYSTEM}|{nhs}"), what="the Patient")
    assert len(found) == 1 and found[0]["name"][0]["family"] == family
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")
    rec = done_record(hub, mid)
    assert rec["kind"] == "hl7" and rec["outcome"] == "applied" and rec["ackCode"] == "AA", rec
    assert rec["from"] == PARTNER and rec["workflowId"] == WORKFLOW
    assert not rec["attention"] and "body" not in rec


def test_fhir_transaction_bundle_is_applied(hub, sandbox):  # noqa: F811
    family = unique_family()
    values = [str(uuid.uuid4()) for _ in range(2)]
    bundle = tx_bundle(*(local_patient(v, family) for v in values))
    mid = send(sandbox, json.dumps(bundle).encode())
    wait_until(lambda: len(patients(hub, f"family={family}")) == 2, what="both Patients")
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")
    rec = done_record(hub, mid)
    assert rec["kind"] == "fhir-transaction" and rec["outcome"] == "applied", rec
    assert rec["httpStatus"] == 200 and rec["response"]["type"] == "transaction-response", rec


def test_refused_transaction_is_kept_flagged_and_acknowledged(hub, sandbox):  # noqa: F811
    bad = {"resourceType": "Patient", "gender": "not-a-gender"}
    body = json.dumps(tx_bundle(bad)).encode()
    mid = send(sandbox, body)
    rec = done_record(hub, mid, all_=False)
    assert rec["outcome"] == "refused" and rec["attention"] and rec["httpStatus"] >= 400, rec
    assert rec["body"].encode() == body
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")


def test_chunked_inbound_message_is_joined_and_applied(hub, sandbox):  # noqa: F811
    nhs, family = new_nhs_number(), unique_family()
    msg = a28("MESHCHUNK", nhs, family, pad=5000)
    mid = send(sandbox, msg, max_chunk_size=1000)
    assert sandbox.admin_message(mid)["chunk_count"] >= 5
    found = wait_until(lambda: patients(hub, f"identifier={NHS_SYSTEM}|{nhs}"), what="the Patient")
    assert len(found) == 1
    rec = done_record(hub, mid)
    assert rec["bytes"] == len(msg), rec
    assert rec["outcome"] == "applied", rec
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")


def test_unrecognised_payload_is_kept_and_flagged(hub, sandbox):  # noqa: F811
    body = b"PDF-ish bytes \x00\x01\x02 that are neither HL7 nor FHIR"
    mid = send(sandbox, body)
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")
    rec = done_record(hub, mid, all_=False)
    assert rec["kind"] == "unrecognised" and rec["outcome"] == "unrecognised" and rec["attention"], rec
    kept = base64.b64decode(rec["body"]) if rec.get("bodyBase64") else rec["body"].encode()
    assert kept == body


def message_bundle(*entries):
    header = {"resourceType": "MessageHeader", "eventCoding": {"system": "urn:test", "code": "booking"},
              "source": {"endpoint": "urn:test:partner"}}
    return {"resourceType": "Bundle", "type": "message",
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": header}, *entries]}


def test_message_bundle_resources_are_applied_as_one_unit(hub, sandbox):  # noqa: F811
    family = unique_family()
    pid = f"msg-{uuid.uuid4().hex[:16]}"
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    org = {"resourceType": "Organization", "name": f"Org {family}"}
    bundle = message_bundle(
        {"fullUrl": patient_url, "resource": local_patient(str(uuid.uuid4()), family)},
        {"resource": {**local_patient(str(uuid.uuid4()), family), "id": pid}},
        {"resource": org},
    )
    mid = send(sandbox, json.dumps(bundle).encode())
    wait_until(lambda: len(patients(hub, f"family={family}")) == 2, what="both Patients")
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")
    rec = done_record(hub, mid)
    assert rec["kind"] == "fhir-message" and rec["outcome"] == "applied" and not rec["attention"], rec
    assert rec["httpStatus"] == 200, rec
    # An entry with an id is an update-as-create under that id.
    assert fhir_get(hub, f"Patient/{pid}")["name"][0]["family"] == family


def test_message_bundle_with_a_bad_entry_applies_nothing(hub, sandbox):  # noqa: F811
    family = unique_family()
    bundle = message_bundle(
        {"resource": local_patient(str(uuid.uuid4()), family)},
        {"resource": {"resourceType": "Patient", "gender": "not-a-gender", "name": [{"family": family}]}},
    )
    body = json.dumps(bundle).encode()
    mid = send(sandbox, body)
    rec = done_record(hub, mid, all_=False)
    assert rec["kind"] == "fhir-message" and rec["outcome"] == "refused" and rec["attention"], rec
    assert rec["body"].encode() == body
    assert patients(hub, f"family={family}") == []
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")


def test_same_hl7_under_a_new_mesh_id_applies_nothing_twice(hub, sandbox):  # noqa: F811
    nhs, family = new_nhs_number(), unique_family()
    msg = a28("MESHDUP1", nhs, family)
    first = send(sandbox, msg)
    done_record(hub, first)
    before = count_events(hub, "patient.registered")
    second = send(sandbox, msg)
    rec = done_record(hub, second)
    assert rec["duplicate"] is True and rec["ackCode"] == "AA", rec
    assert count_events(hub, "patient.registered") == before
    found = patients(hub, f"identifier={NHS_SYSTEM}|{nhs}")
    assert len(found) == 1 and found[0]["meta"]["versionId"] == "1"
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")


def test_report_is_recorded_for_the_operator(hub, sandbox):  # noqa: F811
    r = requests.post(f"{sandbox.url}/messageexchange/admin/report", timeout=10, json={
        "mailbox_id": HUB_MAILBOX, "code": "14", "description": "Message not collected by recipient",
        "workflow_id": WORKFLOW, "linked_message_id": "LINKEDMESSAGE0001", "local_id": "cb-report-test"})
    assert r.status_code == 200, r.text
    report_id = r.json()["message_id"]
    rec = done_record(hub, report_id, all_=False)
    assert rec["kind"] == "report" and rec["messageType"] == "REPORT" and rec["attention"], rec
    assert "14" in rec["detail"] and "LINKEDMESSAGE0001" in rec["detail"], rec
    wait_until(lambda: inbox(sandbox, HUB_MAILBOX) == [], what="an empty inbox")


def test_kill_9_mid_polling_applies_every_message_exactly_once(tmp_path_factory, sandbox):  # noqa: F811
    family = unique_family()
    n_hl7, n_fhir = 60, 60
    nhs_numbers = [new_nhs_number() for _ in range(n_hl7)]
    values = [str(uuid.uuid4()) for _ in range(n_fhir)]
    with peer(sandbox) as c:
        for i in range(max(n_hl7, n_fhir)):
            if i < n_hl7:
                c.send_message(RESTART_MAILBOX, a28(f"KILL{i}", nhs_numbers[i], family), workflow_id=WORKFLOW)
            if i < n_fhir:
                c.send_message(RESTART_MAILBOX, json.dumps(tx_bundle(local_patient(values[i], family))).encode(),
                               workflow_id=WORKFLOW)
    total = n_hl7 + n_fhir
    assert len(inbox(sandbox, RESTART_MAILBOX)) == total
    cfg = write_config(tmp_path_factory.mktemp("meshkill") / "hub.toml", sandbox.url, RESTART_MAILBOX, poll="100ms")
    srv = start_server(tmp_path_factory, name="meshkill", extra_args=["--config", str(cfg)])
    try:
        wait_until(lambda: len(patients(srv, f"family={family}&_count=1000")) >= 10, timeout=60,
                   what="processing to be under way")
    finally:
        srv.proc.kill()
        srv.proc.wait()
    left = len(inbox(sandbox, RESTART_MAILBOX))
    assert 0 < left < total, f"the kill did not land mid-polling ({left} of {total} left)"
    srv2 = start_server(tmp_path_factory, name="meshkill2", extra_args=["--config", str(cfg)], data_dir=srv.data_dir)
    try:
        wait_until(lambda: inbox(sandbox, RESTART_MAILBOX) == [], timeout=90, what="an empty inbox after the restart")
        found = patients(srv2, f"family={family}&_count=1000")
        assert len(found) == total, f"{len(found)} Patients for {total} messages"
        for p in found:
            assert p["meta"]["versionId"] == "1", f"applied twice: {p['id']}"
        by_value = {}
        for p in found:
            for ident in p.get("identifier", []):
                by_value.setdefault(ident["value"], []).append(p["id"])
        for v in values + nhs_numbers:
            assert len(by_value.get(v, [])) == 1, f"{v}: {by_value.get(v)}"
        assert count_events(srv2, "patient.registered") == total
        recs = [r for r in inbound_records(srv2) if r["mailbox"] == RESTART_MAILBOX]
        assert len(recs) == total and all(r["state"] == "done" for r in recs), recs[:3]
        assert all(r["outcome"] == "applied" for r in recs), [r for r in recs if r["outcome"] != "applied"][:3]
    finally:
        stop_server(srv2)


@pytest.mark.parametrize("point", ["after-apply", "after-record"])
@pytest.mark.parametrize("first", ["transaction", "batch", "hl7"])
def test_crash_at_each_step_applies_once(first, point, tmp_path_factory, sandbox, monkeypatch):  # noqa: F811
    """The hub aborts at a chosen point while processing the first message (MESH_POLL_FAILPOINT): after its
    effect committed but before its record, or after its record but before the MESH acknowledgement. After a
    restart every message is applied exactly once and the inbox is empty."""
    family = unique_family()
    values = [str(uuid.uuid4()) for _ in range(3)]
    nhs = [new_nhs_number(), new_nhs_number()]
    if first == "transaction":
        body = tx_bundle(local_patient(values[0], family), local_patient(values[1], family))
        expect = values[:2]
    elif first == "batch":
        body = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "POST", "url": "Patient"}, "resource": local_patient(v, family)}
            for v in values]}
        expect = values
    else:
        body, expect = None, [nhs[0]]
    payload = a28(f"CRASH{uuid.uuid4().hex[:8]}", nhs[0], family) if body is None else json.dumps(body).encode()
    first_id = send(sandbox, payload, to=RESTART_MAILBOX)
    send(sandbox, a28(f"AFTER{uuid.uuid4().hex[:8]}", nhs[1], family), to=RESTART_MAILBOX)
    expect = expect + [nhs[1]]
    cfg = write_config(tmp_path_factory.mktemp("meshfp") / "hub.toml", sandbox.url, RESTART_MAILBOX, poll="100ms")
    monkeypatch.setenv("MESH_POLL_FAILPOINT", point)
    srv = start_server(tmp_path_factory, name="meshfp", extra_args=["--config", str(cfg)])
    try:
        code = srv.proc.wait(timeout=30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert code != 0 and "MESH_POLL_FAILPOINT" in srv.log(), f"exit {code}; log:\n{srv.log()}"
    assert first_id in inbox(sandbox, RESTART_MAILBOX), "nothing may be acknowledged before the record"
    monkeypatch.delenv("MESH_POLL_FAILPOINT")
    srv2 = start_server(tmp_path_factory, name="meshfp2", extra_args=["--config", str(cfg)], data_dir=srv.data_dir)
    try:
        wait_until(lambda: inbox(sandbox, RESTART_MAILBOX) == [], what="an empty inbox after the restart")
        found = patients(srv2, f"family={family}&_count=100")
        idents = sorted(i["value"] for p in found for i in p["identifier"])
        assert idents == sorted(expect), f"expected each of {expect} once, found {idents}"
        assert all(p["meta"]["versionId"] == "1" for p in found)
        assert count_events(srv2, "patient.registered") == len(expect)
        rec = done_record(srv2, first_id)
        assert rec["outcome"] == "applied", rec
    finally:
        stop_server(srv2)


# -- outbound ---------------------------------------------------------------------------------------------------


def test_mesh_subscription_delivers_versions_in_order(hub, sandbox):  # noqa: F811
    family = unique_family()
    sub = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "GP feed over MESH",
        "criteria": f"Patient?family={family}",
        "channel": {"type": "message", "endpoint": f"mesh://{PARTNER}?workflow_id={WORKFLOW}"},
    }
    r = requests.post(f"{hub.base_url}/fhir/Subscription", json=sub, headers=FHIR_JSON, timeout=30)
    assert r.status_code == 201, r.text
    sub_id = r.json()["id"]
    pat = {"resourceType": "Patient", "identifier": [{"system": NHS_SYSTEM, "value": new_nhs_number()}],
           "name": [{"family": family, "given": ["V1"]}], "gender": "male", "birthDate": "1970-01-01"}
    r = requests.post(f"{hub.base_url}/fhir/Patient", json=pat, headers=FHIR_JSON, timeout=30)
    assert r.status_code == 201, r.text
    stored = r.json()
    for given in ("V2", "V3"):
        stored["name"][0]["given"] = [given]
        r = requests.put(f"{hub.base_url}/fhir/Patient/{stored['id']}", json=stored, headers=FHIR_JSON, timeout=30)
        assert r.status_code == 200, r.text
        stored = r.json()
    ids = wait_until(lambda: (lambda m: m if len(m) >= 3 else None)(inbox(sandbox, PARTNER)), what="3 messages")
    assert len(ids) == 3, ids
    got = []
    with peer(sandbox) as c:
        for mid in ids:
            msg = c.retrieve_message(mid)
            body = json.loads(msg.read())
            got.append((body["meta"]["versionId"], body["name"][0]["given"][0], msg.local_id, msg.subject))
            assert msg.sender == HUB_MAILBOX and msg.workflow_id == WORKFLOW
            assert body["id"] == stored["id"] and body["resourceType"] == "Patient"
            msg.acknowledge()
    assert [g[:2] for g in got] == [("1", "V1"), ("2", "V2"), ("3", "V3")], got
    assert [g[3] for g in got] == ["patient.registered", "patient.updated", "patient.updated"], got
    assert all(g[2].startswith(f"carebridge-{sub_id}-") for g in got), got
    assert len({g[2] for g in got}) == 3
    # The MESH message ids are recorded and shown to the operator next to the deliveries.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    out = wait_until(lambda: (lambda s: s if s.count("MESH ") == 3 else None)(subprocess.run(
        [str(_binary()), "deliveries", "list", "--data-dir", str(hub.data_dir), "--subscription", sub_id],
        capture_output=True, timeout=60, env=env).stdout.decode()), what="3 delivered rows")
    for mid in ids:
        assert f"MESH {mid}" in out, out
    t = subprocess.run([str(_binary()), "mesh", "--config", str(hub.config), "--json", "track", ids[0]],
                       capture_output=True, timeout=60, env=env)
    assert t.returncode == 0, t.stderr
    assert json.loads(t.stdout)["status"] == "acknowledged"
    # A non-delivery REPORT about one of these messages is recorded and raised as an event on the Subscription.
    r = requests.post(f"{sandbox.url}/messageexchange/admin/report", timeout=10, json={
        "mailbox_id": HUB_MAILBOX, "code": "14", "description": "Message not collected by recipient",
        "workflow_id": WORKFLOW, "linked_message_id": ids[1], "local_id": "cb-report-linked"})
    assert r.status_code == 200, r.text
    report_id = r.json()["message_id"]
    rec = done_record(hub, report_id, all_=False)
    assert rec["kind"] == "report" and rec["report"]["delivery"].startswith(f"{sub_id}/"), rec

    def report_events():
        found, cursor = [], "0"
        while True:
            body = requests.get(f"{hub.base_url}/events", timeout=30,
                                params={"type": "carebridge.mesh.report.v1", "after": cursor}).json()
            found += body["events"]
            if body["next"] == cursor:
                return found or None
            cursor = body["next"]

    (ev,) = wait_until(report_events, what="the mesh.report event")
    assert ev["subject"] == f"Subscription/{sub_id}", ev
    data = ev["eventdata"] if isinstance(ev.get("eventdata"), dict) else json.loads(ev["eventdata"])
    assert data["linkedMessageId"] == ids[1] and data["statusCode"] == "14" and data["reportMessageId"] == report_id


def test_send_accepted_but_not_recorded_is_reconciled_not_resent(tmp_path_factory, sandbox, monkeypatch):  # noqa: F811
    """The hub aborts after MESH accepted an outbound message and before it recorded the delivery; after the
    restart the delivery is settled by tracking its LocalID, and the partner receives the message once."""
    family = unique_family()
    cfg = write_config(tmp_path_factory.mktemp("meshsend") / "hub.toml", sandbox.url, RESTART_MAILBOX)
    monkeypatch.setenv("MESH_POLL_FAILPOINT", "after-send")
    srv = start_server(tmp_path_factory, name="meshsend", extra_args=["--config", str(cfg)])
    try:
        sub = {"resourceType": "Subscription", "status": "requested", "reason": "reconcile",
               "criteria": f"Patient?family={family}",
               "channel": {"type": "message", "endpoint": f"mesh://{PARTNER}?workflow_id={WORKFLOW}"}}
        r = requests.post(f"{srv.base_url}/fhir/Subscription", json=sub, headers=FHIR_JSON, timeout=30)
        assert r.status_code == 201, r.text
        sub_id = r.json()["id"]
        pat = local_patient(str(uuid.uuid4()), family)
        r = requests.post(f"{srv.base_url}/fhir/Patient", json=pat, headers=FHIR_JSON, timeout=30)
        assert r.status_code == 201, r.text
        code = srv.proc.wait(timeout=30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert code != 0 and "after-send" in srv.log(), srv.log()
    assert len(inbox(sandbox, PARTNER)) == 1, "MESH accepted the message before the abort"
    monkeypatch.delenv("MESH_POLL_FAILPOINT")
    srv2 = start_server(tmp_path_factory, name="meshsend2", extra_args=["--config", str(cfg)], data_dir=srv.data_dir)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
        out = wait_until(lambda: (lambda s: s if "delivered" in s else None)(subprocess.run(
            [str(_binary()), "deliveries", "list", "--data-dir", str(srv2.data_dir), "--subscription", sub_id],
            capture_output=True, timeout=60, env=env).stdout.decode()), what="the delivery to be delivered")
        ids = inbox(sandbox, PARTNER)
        assert len(ids) == 1, f"sent twice: {ids}"
        assert f"MESH {ids[0]}" in out, out
    finally:
        stop_server(srv2)
