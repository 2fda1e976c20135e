"""Organisation separation: a client belongs to an organisation (ODS code) and, without the `cross-org` scope,
sees and changes only the Schedules, Slots and Appointments of its organisation and the Patients linked to them.

Two organisations, RA7 and RB8, each with a schedule (A's actor is a reference to its Organization resource,
B's an ODS identifier), slots, patients and a booked appointment, all set up by the admin client (which has
`cross-org`). Every negative case asserts the refusal AND that nothing of organisation B leaked into the answer
(B's patient names, NHS numbers, appointment description and ids) or changed (read back by the admin).
"""

import json
import uuid

import pytest
import requests

from conftest import describe, start_server, stop_server
from helpers import NHS_SYSTEM, new_nhs_number, practitioner
from test_security import Hub

ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
BOOKING_ORG = "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-BookingOrganization"
ORG_A, ORG_B = "RA7", "RB8"
SECRET_B = "Secretbravo"           # family name of B's patients
SECRET_NOTE = "SECRET-B-NOTE"      # description of B's appointment


def patient_res(family, nhs, managing=None):
    p = {"resourceType": "Patient", "identifier": [{"system": NHS_SYSTEM, "value": nhs}],
         "name": [{"family": family, "given": ["Test"]}], "gender": "female", "birthDate": "1981-02-03"}
    if managing:
        p["managingOrganization"] = {"type": "Organization", "identifier": {"system": ODS, "value": managing}}
    return p


def slot_res(schedule_id, start, end):
    return {"resourceType": "Slot", "schedule": {"reference": f"Schedule/{schedule_id}"}, "status": "free",
            "start": start, "end": end}


def appointment_res(slot_ids, patient_id, start, end, description=None, booking_org=None):
    a = {"resourceType": "Appointment", "status": "booked", "start": start, "end": end,
         "slot": [{"reference": f"Slot/{s}"} for s in slot_ids],
         "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"}]}
    if description:
        a["description"] = description
    if booking_org:
        a["extension"] = [{"url": BOOKING_ORG,
                           "valueReference": {"identifier": {"system": ODS, "value": booking_org}}}]
    return a


class World:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    srv = start_server(tmp_path_factory, "orgsep", auth=True)
    hub = Hub(srv, tmp_path_factory.mktemp("orgsep-keys"))
    hub.keys["admin"] = (hub.admin_key, "admin-1")
    w = World()
    w.hub = hub
    w.admin = hub.admin_token()

    def create(res):
        r = hub.call("POST", f"/fhir/{res['resourceType']}", w.admin, res)
        assert r.status_code == 201, describe(r)
        return r.json()

    w.create = create
    w.org_a = create({"resourceType": "Organization", "name": "Trust A",
                      "identifier": [{"system": ODS, "value": ORG_A}]})
    w.org_b = create({"resourceType": "Organization", "name": "Trust B",
                      "identifier": [{"system": ODS, "value": ORG_B}]})
    w.doc = create(practitioner())
    w.sched_a = create({"resourceType": "Schedule", "active": True, "actor": [
        {"reference": f"Organization/{w.org_a['id']}"}, {"reference": f"Practitioner/{w.doc['id']}"}]})
    w.sched_b = create({"resourceType": "Schedule", "active": True, "actor": [
        {"type": "Organization", "identifier": {"system": ODS, "value": ORG_B}}]})
    t = lambda h: (f"2030-03-04T{h}:00:00Z", f"2030-03-04T{h}:15:00Z")  # noqa: E731
    w.slot_a1 = create(slot_res(w.sched_a["id"], *t("09")))
    w.slot_a2 = create(slot_res(w.sched_a["id"], *t("10")))
    w.slot_b1 = create(slot_res(w.sched_b["id"], *t("09")))
    w.slot_b2 = create(slot_res(w.sched_b["id"], *t("11")))
    w.slot_b3 = create(slot_res(w.sched_b["id"], *t("12")))
    w.nhs_b = new_nhs_number()
    w.nhs_bm = new_nhs_number()
    w.pat_a = create(patient_res("Alphapatient", new_nhs_number()))
    w.pat_a2 = create(patient_res("Alphatwo", new_nhs_number()))
    w.pat_b = create(patient_res(SECRET_B, w.nhs_b))
    w.pat_bm = create(patient_res(SECRET_B, w.nhs_bm, managing=ORG_B))
    w.appt_a = create(appointment_res([w.slot_a1["id"]], w.pat_a["id"], *t("09")))
    w.appt_b = create(appointment_res([w.slot_b1["id"]], w.pat_b["id"], *t("09"), description=SECRET_NOTE))
    # A's booking (BookingOrganization RA7) in B's slot: visible to both; B's slot stays B's.
    w.appt_mixed = create(appointment_res([w.slot_b2["id"]], w.pat_a2["id"], *t("11"), booking_org=ORG_A))
    hub.add_client("org-a", "system/*.cruds", ods=ORG_A)
    hub.add_client("org-b", "system/*.cruds", ods=ORG_B)
    hub.add_client("org-x", "system/*.cruds cross-org", ods=ORG_A)
    w.a = hub.token("org-a")
    w.b = hub.token("org-b")
    w.x = hub.token("org-x")
    # Everything of B that must never reach A.
    w.b_secrets = [SECRET_B, SECRET_NOTE, w.nhs_b, w.nhs_bm, w.appt_b["id"], w.pat_b["id"], w.pat_bm["id"],
                   w.sched_b["id"], w.slot_b1["id"], w.slot_b3["id"]]
    yield w
    stop_server(srv)


