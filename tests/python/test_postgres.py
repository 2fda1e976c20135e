"""Carebridge on PostgreSQL, with two `serve` processes sharing one database (the test script starts a throwaway
cluster and passes its URL in CAREBRIDGE_TEST_DATABASE_URL; without it these tests are skipped with that reason).

- `carebridge migrate` and the refusal of an unmigrated database;
- 64 concurrent bookings of one slot spread over two processes: exactly one wins, 63 get 409;
- webhook delivery with two processes, one killed with kill -9 mid-delivery: the other takes over (after the
  dispatcher lease), every event arrives, per-subject order holds, and nothing is delivered as two different
  deliveries (a retry of the attempt in flight at the kill carries the same webhook-id).
"""

import glob
import os
import shutil
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import REPO, start_server, stop_server
from helpers import new_nhs_number, patient, practitioner, schedule, slot
from test_delivery import (  # noqa: F401  (fixtures)
    Hub,
    assert_clean,
    burst,
    expected_keys,
    flags,
    receivers,
    wait_quiet,
    wait_until,
)

SERVER_URL = os.environ.get("CAREBRIDGE_TEST_DATABASE_URL")
pytestmark = pytest.mark.skipif(not SERVER_URL, reason="CAREBRIDGE_TEST_DATABASE_URL not set (no PostgreSQL server)")
FHIR_JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}


def _binary() -> str:
    return str(os.environ.get("CAREBRIDGE_BIN") or REPO / "target" / "debug" / "carebridge")


def _psql() -> str:
    found = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))), None)
    if not found:
        pytest.skip("psql not found")
    return found


def _with_db(url: str, name: str) -> str:
    """The server URL with its database replaced by `name` (URL or key=value forms as the test script gives)."""
    if "://" in url:
        head, _, tail = url.partition("://")
        rest, q, query = tail.partition("?")
        hostpart = rest.split("/", 1)[0]
        return f"{head}://{hostpart}/{name}" + (q + query if q else "")
    return url + f" dbname={name}"


