"""Transaction and batch Bundles at POST /fhir, posted with requests and read back with fhirpy."""

import uuid

from conftest import describe
from helpers import NHS_SYSTEM, new_nhs_number, patient, practitioner, unique_family


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def booking_bundle(nhs: str, start="2031-06-02T10:00:00Z", end="2031-06-02T10:20:00Z"):
    """Patient + Practitioner + Schedule + Slot + a booked Appointment, linked by urn:uuid fullUrls.
    The Appointment comes first: the server orders writes by their references."""
    p, pr, sc, sl, ap = urn(), urn(), urn(), urn(), urn()
    entries = [
        (ap, {
            "resourceType": "Appointment",
            "status": "booked",
            "start": start,
            "end": end,
            "slot": [{"reference": sl}],
            "participant": [
                {"actor": {"reference": p}, "status": "accepted"},
                {"actor": {"reference": pr}, "status": "accepted"},
            ],
        }, "Appointment"),
        (p, patient(nhs), "Patient"),
        (pr, practitioner(), "Practitioner"),
        (sc, {"resourceType": "Schedule", "active": True, "actor": [{"reference": pr}]}, "Schedule"),
        (sl, {"resourceType": "Slot", "status": "free", "start": start, "end": end,
              "schedule": {"reference": sc}}, "Slot"),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": full, "resource": res, "request": {"method": "POST", "url": rtype}}
            for full, res, rtype in entries
        ],
    }


def test_transaction_books_and_reads_back(raw, client):
    nhs = new_nhs_number()
    r = raw.post(raw.fhir, booking_bundle(nhs))
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created"] * 5, describe(r)
    for e in body["entry"]:
        assert e["response"]["etag"] == 'W/"1"'
        assert e["response"]["location"].startswith(raw.fhir + "/")
    appt_id, patient_id, _, _, slot_id = (e["resource"]["id"] for e in body["entry"])

    # Read back through a FHIR client: references point at the server-assigned ids and the slot is taken.
    found = client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}").fetch_all()
    assert [p.id for p in found] == [patient_id]
    appts = client.resources("Appointment").search(patient=f"Patient/{patient_id}").fetch_all()
    assert [a.id for a in appts] == [appt_id]
    assert appts[0]["slot"][0]["reference"] == f"Slot/{slot_id}"
    slot = client.reference("Slot", slot_id).to_resource()
    assert slot["status"] == "busy"


def test_refused_transaction_writes_nothing(raw, client):
    nhs = new_nhs_number()
    bundle = booking_bundle(nhs, "2031-06-03T10:00:00Z", "2031-06-03T10:20:00Z")
    # A second booking of the same slot, last: refused by the booking engine, so the whole Bundle is undone.
    second = dict(bundle["entry"][0])
    second["fullUrl"] = urn()
    bundle["entry"].append(second)
    r = raw.post(raw.fhir, bundle)
    assert r.status_code == 409, describe(r)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"].startswith("Bundle.entry[5]"), describe(r)
    assert client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}").fetch_all() == []


def test_batch_applies_each_entry_on_its_own(raw, client):
    family = unique_family()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient(family=family), "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "birthDate": "not-a-date"},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient?family={family}"}},
        ],
    }
    r = raw.post("", bundle)  # POST {base}/ (with the trailing slash some clients add)
    assert r.status_code == 200, describe(r)
    entries = r.json()["entry"]
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[1]["response"]["status"].startswith("422")
    assert entries[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert entries[2]["resource"]["total"] == 1
    assert len(client.resources("Patient").search(family=family).fetch_all()) == 1


def test_other_bundle_types_are_refused(raw):
    r = raw.post(raw.fhir, {"resourceType": "Bundle", "type": "collection", "entry": []})
    assert r.status_code == 422, describe(r)
    assert r.json()["issue"][0]["expression"] == ["Bundle.type"]