def no_leak(w, r):
    """Nothing of B in the answer, except what the client itself sent (an id in the URL, a search value)."""
    sent = r.request.url + (r.request.body.decode() if isinstance(r.request.body, bytes) else (r.request.body or ""))
    for s in w.b_secrets:
        if s not in sent:
            assert s not in r.text, f"{s} leaked:" + describe(r)


def assert_404(w, r):
    assert r.status_code == 404, describe(r)
    out = r.json()
    assert out["resourceType"] == "OperationOutcome", describe(r)
    assert "is not known" in out["issue"][0]["diagnostics"]
    no_leak(w, r)


def same_as_missing(w, path_existing, path_missing, token):
    """Another organisation's resource and a missing one get the same answer (apart from the id)."""
    r1 = w.hub.call("GET", path_existing, token)
    r2 = w.hub.call("GET", path_missing, token)
    assert r1.status_code == r2.status_code == 404, describe(r1) + describe(r2)
    d1 = r1.json()["issue"][0]["diagnostics"].replace(path_existing.split("/")[-1], "ID")
    d2 = r2.json()["issue"][0]["diagnostics"].replace(path_missing.split("/")[-1], "ID")
    assert d1 == d2


def admin_get(w, path):
    r = w.hub.call("GET", path, w.admin)
    assert r.status_code == 200, describe(r)
    return r.json()


def ids(bundle, rtype=None):
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if rtype is None or e["resource"]["resourceType"] == rtype}


# --- reads -------------------------------------------------------------------------------------------------------


def test_read_of_another_organisations_resources_is_404(world):
    w = world
    for path in [f"/fhir/Appointment/{w.appt_b['id']}", f"/fhir/Schedule/{w.sched_b['id']}",
                 f"/fhir/Slot/{w.slot_b1['id']}", f"/fhir/Patient/{w.pat_b['id']}",
                 f"/fhir/Patient/{w.pat_bm['id']}"]:
        assert_404(w, w.hub.call("GET", path, w.a))
    same_as_missing(w, f"/fhir/Appointment/{w.appt_b['id']}", f"/fhir/Appointment/{uuid.uuid4()}", w.a)
    # HEAD tells nothing either.
    r = requests.head(w.hub.base + f"/fhir/Appointment/{w.appt_b['id']}",
                      headers={"Authorization": f"Bearer {w.a}"}, timeout=30)
    assert r.status_code == 404 and "ETag" not in r.headers
    # Its own, and shared reference data, are readable.
    assert w.hub.call("GET", f"/fhir/Appointment/{w.appt_a['id']}", w.a).status_code == 200
    assert w.hub.call("GET", f"/fhir/Organization/{w.org_b['id']}", w.a).status_code == 200
    assert w.hub.call("GET", f"/fhir/Practitioner/{w.doc['id']}", w.a).status_code == 200


