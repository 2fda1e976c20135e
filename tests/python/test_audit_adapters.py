"""Messages applied by the adapters are in the audit trail: each HL7 v2 message received over MLLP (sent by
python-hl7's `mllp_send`) and each MESH message polled from NHS England's mesh-sandbox (sent by `mesh_client`)
records an AuditEvent with who sent it, its HL7 control id or MESH message id, and the outcome, and never the
patient's name or NHS number.
"""

import subprocess
import time
import uuid

import pytest
import requests
from mesh_client import MeshClient

from conftest import _binary, start_server, stop_server
from helpers import new_nhs_number, unique_family
from mesh_sandbox import PASSWORD, SHARED_KEY, sandbox  # noqa: F401 (sandbox is a fixture)
from test_hl7_mllp import a28, frame, mllp_send

MAILBOX = "X26ABC3"
PARTNER = "X26ABC1"
WORKFLOW = "TEST_WORKFLOW"


def admin_token(srv):
    out = subprocess.run(
        [str(_binary()), "token", "--key", str(srv.data_dir / "admin-client-key.pem"), "--client", "admin",
         "--url", srv.base_url],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def audit_events(srv, token, subtype, want, timeout=15):
    """The AuditEvents of `subtype`, once at least `want` of them are there (audit pages are written each second)."""
    deadline = time.time() + timeout
    while True:
        r = requests.get(f"{srv.base_url}/fhir/AuditEvent", params={"subtype": subtype, "_count": "100"},
                         headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}, timeout=30)
        assert r.status_code == 200, r.text
        events = [e["resource"] for e in r.json().get("entry", [])]
        if len(events) >= want or time.time() > deadline:
            return events, r.text
        time.sleep(0.2)


def message_id(event, system):
    ids = [x["what"]["identifier"]["value"] for x in event.get("entity", [])
           if x.get("what", {}).get("identifier", {}).get("system") == system]
    return ids[0] if ids else None


def test_hl7_messages_over_mllp_are_audited(tmp_path_factory, tmp_path):
    srv = start_server(tmp_path_factory, "audit-hl7", extra_args=["--mllp", "127.0.0.1:0"], auth=True)
    try:
        nhs, family = new_nhs_number(), unique_family()
        good = f"AUD{uuid.uuid4().hex[:10]}"
        bad = f"AUD{uuid.uuid4().hex[:10]}"
        files = tmp_path / "msgs"
        # The same message twice (the resend is answered again, changing nothing), then one with an NHS number
        # that fails its check digit (AE).
        files.write_bytes(frame(a28(good, nhs, family)) + frame(a28(good, nhs, family))
                          + frame(a28(bad, "9434765918", family)))
        mllp_send(srv, files)
        token = admin_token(srv)
        events, text = audit_events(srv, token, "hl7-message", 3)
        assert len(events) == 3, text
        by_id = {}
        for e in events:
            by_id.setdefault(message_id(e, "urn:carebridge:hl7-control-id"), []).append(e)
        assert sorted(len(v) for v in by_id.values()) == [1, 2] and set(by_id) == {good, bad}, text
        for e in by_id[good]:
            assert e["type"]["code"] == "110107" and e["subtype"][0]["code"] == "hl7-message"
            assert e["outcome"] == "0" and "ADT^A28" in e["outcomeDesc"] and " AA " in e["outcomeDesc"]
            assert [a["who"]["identifier"]["value"] for a in e["agent"]] == ["hl7:PAS^RXX", "RXX"]
        assert any("duplicate" in e["outcomeDesc"] for e in by_id[good])
        (refused,) = by_id[bad]
        assert refused["outcome"] == "4" and " AE " in refused["outcomeDesc"], refused
        assert nhs not in text and family not in text and "9434765918" not in text
    finally:
        stop_server(srv)


def test_mesh_messages_are_audited(tmp_path_factory, sandbox):  # noqa: F811
    sandbox.reset()
    cfg = tmp_path_factory.mktemp("audit-mesh-cfg") / "hub.toml"
    cfg.write_text(
        "[[mesh.mailboxes]]\n"
        f'url = "{sandbox.url}"\nmailbox = "{MAILBOX}"\npassword = "{PASSWORD}"\nshared_key = "{SHARED_KEY}"\n'
        'poll_interval = "200ms"\ntimeout = "30s"\n'
    )
    srv = start_server(tmp_path_factory, "audit-mesh", extra_args=["--config", str(cfg)], auth=True)
    try:
        nhs, family = new_nhs_number(), unique_family()
        with MeshClient(sandbox.url, PARTNER, PASSWORD, shared_key=SHARED_KEY.encode()) as c:
            mid = c.send_message(MAILBOX, a28(f"AUDM{uuid.uuid4().hex[:8]}", nhs, family), workflow_id=WORKFLOW,
                                 subject="audit", local_id=str(uuid.uuid4()))
        token = admin_token(srv)
        events, text = audit_events(srv, token, "mesh-message", 1, timeout=30)
        (e,) = [e for e in events if message_id(e, "urn:carebridge:mesh-message-id") == mid] or [None]
        assert e is not None, text
        assert e["outcome"] == "0" and f"workflow={WORKFLOW}" in e["outcomeDesc"] and "kind=hl7" in e["outcomeDesc"]
        assert e["agent"][0]["who"]["identifier"]["value"] == f"mesh:{PARTNER}"
        assert nhs not in text and family not in text
    finally:
        stop_server(srv)
