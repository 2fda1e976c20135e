"""HTTP-level behaviour: content negotiation, request ids, health, unknown types, CapabilityStatement."""

import uuid

import requests

from conftest import FHIR_JSON, describe
from helpers import TYPES, patient

def assert_outcome(r, status):
    assert r.status_code == status, describe(r)
    assert r.headers["Content-Type"].startswith(FHIR_JSON), describe(r)
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", describe(r)
    assert body["issue"], describe(r)


def test_xml_accept_is_406(raw):
    assert_outcome(raw.get("metadata", headers={"Accept": "application/fhir+xml"}), 406)
    assert_outcome(raw.get("Patient", headers={"Accept": "application/xml"}), 406)
    assert_outcome(raw.get("Patient?_format=xml"), 406)


def test_xml_body_is_415(raw):
    xml = '<Patient xmlns="http://hl7.org/fhir"><gender value="male"/></Patient>'
    r = raw.post("Patient", xml, headers={"Content-Type": "application/fhir+xml"})
    assert_outcome(r, 415)
    r = raw.put("Patient/x1", xml, headers={"Content-Type": "application/xml"})
    assert_outcome(r, 415)


def test_json_accept_variants_are_served(raw):
    for accept in ("application/fhir+json", "application/json", "*/*", "application/fhir+json; fhirVersion=4.0"):
        r = raw.get("metadata", headers={"Accept": accept})
        assert r.status_code == 200, describe(r)


def test_request_id_echoed(raw):
    rid = f"test-{uuid.uuid4()}"
    cid = f"corr-{uuid.uuid4()}"
    r = raw.get("metadata", headers={"X-Request-ID": rid, "X-Correlation-ID": cid})
    assert r.headers.get("X-Request-ID") == rid, describe(r)
    assert r.headers.get("X-Correlation-ID") == cid, describe(r)
    # Also on errors and on writes.
    r = raw.get("Patient/does-not-exist", headers={"X-Request-ID": rid})
    assert r.status_code == 404 and r.headers.get("X-Request-ID") == rid, describe(r)
    r = raw.post("Patient", patient(), headers={"X-Request-ID": rid})
    assert r.status_code == 201 and r.headers.get("X-Request-ID") == rid, describe(r)


def test_request_id_echoed_on_negotiation_errors(raw):
    r = raw.get("metadata", headers={"Accept": "application/fhir+xml", "X-Request-ID": "neg-406"})
    assert r.status_code == 406 and r.headers.get("X-Request-ID") == "neg-406", describe(r)


def test_request_id_generated_when_absent(raw):
    a = raw.get("metadata").headers.get("X-Request-ID")
    b = raw.get("metadata").headers.get("X-Request-ID")
    assert a and b and a != b, (a, b)
    assert "X-Correlation-ID" not in raw.get("metadata").headers


def test_health(base_url):
    r = requests.get(f"{base_url}/health", timeout=10)
    assert r.status_code == 200, describe(r)
    assert r.json()["status"] == "ok"


def test_unknown_type_is_404_operation_outcome(raw):
    assert_outcome(raw.get("Observation"), 404)
    assert_outcome(raw.post("Observation", {"resourceType": "Observation", "status": "final"}), 404)


def test_metadata(raw, client):
    r = raw.get("metadata")
    assert r.status_code == 200, describe(r)
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance"
    assert "application/fhir+json" in cs["format"]
    resources = cs["rest"][0]["resource"]
    assert sorted(res["type"] for res in resources) == sorted(TYPES + ["Subscription"])
    for res in resources:
        if res["type"] == "Subscription":  # UK Core does not profile it
            assert res["profile"] == "http://hl7.org/fhir/StructureDefinition/Subscription"
            continue
        assert res["profile"] == f"https://fhir.hl7.org.uk/StructureDefinition/UKCore-{res['type']}", res["type"]
        codes = {i["code"] for i in res["interaction"]}
        assert codes >= {
            "read",
            "vread",
            "update",
            "delete",
            "history-instance",
            "history-type",
            "create",
            "search-type",
        }, res["type"]
        names = {p["name"] for p in res["searchParam"]}
        assert {"_id", "_lastUpdated", "identifier"} <= names, res["type"]

    by_type = {res["type"]: res for res in resources}
    assert "Appointment:patient" in by_type["Appointment"]["searchInclude"]
    assert "Slot:schedule" in by_type["Slot"]["searchInclude"]
    assert "Schedule:actor" in by_type["Schedule"]["searchInclude"]
    patient_params = {p["name"] for p in by_type["Patient"]["searchParam"]}
    assert {"family", "birthdate", "name"} <= patient_params

    # The same through fhirpy.
    via_client = client.execute("metadata", method="get")
    assert via_client["fhirVersion"] == "4.0.1"