def test_vread_of_another_organisations_resource_is_404(world):
    w = world
    assert_404(w, w.hub.call("GET", f"/fhir/Appointment/{w.appt_b['id']}/_history/1", w.a))
    assert_404(w, w.hub.call("GET", f"/fhir/Patient/{w.pat_b['id']}/_history/1", w.a))
    assert w.hub.call("GET", f"/fhir/Appointment/{w.appt_a['id']}/_history/1", w.a).status_code == 200


def test_instance_history_of_another_organisations_resource_is_404(world):
    w = world
    for path in [f"/fhir/Appointment/{w.appt_b['id']}/_history", f"/fhir/Slot/{w.slot_b1['id']}/_history",
                 f"/fhir/Patient/{w.pat_b['id']}/_history"]:
        assert_404(w, w.hub.call("GET", path, w.a))
    r = w.hub.call("GET", f"/fhir/Appointment/{w.appt_a['id']}/_history", w.a)
    assert r.status_code == 200 and r.json()["entry"], describe(r)


def test_type_history_holds_only_the_organisations_resources(world):
    w = world
    r = w.hub.call("GET", "/fhir/Appointment/_history?_count=500", w.a)
    assert r.status_code == 200, describe(r)
    no_leak(w, r)
    seen = {e["fullUrl"].rsplit("/", 1)[-1] for e in r.json().get("entry", [])}
    assert w.appt_a["id"] in seen and w.appt_mixed["id"] in seen and w.appt_b["id"] not in seen
    assert r.json()["total"] == len(r.json()["entry"])
    r = w.hub.call("GET", "/fhir/Patient/_history?_count=500", w.a)
    assert r.status_code == 200, describe(r)
    no_leak(w, r)
    # The admin (cross-org) sees B's history.
    full = admin_get(w, "/fhir/Appointment/_history?_count=500")
    assert w.appt_b["id"] in {e["fullUrl"].rsplit("/", 1)[-1] for e in full["entry"]}


# --- searches ------------------------------------------------------------------------------------------------------


def test_search_is_filtered_before_paging_and_counting(world):
    w = world
    r = w.hub.call("GET", "/fhir/Appointment?_count=500", w.a)
    assert r.status_code == 200, describe(r)
    no_leak(w, r)
    mine = ids(r.json())
    assert mine == {w.appt_a["id"], w.appt_mixed["id"]}, describe(r)
    assert r.json()["total"] == 2
    # Paging: one per page, two pages, nothing of B on either.
    pages = []
    url = "/fhir/Appointment?_count=1"
    while url:
        r = w.hub.call("GET", url, w.a)
        assert r.status_code == 200, describe(r)
        no_leak(w, r)
        pages.append(ids(r.json()))
        nxt = [link["url"] for link in r.json()["link"] if link["relation"] == "next"]
        url = nxt[0].split(w.hub.base, 1)[1] if nxt else None
    assert [len(p) for p in pages] == [1, 1] and set().union(*pages) == mine
    # Counts count only what the client may see.
    for path, expected in [("/fhir/Appointment?_summary=count", 2),
                           (f"/fhir/Slot?schedule=Schedule/{w.sched_b['id']}&_summary=count", 0),
                           (f"/fhir/Slot?schedule=Schedule/{w.sched_b['id']}", 0),
                           (f"/fhir/Patient?family={SECRET_B}&_summary=count", 0),
                           (f"/fhir/Patient?identifier={NHS_SYSTEM}|{w.nhs_b}", 0),
                           ("/fhir/Schedule?_summary=count", 1)]:
        r = w.hub.call("GET", path, w.a)
        assert r.status_code == 200, describe(r)
        assert r.json()["total"] == expected, describe(r)
        assert "entry" not in r.json() or expected > 0
        no_leak(w, r)
    # The same searches through POST _search.
    r = requests.post(w.hub.base + "/fhir/Patient/_search", data={"family": SECRET_B},
                      headers={"Authorization": f"Bearer {w.a}"}, timeout=30)
    assert r.status_code == 200 and r.json()["total"] == 0, describe(r)
    no_leak(w, r)
    # B sees its own.
    r = w.hub.call("GET", f"/fhir/Patient?family={SECRET_B}&_summary=count", w.b)
    assert r.json()["total"] == 2, describe(r)