@pytest.fixture
def database():
    name = "cb_py_" + uuid.uuid4().hex[:10]
    subprocess.run([_psql(), SERVER_URL, "-q", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
    url = _with_db(SERVER_URL, name)
    yield url
    subprocess.run([_psql(), SERVER_URL, "-q", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                   capture_output=True)


def test_migrate_and_unmigrated_refusal(database, tmp_path):
    out = subprocess.run([_binary(), "serve", "--database-url", database, "--http", "127.0.0.1:0",
                          "--data-dir", str(tmp_path)],
                         capture_output=True, timeout=30, env={**os.environ, "CAREBRIDGE_AUTH": "none"})
    assert out.returncode != 0
    assert b"carebridge migrate" in out.stderr, out.stderr
    first = subprocess.run([_binary(), "migrate", "--database-url", database], capture_output=True, timeout=60)
    assert first.returncode == 0 and b"applied" in first.stdout, first.stderr
    again = subprocess.run([_binary(), "migrate", "--database-url", database], capture_output=True, timeout=60)
    assert again.returncode == 0 and b"current" in again.stdout


def _migrated(database):
    subprocess.run([_binary(), "migrate", "--database-url", database], check=True, capture_output=True, timeout=60)


def _post(base, rtype, body):
    r = requests.post(f"{base}/fhir/{rtype}", json=body, headers=FHIR_JSON, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def test_64_bookings_of_one_slot_over_two_processes(database, tmp_path_factory):
    _migrated(database)
    a = start_server(tmp_path_factory, "pg-a", extra_args=["--database-url", database])
    b = start_server(tmp_path_factory, "pg-b", extra_args=["--database-url", database])
    try:
        pat = _post(a.base_url, "Patient", patient(new_nhs_number()))
        doc = _post(b.base_url, "Practitioner", practitioner())
        sch = _post(a.base_url, "Schedule", schedule(f"Practitioner/{doc['id']}"))
        sl = _post(b.base_url, "Slot", slot(f"Schedule/{sch['id']}"))
        # Both processes see what the other wrote.
        assert requests.get(f"{a.base_url}/fhir/Slot/{sl['id']}", timeout=30).status_code == 200

        def book(i):
            base = (a if i % 2 else b).base_url
            body = {
                "resourceType": "Appointment",
                "status": "booked",
                "start": sl["start"],
                "end": sl["end"],
                "slot": [{"reference": f"Slot/{sl['id']}"}],
                "participant": [
                    {"actor": {"reference": f"Patient/{pat['id']}"}, "status": "accepted"},
                    {"actor": {"reference": f"Practitioner/{doc['id']}"}, "status": "accepted"},
                ],
            }
            return requests.post(f"{base}/fhir/Appointment", json=body, headers=FHIR_JSON, timeout=60).status_code

        with ThreadPoolExecutor(max_workers=32) as pool:
            codes = list(pool.map(book, range(64)))
        assert codes.count(201) == 1, codes
        assert codes.count(409) == 63, codes
        found = requests.get(f"{a.base_url}/fhir/Appointment?slot=Slot/{sl['id']}", headers=FHIR_JSON,
                             timeout=30).json()
        assert len(found.get("entry", [])) == 1
        assert requests.get(f"{b.base_url}/fhir/Slot/{sl['id']}", timeout=30).json()["status"] == "busy"
    finally:
        stop_server(a)
        stop_server(b)


def test_delivery_survives_kill_9_of_one_process(database, tmp_path_factory, receivers):
    _migrated(database)
    args = flags(max_attempts=60) + ["--database-url", database]
    started = []

    def hub(name):
        srv = start_server(tmp_path_factory, name, extra_args=args)
        started.append(srv)
        return Hub(srv)

    try:
        first = hub("pg-deliver-a")
        second = hub("pg-deliver-b")
        rc = receivers()
        rc.behave(delay_seconds=0.03)
        sub = first.subscribe(rc.url(), rc.secret)
        patients = [first.new_patient() for _ in range(4)]
        subjects = [f"Patient/{p['id']}" for p in patients]
        burst(first, patients, 29, threads=4)
        total = 4 * 30
        rc.wait_for(lambda r: len(r.acked_keys()) >= total * 0.25, 30, "some deliveries before the kill")
        # Kill the process that started first (it holds the dispatcher lease); the other must take over.
        first.srv.proc.kill()
        first.srv.proc.wait()
        assert len(rc.acked_keys()) < total, "the kill came after everything was delivered"
        want = expected_keys(second, subjects)
        assert len(want) == total
        rc.wait_for(lambda r: r.acked_keys() >= want, 60, "every event after the failover")
        wait_until(lambda: second.states(sub["id"]) == {"pending": 0, "delivered": total, "dead": 0}, 15,
                   "all delivered")
        wait_quiet(rc)
        assert_clean(rc, hub=second)
        rs = rc.snapshot()
        assert {(r.subject, r.sequence) for r in rs} == want
        # One webhook-id per event: a repeat after the kill is the same delivery, never a second one.
        ids = {}
        for r in rs:
            ids.setdefault((r.subject, r.sequence), set()).add(r.webhook_id)
        assert all(len(v) == 1 for v in ids.values()), "an event was delivered under two webhook-ids"
    finally:
        for srv in started:
            if srv.proc.poll() is None:
                stop_server(srv)


def test_hl7_patients_over_mllp_on_two_processes(database, tmp_path_factory):
    """HL7 ADT on PostgreSQL, where a batch's patient lookups are answered ahead: A28s and later A31s for 20
    patients sent ahead on one connection are all applied, in order (each patient at version 2); an A28 for the
    same NHS numbers sent to the other process finds them rather than creating a second patient; and the
    same new patient registered at once through both processes exists once."""
    from test_hl7_mllp import a28, a31, ack_fields, patients_with, send_ahead

    _migrated(database)
    a = start_server(tmp_path_factory, "pg-hl7-a", extra_args=["--database-url", database, "--mllp", "127.0.0.1:0"])
    b = start_server(tmp_path_factory, "pg-hl7-b", extra_args=["--database-url", database, "--mllp", "127.0.0.1:0"])
    try:
        numbers = [new_nhs_number() for _ in range(20)]
        sent = []
        for i, nhs in enumerate(numbers):
            sent.append((f"PGA{i}", a28(f"PGA{i}", nhs, family="First")))
            sent.append((f"PGB{i}", a31(f"PGB{i}", nhs, family="Second")))
        acks = send_ahead(a, sent, timeout=60)
        assert [ack_fields(x)[1] for x in acks] == [c for c, _ in sent]
        assert [ack_fields(x)[0] for x in acks] == ["AA"] * len(sent)

        again = [(f"PGC{i}", a28(f"PGC{i}", nhs, family="Second")) for i, nhs in enumerate(numbers)]
        acks = send_ahead(b, again, timeout=60)
        assert [ack_fields(x)[0] for x in acks] == ["AA"] * len(again)
        for nhs in numbers:
            found = patients_with(a, nhs)
            assert len(found) == 1, (nhs, found)
            assert found[0]["resource"]["name"][0]["family"] == "Second"

        twice = new_nhs_number()
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda p: send_ahead(p[0], [(p[1], a28(p[1], twice))], timeout=60),
                                    [(a, "PGD1"), (b, "PGD2")]))
        assert [ack_fields(r[0])[0] for r in results] == ["AA", "AA"]
        assert len(patients_with(b, twice)) == 1
    finally:
        stop_server(a)
        stop_server(b)
