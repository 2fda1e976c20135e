"""Search through fhirpy: identifier, string, date prefixes, paging with next links, counts, sort, _include."""

import datetime
from urllib.parse import parse_qs, urlparse

import pytest

from conftest import describe
from helpers import (
    NHS_SYSTEM,
    appointment,
    fields,
    new_nhs_number,
    patient,
    practitioner,
    schedule,
    slot,
    unique_family,
)


@pytest.fixture(scope="module")
def seven(client):
    """Seven Patients sharing one surname, with distinct birth dates."""
    family = unique_family()
    dates = ["1950-06-01", "1961-02-03", "1975-12-31", "1990-01-01", "1999-07-07", "2005-05-05", "2010-12-31"]
    ids = []
    for d in dates:
        p = client.resource("Patient", **fields(patient(family=family, birth_date=d)))
        p.save()
        ids.append(p.id)
    return family, dict(zip(ids, dates))


def test_identifier_search(client):
    nhs = new_nhs_number()
    p = client.resource("Patient", **fields(patient(nhs)))
    p.save()
    found = client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}").fetch_all()
    assert [r.id for r in found] == [p.id]
    # Code alone, and system with another code / another system with the code.
    assert [r.id for r in client.resources("Patient").search(identifier=nhs).fetch_all()] == [p.id]
    assert client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{new_nhs_number()}").fetch_all() == []
    assert client.resources("Patient").search(identifier=f"https://example.org/other|{nhs}").fetch_all() == []


def test_identifier_search_well_known_number(client, raw):
    # One active Patient per NHS number: the search finds exactly it, and a second registration is refused
    # with a 409 that points at the existing record.
    p = client.resource("Patient", **fields(patient("9000000009")))
    p.save()
    found = client.resources("Patient").search(identifier="https://fhir.nhs.uk/Id/nhs-number|9000000009").fetch_all()
    assert [r.id for r in found] == [p.id]
    again = raw.post("Patient", patient("9000000009"))
    assert again.status_code == 409, again.text
    assert f"Patient/{p.id}" in again.text


def test_family_search(client, seven):
    family, by_id = seven
    found = client.resources("Patient").search(family=family).fetch_all()
    assert {r.id for r in found} == set(by_id)
    # String search is case-insensitive and matches a prefix.
    assert {r.id for r in client.resources("Patient").search(family=family.upper()[:8]).fetch_all()} >= set(by_id)
    assert {r.id for r in client.resources("Patient").search(name=family.lower()).fetch_all()} == set(by_id)


def test_family_exact(client, seven):
    family, by_id = seven
    assert {r.id for r in client.resources("Patient").search(family__exact=family).fetch_all()} == set(by_id)
    # :exact matches the whole string, including case.
    assert client.resources("Patient").search(family__exact=family[:-1]).fetch_all() == []
    assert client.resources("Patient").search(family__exact=family.upper()).fetch_all() == []


def test_birthdate_prefixes(client, seven):
    family, by_id = seven
    people = client.resources("Patient").search(family=family)

    def ids(searchset):
        return {r.id for r in searchset.fetch_all()}

    assert ids(people.search(birthdate__ge="1990-01-01")) == {i for i, d in by_id.items() if d >= "1990-01-01"}
    assert ids(people.search(birthdate__lt="1990-01-01")) == {i for i, d in by_id.items() if d < "1990-01-01"}
    assert ids(people.search(birthdate__gt="1990-01-01")) == {i for i, d in by_id.items() if d > "1990-01-01"}
    assert ids(people.search(birthdate__le=datetime.date(1975, 12, 31))) == {
        i for i, d in by_id.items() if d <= "1975-12-31"
    }
    assert ids(people.search(birthdate="1990")) == {i for i, d in by_id.items() if d.startswith("1990")}
    assert ids(people.search(birthdate="1990-01-01")) == {i for i, d in by_id.items() if d == "1990-01-01"}
    # Two prefixes on one parameter: a range (AND).
    assert ids(people.search(birthdate=["ge1960-01-01", "lt2000-01-01"])) == {
        i for i, d in by_id.items() if "1960-01-01" <= d < "2000-01-01"
    }


def test_paging_follows_next_links(client, raw, seven):
    family, by_id = seven
    searchset = client.resources("Patient").search(family=family).limit(3)
    first_page = searchset.fetch()
    assert len(first_page) == 3
    everything = searchset.fetch_all()
    assert len(everything) == 7
    assert {r.id for r in everything} == set(by_id)

    bundle = raw.get("Patient", params={"family": family, "_count": 3}).json()
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert "self" in links and "next" in links, bundle["link"]
    q = parse_qs(urlparse(links["next"]).query)
    assert q["_count"] == ["3"] and q["family"] == [family], links["next"]
    pages = raw.all_pages(f"Patient?family={family}&_count=3")
    assert [len(p.get("entry", [])) for p in pages] == [3, 3, 1]
    assert "next" not in {link["relation"] for link in pages[-1]["link"]}


def test_count_through_fhirpy(client, seven):
    family, by_id = seven
    # fhirpy's count() asks for _count=0 (plus its own _totalMethod hint) and reads Bundle.total.
    assert client.resources("Patient").search(family=family).count() == 7