def test_include_returns_only_visible_resources(world):
    w = world
    # A's booking sits in B's slot: the appointment is A's, the slot is not.
    r = w.hub.call("GET", f"/fhir/Appointment?_id={w.appt_mixed['id']}&_include=Appointment:slot"
                          f"&_include=Appointment:patient", w.a)
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert ids(body, "Appointment") == {w.appt_mixed["id"]}
    assert ids(body, "Slot") == set(), describe(r)
    assert ids(body, "Patient") == {w.pat_a2["id"]}
    no_leak(w, r)
    # A Slot search including schedules never brings B's schedule.
    r = w.hub.call("GET", "/fhir/Slot?_include=Slot:schedule&_count=500", w.a)
    assert r.status_code == 200, describe(r)
    assert ids(r.json(), "Schedule") == {w.sched_a["id"]}
    assert ids(r.json(), "Slot") == {w.slot_a1["id"], w.slot_a2["id"]}
    no_leak(w, r)
    # The cross-org client gets the slot included.
    r = w.hub.call("GET", f"/fhir/Appointment?_id={w.appt_mixed['id']}&_include=Appointment:slot", w.x)
    assert ids(r.json(), "Slot") == {w.slot_b2["id"]}, describe(r)


# --- changes -------------------------------------------------------------------------------------------------------


def test_update_and_patch_of_another_organisations_resource_are_404_and_change_nothing(world):
    w = world
    before = admin_get(w, f"/fhir/Appointment/{w.appt_b['id']}")
    changed = dict(before, description="overwritten by A")
    assert_404(w, w.hub.call("PUT", f"/fhir/Appointment/{w.appt_b['id']}", w.a, changed))
    r = requests.patch(w.hub.base + f"/fhir/Appointment/{w.appt_b['id']}",
                       headers={"Authorization": f"Bearer {w.a}", "Content-Type": "application/json-patch+json"},
                       data=json.dumps([{"op": "replace", "path": "/description", "value": "patched by A"}]),
                       timeout=30)
    assert_404(w, r)
    pat = admin_get(w, f"/fhir/Patient/{w.pat_b['id']}")
    assert_404(w, w.hub.call("PUT", f"/fhir/Patient/{w.pat_b['id']}", w.a, dict(pat, gender="male")))
    after = admin_get(w, f"/fhir/Appointment/{w.appt_b['id']}")
    assert after["meta"]["versionId"] == before["meta"]["versionId"] and after["description"] == SECRET_NOTE
    assert admin_get(w, f"/fhir/Patient/{w.pat_b['id']}")["meta"]["versionId"] == pat["meta"]["versionId"]


