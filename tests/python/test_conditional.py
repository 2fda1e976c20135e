"""Conditional create (If-None-Exist), conditional update, and Idempotency-Key replay."""

import threading
import uuid

import requests

from conftest import FHIR_JSON, describe
from helpers import NHS_SYSTEM, fields, new_nhs_number, patient, unique_family


def count_by_identifier(client, nhs):
    return len(client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}").fetch_all())


def test_if_none_exist(raw, client):
    nhs = new_nhs_number()
    cond = {"If-None-Exist": f"identifier={NHS_SYSTEM}|{nhs}"}
    r1 = raw.post("Patient", patient(nhs), headers=cond)
    assert r1.status_code == 201, describe(r1)
    r2 = raw.post("Patient", patient(nhs, given="Other"), headers=cond)
    assert r2.status_code == 200, describe(r2)
    assert r2.json()["id"] == r1.json()["id"]
    assert r2.json()["name"][0]["given"] == ["Test"], "the existing resource is returned, not the new body"
    assert count_by_identifier(client, nhs) == 1


def test_if_none_exist_matching_several_is_412(raw):
    family = unique_family()
    raw.create(patient(family=family))
    raw.create(patient(family=family))
    r = raw.post("Patient", patient(family=family), headers={"If-None-Exist": f"family={family}"})
    assert r.status_code == 412, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_concurrent_conditional_creates(fhir, client):
    nhs = new_nhs_number()
    n = 20
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        body = patient(nhs, given=f"Racer{i}")
        headers = {
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
            "If-None-Exist": f"identifier={NHS_SYSTEM}|{nhs}",
        }
        barrier.wait(timeout=30)
        try:
            r = requests.post(f"{fhir}/Patient", json=body, headers=headers, timeout=60)
            results[i] = (r.status_code, r.json().get("id"), r.text)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = (None, None, repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(201) == 1 and statuses.count(200) == n - 1, results
    ids = {i for _, i, _ in results}
    assert len(ids) == 1, f"responses name different ids: {ids}"
    assert count_by_identifier(client, nhs) == 1
    r = requests.get(
        f"{fhir}/Patient",
        params={"identifier": f"{NHS_SYSTEM}|{nhs}", "_summary": "count"},
        headers={"Accept": FHIR_JSON},
        timeout=30,
    )
    assert r.json()["total"] == 1, describe(r)


def test_conditional_update(raw, client):
    nhs = new_nhs_number()
    path = f"Patient?identifier={NHS_SYSTEM}|{nhs}"
    r = raw.put(path, patient(nhs))
    assert r.status_code == 201, describe(r)
    pid = r.json()["id"]
    assert r.headers["ETag"] == 'W/"1"'

    r = raw.put(path, patient(nhs, given="Changed"))
    assert r.status_code == 200, describe(r)
    assert r.json()["id"] == pid
    assert r.headers["ETag"] == 'W/"2"'
    assert r.json()["name"][0]["given"] == ["Changed"]
    assert count_by_identifier(client, nhs) == 1


def test_conditional_update_through_fhirpy(client):
    nhs = new_nhs_number()
    searchset = client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}")
    first, created = searchset.update(client.resource("Patient", **fields(patient(nhs))))
    assert created
    second, created_again = searchset.update(
        client.resource("Patient", **fields(patient(nhs, given="Again")))
    )
    assert not created_again
    assert second.id == first.id
    assert second["meta"]["versionId"] == "2"


def test_idempotency_key_replay(raw, client):
    nhs = new_nhs_number()
    key = str(uuid.uuid4())
    body = patient(nhs)
    r1 = raw.post("Patient", body, headers={"Idempotency-Key": key})
    assert r1.status_code == 201, describe(r1)
    r2 = raw.post("Patient", body, headers={"Idempotency-Key": key})
    assert r2.status_code == 201, describe(r2)
    assert r2.json()["id"] == r1.json()["id"]
    assert r2.headers["Location"] == r1.headers["Location"]
    assert r2.headers["ETag"] == r1.headers["ETag"]
    assert count_by_identifier(client, nhs) == 1

    other = patient(nhs, given="Different")
    r3 = raw.post("Patient", other, headers={"Idempotency-Key": key})
    assert r3.status_code == 422, describe(r3)
    assert r3.json()["resourceType"] == "OperationOutcome"
    assert count_by_identifier(client, nhs) == 1


def test_idempotency_key_on_put(raw):
    p = raw.create(patient())
    key = str(uuid.uuid4())
    p["gender"] = "male"
    r1 = raw.put(f"Patient/{p['id']}", p, headers={"Idempotency-Key": key})
    assert r1.status_code == 200 and r1.headers["ETag"] == 'W/"2"', describe(r1)
    r2 = raw.put(f"Patient/{p['id']}", p, headers={"Idempotency-Key": key})
    assert r2.status_code == 200 and r2.headers["ETag"] == 'W/"2"', describe(r2)
    assert raw.get(f"Patient/{p['id']}").headers["ETag"] == 'W/"2"', "the replay must not write a version"
    p["gender"] = "other"
    r3 = raw.put(f"Patient/{p['id']}", p, headers={"Idempotency-Key": key})
    assert r3.status_code == 422, describe(r3)


def run_concurrently(n, fn):
    """Run fn(i) for i in 0..n on n threads released together; returns the results (or exceptions) in order."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        barrier.wait(timeout=30)
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_concurrent_idempotent_retries(fhir, client):
    nhs = new_nhs_number()
    key = str(uuid.uuid4())
    body = patient(nhs)
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Idempotency-Key": key}

    def post(_):
        r = requests.post(f"{fhir}/Patient", json=body, headers=headers, timeout=60)
        return r.status_code, r.json().get("id"), r.text

    results = run_concurrently(10, post)
    assert all(isinstance(x, tuple) and x[0] == 201 for x in results), results
    assert len({x[1] for x in results}) == 1, results
    assert count_by_identifier(client, nhs) == 1


def test_concurrent_if_match_updates(fhir, raw):
    p = raw.create(patient())
    pid = p["id"]

    def put(i):
        body = dict(p, gender=["male", "female", "other", "unknown"][i % 4])
        r = requests.put(
            f"{fhir}/Patient/{pid}",
            json=body,
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "If-Match": 'W/"1"'},
            timeout=60,
        )
        return r.status_code, r.headers.get("ETag"), r.text

    results = run_concurrently(10, put)
    statuses = sorted(x[0] if isinstance(x, tuple) else x for x in results)
    assert statuses == [200] + [412] * 9, results
    assert raw.get(f"Patient/{pid}").headers["ETag"] == 'W/"2"'
    assert len(raw.get(f"Patient/{pid}/_history").json()["entry"]) == 2


def test_concurrent_conditional_updates(fhir, client):
    nhs = new_nhs_number()

    def put(i):
        r = requests.put(
            f"{fhir}/Patient",
            params={"identifier": f"{NHS_SYSTEM}|{nhs}"},
            json=patient(nhs, given=f"Writer{i}"),
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
            timeout=60,
        )
        return r.status_code, r.json().get("id"), r.text

    results = run_concurrently(10, put)
    assert all(isinstance(x, tuple) for x in results), results
    statuses = sorted(x[0] for x in results)
    assert statuses == [200] * 9 + [201], results
    assert len({x[1] for x in results}) == 1, results
    assert count_by_identifier(client, nhs) == 1
    stored = client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}").get()
    assert stored["meta"]["versionId"] == "10", "ten serialised writes make version 10"
