"""`carebridge export` / `import`: FHIR bulk-data NDJSON out of the embedded store and into a fresh embedded store
and into PostgreSQL (when the test script provides CAREBRIDGE_TEST_DATABASE_URL), keeping ids, versions, history
and lastUpdated."""

import json
import os
import subprocess

import pytest
import requests

from conftest import REPO, start_server, stop_server
from helpers import new_nhs_number, patient, practitioner, schedule, slot

FHIR_JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}


def _bin():
    return str(os.environ.get("CAREBRIDGE_BIN") or REPO / "target" / "debug" / "carebridge")


def _run(*args):
    out = subprocess.run([_bin(), *args], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out


def _history(base, rtype, rid):
    body = requests.get(f"{base}/fhir/{rtype}/{rid}/_history", headers=FHIR_JSON, timeout=30).json()
    return [
        (e.get("resource", {}).get("meta", {}).get("versionId"), e.get("resource", {}).get("meta", {}).get("lastUpdated"),
         e["request"]["method"], json.dumps(e.get("resource", {}), sort_keys=True))
        for e in body.get("entry", [])
    ]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    srv = start_server(tmp_path_factory, "transfer-src")
    base = srv.base_url
    made = []

    def post(rtype, body):
        r = requests.post(f"{base}/fhir/{rtype}", json=body, headers=FHIR_JSON, timeout=30)
        assert r.status_code == 201, r.text
        made.append((rtype, r.json()["id"]))
        return r.json()

    p = post("Patient", patient(new_nhs_number()))
    p2 = dict(p, gender="male")
    assert requests.put(f"{base}/fhir/Patient/{p['id']}", json=p2, headers=FHIR_JSON, timeout=30).status_code == 200
    gone = post("Patient", patient(new_nhs_number()))
    assert requests.delete(f"{base}/fhir/Patient/{gone['id']}", timeout=30).status_code in (200, 204)
    doc = post("Practitioner", practitioner())
    sch = post("Schedule", schedule(f"Practitioner/{doc['id']}"))
    sl = post("Slot", slot(f"Schedule/{sch['id']}"))
    post("Appointment", {
        "resourceType": "Appointment", "status": "booked", "start": sl["start"], "end": sl["end"],
        "slot": [{"reference": f"Slot/{sl['id']}"}],
        "participant": [{"actor": {"reference": f"Patient/{p['id']}"}, "status": "accepted"},
                        {"actor": {"reference": f"Practitioner/{doc['id']}"}, "status": "accepted"}],
    })
    made.append(("Slot", sl["id"]))  # claimed: version 2
    expected = {(t, i): _history(base, t, i) for t, i in made}
    stop_server(srv)
    out = tmp_path_factory.mktemp("export")
    _run("export", "--data-dir", str(srv.data_dir), "--out", str(out), "--all-versions")
    return out, expected


def _check(base, expected):
    for (rtype, rid), hist in expected.items():
        assert _history(base, rtype, rid) == hist, f"{rtype}/{rid} history differs"


def test_export_import_embedded(source, tmp_path_factory):
    out, expected = source
    files = sorted(p.name for p in out.glob("*.ndjson"))
    assert "Patient.ndjson" in files and "Appointment.ndjson" in files
    target = tmp_path_factory.mktemp("import-sqlite") / "data"
    _run("import", "--data-dir", str(target), str(out))
    again = _run("import", "--data-dir", str(target), str(out))
    assert b"already present" in again.stderr  # idempotent
    srv = start_server(tmp_path_factory, "transfer-dst", data_dir=target)
    try:
        _check(srv.base_url, expected)
    finally:
        stop_server(srv)


def test_export_import_postgres(source, tmp_path_factory):
    url = os.environ.get("CAREBRIDGE_TEST_DATABASE_URL")
    if not url:
        pytest.skip("CAREBRIDGE_TEST_DATABASE_URL not set (no PostgreSQL server)")
    from test_postgres import _psql, _with_db
    import uuid

    name = "cb_tr_" + uuid.uuid4().hex[:10]
    subprocess.run([_psql(), url, "-q", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
    db = _with_db(url, name)
    try:
        out, expected = source
        _run("migrate", "--database-url", db)
        _run("import", "--database-url", db, str(out))
        srv = start_server(tmp_path_factory, "transfer-pg", extra_args=["--database-url", db])
        try:
            _check(srv.base_url, expected)
        finally:
            stop_server(srv)
    finally:
        subprocess.run([_psql(), url, "-q", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True)