def test_delete_of_another_organisations_resource_is_404_and_keeps_it(world):
    w = world
    assert_404(w, w.hub.call("DELETE", f"/fhir/Slot/{w.slot_b3['id']}", w.a))
    assert_404(w, w.hub.call("DELETE", f"/fhir/Patient/{w.pat_bm['id']}", w.a))
    # A missing slot gets the same answer, so existence does not leak.
    assert_404(w, w.hub.call("DELETE", f"/fhir/Slot/{uuid.uuid4()}", w.a))
    assert admin_get(w, f"/fhir/Slot/{w.slot_b3['id']}")["meta"]["versionId"] == "1"
    assert admin_get(w, f"/fhir/Patient/{w.pat_bm['id']}")["meta"]["versionId"] == "1"


def test_transition_of_another_organisations_appointment_is_404(world):
    w = world
    r = w.hub.call("POST", f"/fhir/Appointment/{w.appt_b['id']}/$transition", w.a,
                   {"resourceType": "Parameters", "parameter": [{"name": "status", "valueCode": "cancelled"}]})
    assert_404(w, r)
    r = w.hub.call("POST", f"/fhir/Schedule/{w.sched_b['id']}/$generate-slots", w.a, {
        "resourceType": "Parameters", "parameter": [
            {"name": "daysOfWeek", "valueCode": "mon"}, {"name": "openingTime", "valueString": "09:00-10:00"},
            {"name": "slotMinutes", "valuePositiveInt": 30},
            {"name": "start", "valueDate": "2030-05-01"}, {"name": "end", "valueDate": "2030-05-10"}]})
    assert_404(w, r)
    assert admin_get(w, f"/fhir/Appointment/{w.appt_b['id']}")["status"] == "booked"
    slots = admin_get(w, f"/fhir/Slot?schedule=Schedule/{w.sched_b['id']}&_summary=count")
    assert slots["total"] == 3


def test_create_for_another_organisation_is_403(world):
    w = world
    before = admin_get(w, "/fhir/Slot?_summary=count")["total"]
    cases = [
        slot_res(w.sched_b["id"], "2030-03-05T09:00:00Z", "2030-03-05T09:15:00Z"),
        {"resourceType": "Schedule", "active": True,
         "actor": [{"type": "Organization", "identifier": {"system": ODS, "value": ORG_B}}]},
        {"resourceType": "Schedule", "active": True, "actor": [{"reference": f"Practitioner/{w.doc['id']}"}]},
        appointment_res([w.slot_b3["id"]], w.pat_a["id"], "2030-03-04T12:00:00Z", "2030-03-04T12:15:00Z"),
        # A's slot, but for a patient A cannot see.
        appointment_res([w.slot_a2["id"]], w.pat_b["id"], "2030-03-04T10:00:00Z", "2030-03-04T10:15:00Z"),
        patient_res("Foreign", new_nhs_number(), managing=ORG_B),
    ]
    for res in cases:
        r = w.hub.call("POST", f"/fhir/{res['resourceType']}", w.a, res)
        assert r.status_code == 403, describe(r)
        out = r.json()
        assert out["resourceType"] == "OperationOutcome" and out["issue"][0]["code"] == "forbidden"
        no_leak(w, r)
    assert admin_get(w, "/fhir/Slot?_summary=count")["total"] == before
    assert admin_get(w, f"/fhir/Slot/{w.slot_b3['id']}")["status"] == "free"
    assert admin_get(w, f"/fhir/Slot/{w.slot_a2['id']}")["status"] == "free"


