"""Create, read, vread, update, delete and history: through fhirpy resources, and raw HTTP for headers."""

import email.utils
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from fhirpy.base.exceptions import ResourceNotFound

from conftest import FHIR_JSON, describe
from helpers import fields, new_nhs_number, patient, unique_family


def parse_instant(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_crud_through_fhirpy(client, raw):
    nhs = new_nhs_number()
    family = unique_family()
    p = client.resource("Patient", **fields(patient(nhs, family)))
    p.save()
    assert p.id, "server assigned no id"
    assert p["meta"]["versionId"] == "1"
    assert p.resourceType == "Patient"

    fetched = client.reference("Patient", p.id).to_resource()
    assert fetched["identifier"][0]["value"] == nhs
    assert fetched["name"][0]["family"] == family
    assert fetched["meta"]["versionId"] == "1"

    # Update through fhirpy: PUT of the whole resource (meta included, as clients send it back).
    p["name"][0]["given"] = ["Updated"]
    p.save()
    assert p["meta"]["versionId"] == "2"
    assert p["name"][0]["given"] == ["Updated"]

    # A change made by someone else is seen by refresh().
    other = raw.get(f"Patient/{p.id}").json()
    other["gender"] = "male"
    r = raw.put(f"Patient/{p.id}", other)
    assert r.status_code == 200, describe(r)
    p.refresh()
    assert p["gender"] == "male"
    assert p["meta"]["versionId"] == "3"

    p.delete()
    r = raw.get(f"Patient/{p.id}")
    assert r.status_code == 410, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"
    with pytest.raises(ResourceNotFound):
        client.reference("Patient", p.id).to_resource()


def test_create_response_headers(raw, fhir):
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    r = raw.post("Patient", patient())
    assert r.status_code == 201, describe(r)
    body = r.json()
    pid = body["id"]
    assert r.headers["Location"] == f"{fhir}/Patient/{pid}/_history/1"
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Content-Type"].startswith(FHIR_JSON)
    last_modified = email.utils.parsedate_to_datetime(r.headers["Last-Modified"])
    after = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert before <= last_modified <= after
    assert body["meta"]["versionId"] == "1"
    meta_time = parse_instant(body["meta"]["lastUpdated"])
    # Last-Modified has second precision: it is meta.lastUpdated truncated.
    assert abs((meta_time - last_modified).total_seconds()) < 1.0, (body["meta"], r.headers["Last-Modified"])


def test_read_headers(raw, fhir):
    created = raw.post("Patient", patient())
    assert created.status_code == 201, describe(created)
    pid = created.json()["id"]
    r = raw.get(f"Patient/{pid}")
    assert r.status_code == 200, describe(r)
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Last-Modified"] == created.headers["Last-Modified"]
    assert r.headers["Content-Type"].startswith(FHIR_JSON)
    assert r.json() == created.json()


def test_create_ignores_client_id(raw):
    body = patient()
    body["id"] = "chosen-by-client"
    r = raw.post("Patient", body)
    assert r.status_code == 201, describe(r)
    assert r.json()["id"] != "chosen-by-client"
    assert raw.get("Patient/chosen-by-client").status_code == 404


def test_read_unknown_is_404_operation_outcome(raw):
    r = raw.get(f"Patient/no-such-{uuid.uuid4().hex[:8]}")
    assert r.status_code == 404, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_update_as_create_then_update(raw, fhir):
    pid = f"cb-{uuid.uuid4().hex[:12]}"
    body = patient()
    body["id"] = pid
    r = raw.put(f"Patient/{pid}", body)
    assert r.status_code == 201, describe(r)
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Location"] == f"{fhir}/Patient/{pid}/_history/1"
    assert r.json()["id"] == pid

    body["gender"] = "other"
    r = raw.put(f"Patient/{pid}", body)
    assert r.status_code == 200, describe(r)
    assert r.headers["ETag"] == 'W/"2"'
    assert r.json()["meta"]["versionId"] == "2"
    assert r.json()["gender"] == "other"


def test_update_with_mismatched_id_is_refused(raw):
    created = raw.create(patient())
    created["id"] = "something-else"
    r = raw.put(f"Patient/{raw.create(patient())['id']}", created)
    assert r.status_code == 400, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_if_match(raw):
    p = raw.create(patient())
    pid = p["id"]
    r = raw.put(f"Patient/{pid}", p, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, describe(r)
    assert r.headers["ETag"] == 'W/"2"'

    # Stale version: 412, and nothing changes.
    stale = dict(p, gender="male")
    r = raw.put(f"Patient/{pid}", stale, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"
    current = raw.get(f"Patient/{pid}")
    assert current.headers["ETag"] == 'W/"2"'
    assert current.json()["gender"] == p["gender"]

    r = raw.delete(f"Patient/{pid}", headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412, describe(r)
    assert raw.get(f"Patient/{pid}").status_code == 200
    r = raw.delete(f"Patient/{pid}", headers={"If-Match": 'W/"2"'})
    assert r.status_code in (200, 204), describe(r)


def test_if_none_match_read_is_304(raw):
    p = raw.create(patient())
    r = raw.get(f"Patient/{p['id']}", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304, describe(r)


def test_delete_then_read_is_410_and_history_survives(raw):
    p = raw.create(patient())
    pid = p["id"]
    r = raw.delete(f"Patient/{pid}")
    assert r.status_code in (200, 204), describe(r)
    r = raw.get(f"Patient/{pid}")
    assert r.status_code == 410, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"
    # The old version stays readable.
    r = raw.get(f"Patient/{pid}/_history/1")
    assert r.status_code == 200, describe(r)
    assert r.json()["identifier"] == p["identifier"]
    # Deleting again is not an error.
    r = raw.delete(f"Patient/{pid}")
    assert r.status_code in (200, 204), describe(r)
    # A deleted Patient is not found by search.
    r = raw.get("Patient", params={"_id": pid})
    assert r.status_code == 200, describe(r)
    assert r.json().get("entry", []) == []


def test_vread(raw):
    p = raw.create(patient(given="First"))
    pid = p["id"]
    p["name"][0]["given"] = ["Second"]
    r = raw.put(f"Patient/{pid}", p)
    assert r.status_code == 200, describe(r)

    v1 = raw.get(f"Patient/{pid}/_history/1")
    assert v1.status_code == 200, describe(v1)
    assert v1.headers["ETag"] == 'W/"1"'
    assert v1.json()["name"][0]["given"] == ["First"]
    assert v1.json()["meta"]["versionId"] == "1"

    v2 = raw.get(f"Patient/{pid}/_history/2")
    assert v2.status_code == 200, describe(v2)
    assert v2.json()["name"][0]["given"] == ["Second"]
    assert v2.json()["meta"]["versionId"] == "2"

    r = raw.get(f"Patient/{pid}/_history/99")
    assert r.status_code == 404, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_history_instance_and_type(raw, fhir):
    p = raw.create(patient())
    pid = p["id"]
    for gender in ("male", "other"):
        p["gender"] = gender
        r = raw.put(f"Patient/{pid}", p)
        assert r.status_code == 200, describe(r)
    assert raw.delete(f"Patient/{pid}").status_code in (200, 204)

    r = raw.get(f"Patient/{pid}/_history")
    assert r.status_code == 200, describe(r)
    b = r.json()
    assert b["resourceType"] == "Bundle" and b["type"] == "history"
    entries = b["entry"]
    assert [e["response"]["etag"] for e in entries] == ['W/"4"', 'W/"3"', 'W/"2"', 'W/"1"'], "newest first"
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "PUT", "POST"]
    assert "resource" not in entries[0]
    assert [e["resource"]["gender"] for e in entries[1:]] == ["other", "male", "female"]
    assert all(e["fullUrl"] == f"{fhir}/Patient/{pid}" for e in entries)
    times = [parse_instant(e["response"]["lastModified"]) for e in entries]
    assert times == sorted(times, reverse=True)

    # Paged with _count=1: the same four entries across four pages.
    pages = raw.all_pages(f"Patient/{pid}/_history?_count=1")
    assert [e["response"]["etag"] for pg in pages for e in pg.get("entry", [])] == [
        'W/"4"',
        'W/"3"',
        'W/"2"',
        'W/"1"',
    ]

    # Type history holds the same versions in the same order.
    type_entries = [
        e
        for pg in raw.all_pages("Patient/_history?_count=1000")
        for e in pg.get("entry", [])
        if e["fullUrl"].endswith(f"/Patient/{pid}")
    ]
    assert [e["response"]["etag"] for e in type_entries] == ['W/"4"', 'W/"3"', 'W/"2"', 'W/"1"']


def test_history_of_unknown_resource_is_404(raw):
    r = raw.get(f"Patient/never-{uuid.uuid4().hex[:8]}/_history")
    assert r.status_code == 404, describe(r)


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_prefer_return(raw, method):
    def write(prefer):
        body = patient()
        if method == "POST":
            return raw.post("Patient", body, headers={"Prefer": prefer})
        pid = f"cb-{uuid.uuid4().hex[:12]}"
        body["id"] = pid
        return raw.put(f"Patient/{pid}", body, headers={"Prefer": prefer})

    r = write("return=minimal")
    assert r.status_code == 201, describe(r)
    assert r.content == b"", describe(r)
    assert r.headers["ETag"] == 'W/"1"'
    assert "/_history/1" in r.headers["Location"]

    r = write("return=representation")
    assert r.status_code == 201, describe(r)
    assert r.json()["resourceType"] == "Patient"

    r = write("return=OperationOutcome")
    assert r.status_code == 201, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["ETag"] == 'W/"1"'
    location = r.headers["Location"]

    # The resource the minimal/OperationOutcome replies named exists.
    r = raw.get(location)
    assert r.status_code == 200, describe(r)


def test_prefer_minimal_on_update(raw):
    p = raw.create(patient())
    r = raw.put(f"Patient/{p['id']}", p, headers={"Prefer": "return=minimal"})
    assert r.status_code == 200, describe(r)
    assert r.content == b""
    assert r.headers["ETag"] == 'W/"2"'
