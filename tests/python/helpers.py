"""Test data for the Carebridge FHIR suite: valid NHS numbers and small UK Core resources."""

import random
import string
import threading
import uuid

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

# The resource types the hub serves.
TYPES = [
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "HealthcareService",
    "Schedule",
    "Slot",
    "Appointment",
]

# Valid (modulus 11) NHS numbers from the NHS test range, for readable tests.
KNOWN_VALID = ["9000000009", "9000000025", "9000000033", "9111231130", "9990548609"]


def nhs_check_digit(nine: str):
    """Modulus 11 check digit of the first nine digits, or None when it would be 10 (no valid number)."""
    total = sum(int(d) * (10 - i) for i, d in enumerate(nine))
    check = 11 - total % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


def is_valid_nhs_number(s: str) -> bool:
    if len(s) != 10 or not s.isdigit() or len(set(s)) == 1:
        return False
    return nhs_check_digit(s[:9]) == int(s[9])


_used = set(KNOWN_VALID)
_lock = threading.Lock()
_rng = random.Random()


def new_nhs_number() -> str:
    """A fresh valid NHS number (starting with 9, never handed out twice in this process)."""
    while True:
        nine = "9" + "".join(_rng.choice(string.digits) for _ in range(8))
        check = nhs_check_digit(nine)
        if check is None:
            continue
        n = f"{nine}{check}"
        if len(set(n)) == 1:
            continue
        with _lock:
            if n in _used:
                continue
            _used.add(n)
        return n


def unique_family() -> str:
    """A surname no other test uses (letters only, so string search normalisation cannot merge two)."""
    letters = "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:10])
    return "Zz" + letters


def nhs_identifier(nhs: str) -> dict:
    return {"system": NHS_SYSTEM, "value": nhs}


def patient(nhs=None, family=None, given="Test", birth_date="1980-01-01", gender="female") -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [nhs_identifier(nhs or new_nhs_number())],
        "name": [{"use": "official", "family": family or unique_family(), "given": [given]}],
        "gender": gender,
        "birthDate": birth_date,
    }


def practitioner(family=None) -> dict:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "https://fhir.hl7.org.uk/Id/gmp-number", "value": "G" + str(_rng.randrange(10**6, 10**7))}],
        "name": [{"family": family or unique_family(), "given": ["Doc"], "prefix": ["Dr"]}],
    }


def schedule(actor_ref: str) -> dict:
    return {
        "resourceType": "Schedule",
        "active": True,
        "actor": [{"reference": actor_ref}],
        "planningHorizon": {"start": "2030-01-01T09:00:00Z", "end": "2030-01-31T17:00:00Z"},
    }


def slot(schedule_ref: str, start="2030-01-10T09:00:00Z", end="2030-01-10T09:15:00Z") -> dict:
    return {
        "resourceType": "Slot",
        "schedule": {"reference": schedule_ref},
        "status": "free",
        "start": start,
        "end": end,
    }


def appointment(patient_ref: str, practitioner_ref: str, slot_ref: str) -> dict:
    return {
        "resourceType": "Appointment",
        "status": "booked",
        "start": "2030-01-10T09:00:00Z",
        "end": "2030-01-10T09:15:00Z",
        "slot": [{"reference": slot_ref}],
        "participant": [
            {"actor": {"reference": patient_ref}, "status": "accepted"},
            {"actor": {"reference": practitioner_ref}, "status": "accepted"},
        ],
    }


def without(resource: dict, *keys) -> dict:
    return {k: v for k, v in resource.items() if k not in keys}


def fields(resource: dict) -> dict:
    """kwargs for fhirpy's client.resource(type, **fields)."""
    return without(resource, "resourceType")