def test_own_organisation_books_end_to_end(world):
    w = world
    h = w.hub
    r = h.call("POST", "/fhir/Schedule", w.b, {
        "resourceType": "Schedule", "active": True, "actor": [{"reference": f"Practitioner/{w.doc['id']}"}],
        "extension": [{"url": BOOKING_ORG, "valueReference": {"reference": f"Organization/{w.org_b['id']}"}}]})
    assert r.status_code == 201, describe(r)
    sched = r.json()
    r = h.call("POST", "/fhir/Slot", w.b, slot_res(sched["id"], "2030-03-06T09:00:00Z", "2030-03-06T09:15:00Z"))
    assert r.status_code == 201, describe(r)
    slot = r.json()
    r = h.call("POST", "/fhir/Patient", w.b, patient_res("Bownpatient", new_nhs_number(), managing=ORG_B))
    assert r.status_code == 201, describe(r)
    pat = r.json()
    r = h.call("POST", "/fhir/Appointment", w.b,
               appointment_res([slot["id"]], pat["id"], "2030-03-06T09:00:00Z", "2030-03-06T09:15:00Z"))
    assert r.status_code == 201, describe(r)
    appt = r.json()
    assert h.call("GET", f"/fhir/Appointment/{appt['id']}", w.b).status_code == 200
    r = h.call("POST", f"/fhir/Appointment/{appt['id']}/$transition", w.b, {
        "resourceType": "Parameters", "parameter": [
            {"name": "status", "valueCode": "cancelled"},
            {"name": "reason", "valueCoding": {
                "system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason", "code": "pat"}}]})
    assert r.status_code == 200, describe(r)
    # ...and none of it is A's.
    for path in [f"/fhir/Schedule/{sched['id']}", f"/fhir/Slot/{slot['id']}", f"/fhir/Patient/{pat['id']}",
                 f"/fhir/Appointment/{appt['id']}"]:
        assert h.call("GET", path, w.a).status_code == 404


def test_patient_visible_through_an_appointment_of_the_organisation(world):
    w = world
    h = w.hub
    assert h.call("GET", f"/fhir/Patient/{w.pat_a['id']}", w.a).status_code == 200    # via A's appointment
    assert h.call("GET", f"/fhir/Patient/{w.pat_a2['id']}", w.a).status_code == 200   # via A's booking in B's slot
    assert h.call("GET", f"/fhir/Patient/{w.pat_a2['id']}", w.b).status_code == 200   # and B's slot
    assert h.call("GET", f"/fhir/Patient/{w.pat_b['id']}", w.b).status_code == 200
    assert h.call("GET", f"/fhir/Patient/{w.pat_bm['id']}", w.b).status_code == 200   # managingOrganization
    assert_404(w, h.call("GET", f"/fhir/Patient/{w.pat_bm['id']}", w.a))
    r = h.call("GET", f"/fhir/Patient?_count=500", w.a)
    assert r.status_code == 200, describe(r)
    assert {w.pat_a["id"], w.pat_a2["id"]} <= ids(r.json())
    no_leak(w, r)


# --- Bundles -------------------------------------------------------------------------------------------------------


def test_bundle_entries_follow_the_same_rules(world):
    w = world
    h = w.hub
    before = admin_get(w, f"/fhir/Appointment/{w.appt_b['id']}")
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Appointment/{w.appt_b['id']}"}},
        {"request": {"method": "GET", "url": f"Appointment/{w.appt_a['id']}"}},
        {"request": {"method": "GET", "url": "Appointment?_summary=count"}},
        {"request": {"method": "GET", "url": f"Patient?identifier={NHS_SYSTEM}|{w.nhs_b}"}},
        {"resource": dict(before, description="batch overwrite"),
         "request": {"method": "PUT", "url": f"Appointment/{w.appt_b['id']}"}},
        {"resource": slot_res(w.sched_b["id"], "2030-03-07T09:00:00Z", "2030-03-07T09:15:00Z"),
         "request": {"method": "POST", "url": "Slot"}},
        {"request": {"method": "DELETE", "url": f"Slot/{w.slot_b3['id']}"}},
    ]}
    r = h.call("POST", "/fhir", w.a, batch)
    assert r.status_code == 200, describe(r)
    statuses = [e["response"]["status"].split()[0] for e in r.json()["entry"]]
    assert statuses == ["404", "200", "200", "200", "404", "403", "404"], describe(r)
    assert r.json()["entry"][2]["resource"]["total"] == 2
    assert r.json()["entry"][3]["resource"]["total"] == 0
    no_leak(w, r)
    # A transaction reading B's appointment fails as a whole, with nothing of B in the answer.
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": slot_res(w.sched_a["id"], "2030-03-07T10:00:00Z", "2030-03-07T10:15:00Z"),
         "request": {"method": "POST", "url": "Slot"}},
        {"request": {"method": "GET", "url": f"Appointment/{w.appt_b['id']}"}}]}
    r = h.call("POST", "/fhir", w.a, tx)
    assert r.status_code == 404, describe(r)
    no_leak(w, r)
    tx["entry"][1] = {"request": {"method": "GET", "url": f"Slot?schedule=Schedule/{w.sched_b['id']}"}}
    r = h.call("POST", "/fhir", w.a, tx)
    assert r.status_code == 200, describe(r)
    assert r.json()["entry"][1]["resource"]["total"] == 0
    no_leak(w, r)
    after = admin_get(w, f"/fhir/Appointment/{w.appt_b['id']}")
    assert after["meta"]["versionId"] == before["meta"]["versionId"]
    assert admin_get(w, f"/fhir/Slot/{w.slot_b3['id']}")["meta"]["versionId"] == "1"


