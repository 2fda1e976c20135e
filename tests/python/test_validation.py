"""Validation: UK Core rules refuse bad resources with an OperationOutcome that says where; $validate."""

import pytest
from fhirpy.base.exceptions import OperationOutcome as FhirpyOperationOutcome

from conftest import describe, error_issues, issues_with_expression
from helpers import KNOWN_VALID, NHS_SYSTEM, fields, is_valid_nhs_number, new_nhs_number, nhs_check_digit, patient


def test_helper_nhs_numbers():
    for n in KNOWN_VALID:
        assert is_valid_nhs_number(n), n
    assert not is_valid_nhs_number("9000000001")
    assert not is_valid_nhs_number("1111111111"), "repdigits are refused even though 1111111111 passes modulus 11"
    assert nhs_check_digit("111111111") == 1
    for _ in range(100):
        assert is_valid_nhs_number(new_nhs_number())


def search_count(client, nhs):
    return len(client.resources("Patient").search(identifier=f"{NHS_SYSTEM}|{nhs}").fetch_all())


@pytest.mark.parametrize("bad", ["9000000001", "1111111111", "900000000", "90000000090", "900000000X"])
def test_invalid_nhs_number_is_refused_with_expression(raw, client, bad):
    r = raw.post("Patient", patient(bad))
    assert r.status_code == 422, describe(r)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    located = issues_with_expression(outcome, "Patient.identifier")
    assert located, f"no error issue with an expression on Patient.identifier: {outcome}"
    assert search_count(client, bad) == 0


def test_invalid_nhs_number_through_fhirpy(client):
    p = client.resource("Patient", **fields(patient("9000000001")))
    with pytest.raises(FhirpyOperationOutcome) as exc:
        p.save()
    outcome = exc.value.resource
    assert issues_with_expression(outcome, "Patient.identifier"), outcome
    assert not p.id


def test_invalid_nhs_number_on_update_is_refused(raw):
    p = raw.create(patient())
    p["identifier"][0]["value"] = "9000000001"
    r = raw.put(f"Patient/{p['id']}", p)
    assert r.status_code == 422, describe(r)
    assert issues_with_expression(r.json(), "Patient.identifier"), describe(r)
    assert raw.get(f"Patient/{p['id']}").headers["ETag"] == 'W/"1"'


def test_unknown_element_is_refused(raw):
    body = patient()
    body["favouriteColour"] = "blue"
    r = raw.post("Patient", body)
    assert r.status_code == 422, describe(r)
    assert issues_with_expression(r.json(), "Patient.favouriteColour"), describe(r)


def test_every_problem_is_reported(raw):
    body = patient("9000000001")
    body["favouriteColour"] = "blue"
    body["gender"] = "not-a-gender"
    r = raw.post("Patient", body)
    assert r.status_code == 422, describe(r)
    outcome = r.json()
    for where in ("Patient.identifier", "Patient.favouriteColour", "Patient.gender"):
        assert issues_with_expression(outcome, where), f"nothing reported at {where}: {outcome}"


def test_malformed_json_is_400(raw):
    r = raw.post("Patient", b'{"resourceType": "Patient", ')
    assert r.status_code == 400, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_wrong_resource_type_for_endpoint(raw):
    r = raw.post("Patient", {"resourceType": "Practitioner", "name": [{"family": "Who"}]})
    assert r.status_code in (400, 422), describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"


def test_validate_operation(raw, client):
    bad = patient("9000000001")
    r = raw.post("Patient/$validate", bad)
    assert r.status_code == 200, describe(r)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert issues_with_expression(outcome, "Patient.identifier"), outcome
    assert search_count(client, "9000000001") == 0, "$validate must not store anything"

    good_nhs = new_nhs_number()
    r = raw.post("Patient/$validate", patient(good_nhs))
    assert r.status_code == 200, describe(r)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert error_issues(r.json()) == [], r.json()
    assert search_count(client, good_nhs) == 0, "$validate must not store anything"

    # The Parameters form.
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": bad}]}
    r = raw.post("Patient/$validate", params)
    assert r.status_code == 200, describe(r)
    assert issues_with_expression(r.json(), "Patient.identifier"), r.json()


def test_validate_through_fhirpy(client):
    assert client.resource("Patient", **fields(patient())).is_valid()
    assert not client.resource("Patient", **fields(patient("1111111111"))).is_valid()
    with pytest.raises(FhirpyOperationOutcome):
        client.resource("Patient", **fields(patient("9000000001"))).is_valid(raise_exception=True)