def test_summary_count_and_total(raw, seven):
    family, _ = seven
    r = raw.get("Patient", params={"family": family, "_summary": "count"})
    assert r.status_code == 200, describe(r)
    assert r.json()["total"] == 7
    assert "entry" not in r.json() or r.json()["entry"] == []

    r = raw.get("Patient", params={"family": family, "_total": "accurate", "_count": 3})
    assert r.status_code == 200, describe(r)
    assert r.json()["total"] == 7
    assert len(r.json()["entry"]) == 3

    # FHIR R4: _count=0 is the same as _summary=count.
    r = raw.get("Patient", params={"family": family, "_count": 0})
    assert r.status_code == 200, describe(r)
    assert r.json().get("total") == 7, describe(r)
    assert r.json().get("entry", []) == []


def test_sort(client, seven):
    family, by_id = seven
    people = client.resources("Patient").search(family=family)
    ascending = [r["birthDate"] for r in people.sort("birthdate").fetch_all()]
    assert ascending == sorted(by_id.values())
    descending = [r["birthDate"] for r in people.sort("-birthdate").fetch_all()]
    assert descending == sorted(by_id.values(), reverse=True)
    # Paging keeps the order across pages.
    assert [r["birthDate"] for r in people.sort("birthdate").limit(2).fetch_all()] == sorted(by_id.values())
    by_updated = [r["meta"]["lastUpdated"] for r in people.sort("_lastUpdated").fetch_all()]
    assert len(by_updated) == 7
    assert by_updated == sorted(by_updated, key=parse_instant)
    newest_first = [r["meta"]["lastUpdated"] for r in people.sort("-_lastUpdated").fetch_all()]
    assert newest_first == sorted(newest_first, key=parse_instant, reverse=True)


def parse_instant(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_id_and_last_updated(client, raw, seven):
    family, by_id = seven
    ids = list(by_id)
    found = client.resources("Patient").search(_id=f"{ids[0]},{ids[3]}").fetch_all()
    assert {r.id for r in found} == {ids[0], ids[3]}

    first = raw.get(f"Patient/{ids[0]}").json()["meta"]["lastUpdated"]
    last = raw.get(f"Patient/{ids[-1]}").json()["meta"]["lastUpdated"]
    people = client.resources("Patient").search(family=family)
    assert {r.id for r in people.search(_lastUpdated__ge=first).fetch_all()} == set(ids)
    assert {r.id for r in people.search(_lastUpdated__gt=last).fetch_all()} == set()
    assert {r.id for r in people.search(_lastUpdated__lt="2000-01-01").fetch_all()} == set()


@pytest.fixture(scope="module")
def booking(client):
    """Practitioner <- Schedule <- Slot <- Appointment -> Patient."""
    doc = client.resource("Practitioner", **fields(practitioner()))
    doc.save()
    pat = client.resource("Patient", **fields(patient()))
    pat.save()
    sch = client.resource("Schedule", **fields(schedule(f"Practitioner/{doc.id}")))
    sch.save()
    slt = client.resource("Slot", **fields(slot(f"Schedule/{sch.id}")))
    slt.save()
    appt = client.resource(
        "Appointment", **fields(appointment(f"Patient/{pat.id}", f"Practitioner/{doc.id}", f"Slot/{slt.id}"))
    )
    appt.save()
    return {"practitioner": doc, "patient": pat, "schedule": sch, "slot": slt, "appointment": appt}


def entry_keys(bundle):
    return sorted(
        (e["resource"]["resourceType"], e["resource"]["id"], e.get("search", {}).get("mode")) for e in bundle["entry"]
    )


def test_include_appointment_patient(client, booking):
    appt, pat = booking["appointment"], booking["patient"]
    bundle = client.resources("Appointment").search(_id=appt.id).include("Appointment", "patient").fetch_raw()
    assert entry_keys(bundle) == sorted([("Appointment", appt.id, "match"), ("Patient", pat.id, "include")])
    # fetch() keeps only the searched type.
    assert [r.id for r in client.resources("Appointment").search(_id=appt.id).include("Appointment", "patient").fetch()] == [appt.id]


def test_include_slot_schedule(client, booking):
    slt, sch = booking["slot"], booking["schedule"]
    bundle = client.resources("Slot").search(_id=slt.id).include("Slot", "schedule").fetch_raw()
    assert entry_keys(bundle) == sorted([("Slot", slt.id, "match"), ("Schedule", sch.id, "include")])


def test_include_schedule_actor(client, booking):
    sch, doc = booking["schedule"], booking["practitioner"]
    bundle = client.resources("Schedule").search(_id=sch.id).include("Schedule", "actor").fetch_raw()
    assert entry_keys(bundle) == sorted([("Schedule", sch.id, "match"), ("Practitioner", doc.id, "include")])


def test_reference_searches(client, booking):
    appt, pat, slt, sch, doc = (booking[k] for k in ("appointment", "patient", "slot", "schedule", "practitioner"))
    assert [r.id for r in client.resources("Appointment").search(patient=pat).fetch_all()] == [appt.id]
    assert [r.id for r in client.resources("Appointment").search(patient=pat.id).fetch_all()] == [appt.id]
    assert [r.id for r in client.resources("Slot").search(schedule=f"Schedule/{sch.id}").fetch_all()] == [slt.id]
    assert [r.id for r in client.resources("Schedule").search(actor=f"Practitioner/{doc.id}").fetch_all()] == [sch.id]