# --- scopes, feed, idempotency -----------------------------------------------------------------------------------------


def test_cross_org_scope_sees_everything(world):
    w = world
    h = w.hub
    r = h.call("GET", f"/fhir/Appointment/{w.appt_b['id']}", w.x)
    assert r.status_code == 200 and r.json()["description"] == SECRET_NOTE, describe(r)
    for path in ["/fhir/Appointment?_summary=count", "/fhir/Patient?_summary=count", "/fhir/Slot?_summary=count"]:
        assert h.call("GET", path, w.x).json()["total"] == admin_get(w, path)["total"]
    r = h.token_response(h.assertion("org-x"))
    assert r.json()["scope"] == "system/*.cruds cross-org"
    # A client cannot ask for what it was not granted.
    r = h.token_response(h.assertion("org-a"), scope="system/*.rs cross-org")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    assert "admin cross-org" in h.cli("clients", "list").stdout


def test_events_and_subscriptions_need_cross_org(world):
    w = world
    h = w.hub
    r = h.call("GET", "/events?after=0", w.a)
    assert r.status_code == 403, describe(r)
    assert "cross-org" in r.json()["issue"][0]["diagnostics"]
    assert "events" not in r.json()
    no_leak(w, r)
    assert h.call("GET", "/fhir/Subscription", w.a).status_code == 403
    r = h.call("POST", "/fhir/Subscription", w.a, {
        "resourceType": "Subscription", "status": "requested", "reason": "steal B's feed",
        "criteria": "Appointment?status=booked",
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "payload": "application/fhir+json"}})
    assert r.status_code == 403 and "cross-org" in r.text, describe(r)
    assert admin_get(w, "/fhir/Subscription?_summary=count")["total"] == 0
    r = h.call("GET", "/events?after=0&limit=1000", w.x)
    assert r.status_code == 200 and r.json()["events"], describe(r)


def test_idempotency_keys_are_per_client(world):
    w = world
    h = w.hub
    key = {"Idempotency-Key": "shared-key-" + uuid.uuid4().hex}
    r1 = h.call("POST", "/fhir/Slot", w.a, slot_res(w.sched_a["id"], "2030-03-08T09:00:00Z",
                                                    "2030-03-08T09:15:00Z"), headers=key)
    assert r1.status_code == 201, describe(r1)
    # B's request with the same key is its own: not a replay of A's response (and not a 422 either).
    r2 = h.call("POST", "/fhir/Slot", w.b, slot_res(w.sched_b["id"], "2030-03-08T09:00:00Z",
                                                    "2030-03-08T09:15:00Z"), headers=key)
    assert r2.status_code == 201, describe(r2)
    assert "idempotent-replayed" not in r2.headers and r2.json()["id"] != r1.json()["id"]
    assert r1.json()["id"] not in r2.text
    # A's retry replays A's response.
    r3 = h.call("POST", "/fhir/Slot", w.a, slot_res(w.sched_a["id"], "2030-03-08T09:00:00Z",
                                                    "2030-03-08T09:15:00Z"), headers=key)
    assert r3.headers.get("idempotent-replayed") == "true" and r3.json()["id"] == r1.json()["id"]


def test_set_scopes_grants_cross_org_to_new_tokens(world):
    w = world
    h = w.hub
    h.add_client("org-c", "system/*.rs", ods=ORG_A)
    old = h.token("org-c")
    assert_404(w, h.call("GET", f"/fhir/Appointment/{w.appt_b['id']}", old))
    h.cli("clients", "set-scopes", "--id", "org-c", "--scopes", "system/*.rs cross-org")
    new = h.token("org-c")
    assert h.call("GET", f"/fhir/Appointment/{w.appt_b['id']}", new).status_code == 200
    # A token issued before keeps what it had.
    assert_404(w, h.call("GET", f"/fhir/Appointment/{w.appt_b['id']}", old))
    out = h.cli("clients", "set-scopes", "--id", "org-c", "--scopes", "everything", check=False)
    assert out.returncode != 0 and "scope" in out.stderr


def test_confined_search_matching_more_than_ten_thousand_is_refused(tmp_path_factory):
    """A confined client's search is filtered before paging, so the hub scans its matches; past 10,000 it refuses
    with 400 and a clear message instead of scanning without end. A narrower search still works, and a client
    with `cross-org` (nothing to filter) pages through the same matches."""
    srv = start_server(tmp_path_factory, "orgsep-scan", auth=True)
    try:
        hub = Hub(srv, tmp_path_factory.mktemp("orgsep-scan-keys"))
        hub.keys["admin"] = (hub.admin_key, "admin-1")
        admin = hub.admin_token()
        r = hub.call("POST", "/fhir/Schedule", admin, {"resourceType": "Schedule", "active": True, "actor": [
            {"type": "Organization", "identifier": {"system": ODS, "value": ORG_A}}]})
        assert r.status_code == 201, describe(r)
        sched = r.json()["id"]
        # 2 x 20 days of 288 five-minute slots: 11,520 slots of A's schedule.
        for start, end in [("2031-01-01", "2031-01-20"), ("2031-01-21", "2031-02-09")]:
            r = hub.call("POST", f"/fhir/Schedule/{sched}/$generate-slots", admin, {
                "resourceType": "Parameters", "parameter": [
                    {"name": "daysOfWeek", "valueCode": "mon,tue,wed,thu,fri,sat,sun"},
                    {"name": "openingTime", "valueString": "00:00-24:00"},
                    {"name": "slotMinutes", "valuePositiveInt": 5},
                    {"name": "start", "valueDate": start}, {"name": "end", "valueDate": end}]})
            assert r.status_code in (200, 201), describe(r)
        assert hub.call("GET", "/fhir/Slot?_summary=count", admin).json()["total"] == 11520
        hub.add_client("scan-a", "system/*.rs", ods=ORG_A)
        a = hub.token("scan-a")
        for path in ["/fhir/Slot?status=free", "/fhir/Slot?_summary=count", f"/fhir/Slot?schedule=Schedule/{sched}"]:
            r = hub.call("GET", path, a)
            assert r.status_code == 400, describe(r)
            issue = r.json()["issue"][0]
            assert issue["code"] == "too-costly" and "10000" in issue["diagnostics"], issue
        r = hub.call("GET", f"/fhir/Slot?schedule=Schedule/{sched}&start=ge2031-01-02T00:00:00Z"
                            f"&start=lt2031-01-03T00:00:00Z&_summary=count", a)
        assert r.status_code == 200 and r.json()["total"] == 288, describe(r)
        r = hub.call("GET", "/fhir/Slot?status=free&_count=50", admin)
        assert r.status_code == 200 and len(r.json()["entry"]) == 50, describe(r)
    finally:
        stop_server(srv)
