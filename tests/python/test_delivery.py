"""Event delivery end to end: Subscriptions (rest-hook) delivered to a real webhook receiver (receiver.py),
verified with the Standard Webhooks library and parsed with the CloudEvents SDK; retries, per-subject order,
dead letters and $replay, the polling feed, and a kill -9 of the hub mid-delivery.

Every test runs its own hub (start_server) with fast delivery settings, so retries take milliseconds.
"""

import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import helpers
from conftest import FHIR_JSON, Raw, describe, start_server, stop_server
from receiver import (
    Receiver,
    duplicate_id_violations,
    first_receipt_order_violations,
    new_secret,
    order_violations,
)

SECRET_EXT = "urn:carebridge:subscription-signing-secret"
CE_JSON = "application/cloudevents+json"

FAST = [
    "--delivery-base-delay-ms", "20",
    "--delivery-max-delay", "1",
    "--delivery-timeout", "1",
    "--delivery-max-attempts", "6",
]


def flags(**over) -> list:
    """FAST with some flags replaced: flags(max_attempts=30)."""
    out = list(FAST)
    for k, v in over.items():
        name = "--delivery-" + k.replace("_", "-")
        if name in out:
            out[out.index(name) + 1] = str(v)
        else:
            out += [name, str(v)]
    return out


# -- a hub per test --------------------------------------------------------------------------------------------


class Hub:
    def __init__(self, srv):
        self.srv = srv
        self.base = srv.base_url
        self.raw = Raw(srv.base_url + "/fhir")

    def log(self):
        return self.srv.log()

    # FHIR writes ---------------------------------------------------------------------------------------------

    def subscribe(self, endpoint, secret, criteria="Patient", payload=CE_JSON, headers=None) -> dict:
        channel = {"type": "rest-hook", "endpoint": endpoint}
        if payload:
            channel["payload"] = payload
        if headers:
            channel["header"] = headers
        sub = {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "carebridge delivery test",
            "criteria": criteria,
            "channel": channel,
            "extension": [{"url": SECRET_EXT, "valueString": secret}],
        }
        created = self.raw.create(sub)
        assert created["status"] == "active", created
        return created

    def new_patient(self, **kw) -> dict:
        return self.raw.create(helpers.patient(**kw))

    def update(self, resource: dict, **changes) -> dict:
        body = {k: v for k, v in resource.items() if k != "meta"}
        body.update(changes)
        r = self.raw.put(f"{body['resourceType']}/{body['id']}", body)
        assert r.status_code == 200, describe(r)
        return r.json()

    def rename(self, patient: dict, given: str, family=None) -> dict:
        name = dict(patient["name"][0])
        name["given"] = [given]
        if family:
            name["family"] = family
        return self.update(patient, name=[name])

    # Event endpoints -------------------------------------------------------------------------------------------

    def events(self, **params) -> dict:
        r = requests.get(self.base + "/events", params=params, timeout=30)
        assert r.status_code == 200, describe(r)
        assert r.headers["content-type"].startswith("application/json"), describe(r)
        return r.json()

    def all_events(self, **params) -> list:
        out, after = [], 0
        for _ in range(1000):
            page = self.events(after=after, limit=1000, **params)
            if not page["events"]:
                return out
            out += page["events"]
            after = page["next"]
        raise AssertionError("more than 1000 pages of events")

    def deliveries(self, subscription=None, state=None) -> list:
        out, after = [], 0
        while True:
            params = {"after": after, "limit": 1000}
            if subscription:
                params["subscription"] = subscription
            if state:
                params["state"] = state
            r = requests.get(self.base + "/admin/deliveries", params=params, timeout=30)
            assert r.status_code == 200, describe(r)
            page = r.json()["deliveries"]
            out += page
            if len(page) < 1000:
                return out
            after = page[-1]["event"]

    def states(self, subscription) -> dict:
        counts = {"pending": 0, "delivered": 0, "dead": 0}
        for d in self.deliveries(subscription):
            counts[d["state"]] += 1
        return counts

    def metrics(self) -> dict:
        r = requests.get(self.base + "/metrics", timeout=30)
        assert r.status_code == 200, describe(r)
        out = {}
        for line in r.text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            assert m, f"not a Prometheus sample line: {line!r}"
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
        return out

    def replay(self, sub_id, **param) -> requests.Response:
        (name, value), = param.items()
        kind = {"deadLetters": "valueBoolean", "event": "valueInteger", "sequence": "valueInteger",
                "since": "valueInstant"}[name]
        body = {"resourceType": "Parameters", "parameter": [{"name": name, kind: value}]}
        return self.raw.post(f"Subscription/{sub_id}/$replay", body)

    def subscription(self, sub_id) -> dict:
        r = self.raw.get(f"Subscription/{sub_id}")
        assert r.status_code == 200, describe(r)
        return r.json()


def metric(ms: dict, name: str, **labels) -> float:
    return ms.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def hubs(tmp_path_factory):
    """start(name, extra_args, data_dir=None) -> Hub; every hub still running is stopped (SIGTERM, exit 0) at
    the end of the test. A hub the test killed is left alone."""
    started = []

    def start(name, extra_args, data_dir=None):
        srv = start_server(tmp_path_factory, name, extra_args=extra_args, data_dir=data_dir)
        started.append(srv)
        return Hub(srv)

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            stop_server(srv)


@pytest.fixture
def receivers():
    """new(seed=None) -> a started Receiver with a fresh secret; all stopped at the end."""
    made = []

    def new(seed=None):
        rc = Receiver(new_secret(), seed=seed).start()
        made.append(rc)
        return rc

    yield new
    for rc in made:
        rc.stop()


def wait_until(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_quiet(rc: Receiver, timeout=5):
    """Until the receiver handles no request (hung ones included)."""
    rc.wait_for(lambda r: r.inflight == 0, timeout, "the receiver to finish its requests")


def expected_keys(hub: Hub, subjects) -> set:
    """(subject, sequence) of every event of these subjects, from the hub's own feed."""
    keys = set()
    for s in subjects:
        for e in hub.all_events(subject=s):
            keys.add((e["subject"], int(e["sequence"])))
    return keys


def assert_clean(rc: Receiver, path=None, hub=None, since_arrival=0):
    """No bad request, per-subject order kept (among requests from arrival number `since_arrival` on: a dead
    letter legitimately lets later events of its subject overtake it), one webhook-id per event."""
    rs = rc.snapshot(path)
    log = f"\nhub log:\n{hub.log()}" if hub else ""
    assert not rc.errors, "receiver found bad requests:\n" + "\n".join(rc.errors[:20]) + log
    recent = [r for r in rs if r.arrival >= since_arrival]
    v = order_violations(recent) + first_receipt_order_violations(recent)
    assert not v, f"per-subject order broken ({len(v)}):\n" + "\n".join(v[:20]) + log
    d = duplicate_id_violations(rs)
    assert not d, "duplicates with different webhook-ids:\n" + "\n".join(d[:20]) + log


# -- 1. happy path, the three payloads ---------------------------------------------------------------------------


def test_happy_path_three_payloads(hubs, receivers):
    hub = hubs("delivery-happy", FAST)
    ce_rc, bundle_rc, id_rc = receivers(), receivers(), receivers()
    # The bundle receiver is a little slow, so later events are queued while it handles the first one.
    bundle_rc.behave(delay_seconds=0.3)
    custom = ["X-Carebridge-Test: hello world", "Authorization: Bearer t0k3n"]
    subs = {
        "ce": hub.subscribe(ce_rc.url(), ce_rc.secret, payload=CE_JSON, headers=custom),
        "bundle": hub.subscribe(bundle_rc.url(), bundle_rc.secret, payload=FHIR_JSON, headers=custom),
        "id": hub.subscribe(id_rc.url(), id_rc.secret, payload=None, headers=custom),
    }

    # The secret is write-only: not in the create response, a read, a search or the history.
    secrets = [ce_rc.secret, bundle_rc.secret, id_rc.secret]
    for s in subs.values():
        for path in (f"Subscription/{s['id']}", f"Subscription/{s['id']}/_history", "Subscription",
                     f"Subscription/{s['id']}/_history/1"):
            r = hub.raw.get(path)
            assert r.status_code == 200, describe(r)
            for secret in secrets:
                assert secret not in r.text and secret[6:] not in r.text, f"secret returned by GET {path}: {r.text}"
            assert SECRET_EXT not in r.text, describe(r)
        assert all(secret not in json.dumps(s) for secret in secrets), s
    # ... and required.
    nosecret = hub.raw.post("Subscription", {
        "resourceType": "Subscription", "status": "requested", "reason": "x", "criteria": "Patient",
        "channel": {"type": "rest-hook", "endpoint": ce_rc.url()}})
    assert 400 <= nosecret.status_code < 500, describe(nosecret)

    p = hub.new_patient()
    p2 = hub.rename(p, "Second")
    r = hub.raw.delete(f"Patient/{p['id']}")
    assert r.status_code in (200, 204), describe(r)
    subject = f"Patient/{p['id']}"
    feed = hub.all_events(subject=subject)
    assert [int(e["sequence"]) for e in feed] == [1, 2, 3], feed
    assert [e["type"] for e in feed] == [
        "carebridge.patient.registered.v1", "carebridge.patient.updated.v1", "carebridge.patient.deleted.v1"]
    versions = {1: p, 2: p2}

    for rc in (ce_rc, bundle_rc, id_rc):
        rc.wait_for(lambda r: len(r.acked()) >= 3, 10, f"3 deliveries at {rc.url()}")
    time.sleep(0.3)  # nothing more should arrive
    for rc in (ce_rc, bundle_rc, id_rc):
        assert not rc.errors, rc.errors
        acked = rc.acked()
        assert len(acked) == 3, [(a.webhook_id, a.subject) for a in acked]
        assert [a.webhook_id for a in acked] == [e["id"] for e in feed], "delivered in subject order, once each"
        for a in acked:
            for h in custom:
                name, value = h.split(":", 1)
                assert a.headers.get(name.lower()) == value.strip(), a.headers
            assert a.headers.get("webhook-signature", "").startswith("v1,"), a.headers

    # CloudEvents, structured mode.
    for a, e in zip(ce_rc.acked(), feed):
        ev = a.event
        assert a.content_type == CE_JSON
        assert ev["specversion"] == "1.0"
        assert ev["id"] == e["id"] == a.webhook_id
        assert re.fullmatch(r"evt-\d+", ev["id"]), ev["id"]
        assert ev["source"] == hub.base
        assert ev["type"] == e["type"]
        assert ev["subject"] == subject
        assert ev["sequence"] == e["sequence"]
        assert ev["time"] == e["time"]
        seq = int(ev["sequence"])
        if seq in versions:
            assert ev["datacontenttype"] == FHIR_JSON
            assert ev["data"] == versions[seq], (ev["data"], versions[seq])
            vread = hub.raw.get(f"Patient/{p['id']}/_history/{seq}").json()
            assert ev["data"] == vread
        else:
            assert ev.get("data") is None, ev

    # R4 backport notification Bundles.
    numbers = []  # (event id, notification-event.event-number, events-since-subscription-start)
    for k, (a, e) in enumerate(zip(bundle_rc.acked(), feed), start=1):
        b = a.bundle
        assert a.content_type == FHIR_JSON
        assert b["resourceType"] == "Bundle" and b["type"] == "history", b
        assert b["id"] == e["id"] == a.webhook_id
        status = b["entry"][0]["resource"]
        assert status["resourceType"] == "Parameters", status
        params = {x["name"]: x for x in status["parameter"]}
        assert params["subscription"]["valueReference"]["reference"].endswith(f"Subscription/{subs['bundle']['id']}")
        assert params["type"]["valueCode"] == "event-notification"
        assert params["topic"]["valueCanonical"] == e["type"]
        since_start = int(params["events-since-subscription-start"]["valueString"])
        parts = {x["name"]: x for x in params["notification-event"]["part"]}
        assert parts["focus"]["valueReference"]["reference"] == subject
        focus = b["entry"][1]
        assert focus["fullUrl"] == f"{hub.base}/fhir/{subject}"
        seq = int(e["sequence"])
        if seq in versions:
            assert focus["resource"] == versions[seq]
            assert focus["request"] == {"method": "PUT", "url": subject}
        else:
            assert "resource" not in focus and focus["request"] == {"method": "DELETE", "url": subject}, focus
        numbers.append((e["id"], int(parts["event-number"]["valueString"]), since_start))

    # Id-only signals: empty body, CloudEvents binary-mode headers.
    for a, e in zip(id_rc.acked(), feed):
        assert a.body == b""
        assert "content-type" not in a.headers or a.headers["content-type"] == "", a.headers
        h = a.headers
        assert h["ce-specversion"] == "1.0"
        assert h["ce-id"] == e["id"] == a.webhook_id
        assert h["ce-type"] == e["type"]
        assert h["ce-subject"] == subject
        assert h["ce-sequence"] == e["sequence"]
        assert h["ce-source"] == hub.base
        assert a.event["time"] == e["time"] and a.event.get("data") is None

    # Backport numbering: the k-th event of this subscription is event-number k, and the count since the
    # start includes it (checked last: the bundle receiver's delay queues events 2 and 3 behind event 1).
    assert [n for _, n, _ in numbers] == [1, 2, 3] and all(t >= k for k, (_, _, t) in enumerate(numbers, 1)), (
        f"(event id, event-number, events-since-subscription-start) of the 3 notifications: {numbers}; bodies:\n"
        + "\n".join(x.body.decode()[:900] for x in bundle_rc.acked()))


# -- 2. criteria ------------------------------------------------------------------------------------------------


def test_criteria_filtering(hubs, receivers):
    hub = hubs("delivery-criteria", FAST)
    rc = receivers()
    family = helpers.unique_family()
    s_pat = hub.subscribe(rc.url("patients"), rc.secret, criteria=f"Patient?family={family}")
    s_apt = hub.subscribe(rc.url("cancelled"), rc.secret, criteria="Appointment?status=cancelled")

    p1 = hub.new_patient(family=family)  # match (1)
    p2 = hub.new_patient()  # no
    p2 = hub.rename(p2, "Renamed", family=family)  # match (p2 seq 2)
    p1 = hub.rename(p1, "Moved", family=helpers.unique_family())  # no (p1 seq 2)

    pr = hub.raw.create(helpers.practitioner())
    sc = hub.raw.create(helpers.schedule(f"Practitioner/{pr['id']}"))
    appts = []
    for i in range(3):
        start, end = f"2030-01-1{i}T09:00:00Z", f"2030-01-1{i}T09:15:00Z"
        sl = hub.raw.create(helpers.slot(f"Schedule/{sc['id']}", start, end))
        ap = helpers.appointment(f"Patient/{p1['id']}", f"Practitioner/{pr['id']}", f"Slot/{sl['id']}")
        ap.update(start=start, end=end)
        appts.append(hub.raw.create(ap))  # booked: no
    cancelled = hub.update(appts[0], status="cancelled")  # match (seq 2)
    hub.update(appts[1], comment="moved to the afternoon list")  # still booked: no
    sentinel_p = hub.new_patient(family=family)  # match, last
    sentinel_a = hub.update(appts[2], status="cancelled")  # match, last

    want_pat = {(f"Patient/{p1['id']}", 1), (f"Patient/{p2['id']}", 2), (f"Patient/{sentinel_p['id']}", 1)}
    want_apt = {(f"Appointment/{cancelled['id']}", 2), (f"Appointment/{sentinel_a['id']}", 2)}
    rc.wait_for(lambda r: r.acked_keys("patients") >= want_pat and r.acked_keys("cancelled") >= want_apt, 10,
                "the matching events")
    # The sentinels were dispatched last, so every earlier event has been matched (or not); wait out the rest.
    for s in (s_pat, s_apt):
        wait_until(lambda: hub.states(s["id"])["pending"] == 0, 5, "no pending deliveries")
    time.sleep(0.2)
    assert rc.acked_keys("patients") == want_pat
    assert rc.acked_keys("cancelled") == want_apt
    assert {(r.subject, r.sequence) for r in rc.snapshot("patients")} == want_pat, "no other patient event sent"
    assert {(r.subject, r.sequence) for r in rc.snapshot("cancelled")} == want_apt
    assert all(r.type == "carebridge.appointment.cancelled.v1" for r in rc.snapshot("cancelled"))
    assert all(r.event["data"]["name"][0]["family"] == family for r in rc.snapshot("patients"))
    assert hub.states(s_pat["id"]) == {"pending": 0, "delivered": 3, "dead": 0}
    assert hub.states(s_apt["id"]) == {"pending": 0, "delivered": 2, "dead": 0}
    assert_clean(rc, hub=hub)


# -- 3. flaky receiver under a burst ------------------------------------------------------------------------------


def burst(hub: Hub, patients, updates, threads=10):
    """`updates` renames of each patient, all interleaved from `threads` threads."""
    tasks = [(p, j) for p in patients for j in range(updates)]
    random.Random(7).shuffle(tasks)

    def one(t):
        p, j = t
        hub.rename(p, f"Update{j}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, tasks))


def timelines(rs, keys, deliveries) -> str:
    """Every request of these (path, subject, sequence) keys, for failure messages."""
    t0 = min(r.received_at for r in rs)
    out = []
    for k in sorted(keys, key=str):
        out.append(f"{k[1]} sequence {k[2]}:")
        for r in rs:
            if r.key == k:
                out.append(f"  request #{r.arrival} {r.webhook_id} at +{r.received_at - t0:.3f} s "
                           f"({r.headers.get('webhook-timestamp')}): {r.behaviour}, answered {r.status}, ack #{r.ack}")
        out += [f"  hub: {d}" for d in deliveries if d["subject"] == k[1] and f"evt-{d['event']}" == next(
            r.webhook_id for r in rs if r.key == k)]
    return "\n".join(out)


def test_flaky_receiver_burst(hubs, receivers):
    hub = hubs("delivery-flaky", flags(max_attempts=40))
    rc = receivers(seed=3)
    rc.behave(fail_rate=0.3, retry_after=[None, None, 0], hang_rate=0.03, hang_seconds=1.3)
    sub = hub.subscribe(rc.url(), rc.secret)
    patients = [hub.new_patient() for _ in range(10)]
    burst(hub, patients, 10)
    subjects = [f"Patient/{p['id']}" for p in patients]
    want = expected_keys(hub, subjects)
    assert want == {(s, n) for s in subjects for n in range(1, 12)}, "11 events per patient in the feed"

    rc.wait_for(lambda r: r.acked_keys() >= want, 40, "every event acknowledged")
    wait_until(lambda: hub.states(sub["id"])["pending"] == 0, 5, "no pending deliveries")
    wait_quiet(rc)
    rs = rc.snapshot()
    assert_clean(rc, hub=hub)
    assert {(r.subject, r.sequence) for r in rs} == want
    behaviours = {b: sum(r.behaviour == b for r in rs) for b in ("ok", "fail", "hang")}
    assert behaviours["fail"] > 10 and behaviours["hang"] >= 1, behaviours  # the receiver really was flaky

    deliveries = hub.deliveries(sub["id"])
    assert len(deliveries) == len(want)
    assert {d["state"] for d in deliveries} == {"delivered"}, [d for d in deliveries if d["state"] != "delivered"]
    assert {(d["subject"], d["event"]) for d in deliveries} == {
        (r.subject, int(r.webhook_id[4:])) for r in rs}

    ms = hub.metrics()
    sid = sub["id"]
    assert metric(ms, "carebridge_deliveries", subscription=sid, state="delivered") == len(want)
    assert metric(ms, "carebridge_deliveries", subscription=sid, state="pending") == 0
    assert metric(ms, "carebridge_deliveries", subscription=sid, state="dead") == 0
    attempts = {res: metric(ms, "carebridge_delivery_attempts_total", subscription=sid, result=res)
                for res in ("delivered", "failed", "dead")}
    acks = [r for r in rs if r.ack is not None]
    resent_after_ack = [r for r in rs if r.ack is None and any(
        a.key == r.key and a.ack < r.arrival for a in acks)] + [
        r for r in acks if any(a.key == r.key and a.ack < r.arrival for a in acks)]
    assert attempts["delivered"] == len(want) and len(acks) == len(want), (
        f"delivered attempts {attempts}, {len(acks)} 2xx answers for {len(want)} events; re-sent after a 2xx "
        "(no crash, no replay):\n" + timelines(rs, {r.key for r in resent_after_ack}, deliveries))
    assert attempts["dead"] == 0
    # Every attempt the hub counts reached the receiver, and every request the receiver saw was counted.
    assert attempts["delivered"] + attempts["failed"] == len(rs), (attempts, len(rs), behaviours)
    assert metric(ms, "carebridge_delivery_lag_seconds", subscription=sid) == 0
    last = int(hub.events(after=0, limit=1000)["events"][-1]["id"][4:])
    assert metric(ms, "carebridge_outbox_last_seq") >= last


# -- 4. receiver down for a while -----------------------------------------------------------------------------------


def test_receiver_down_then_back(hubs, receivers):
    hub = hubs("delivery-down", flags(max_attempts=40))
    rc = receivers()
    sub = hub.subscribe(rc.url(), rc.secret)
    patients = [hub.new_patient() for _ in range(5)]
    subjects = [f"Patient/{p['id']}" for p in patients]
    rc.wait_for(lambda r: len(r.acked()) == 5, 10, "the first events")
    port = rc.port

    rc.stop()
    down = time.monotonic()
    burst(hub, patients, 4, threads=5)

    # Wait past several failed attempts of every head (backoff up to its 1 s cap), at least 1.5 s down.
    def retried():
        pend = hub.deliveries(sub["id"], state="pending")
        return len(pend) == 20 and sum(d["attempts"] >= 6 for d in pend) == 5
    wait_until(retried, 15, "the five heads to fail 6 times", interval=0.1)
    time.sleep(max(0.0, 1.5 - (time.monotonic() - down)))
    pend = hub.deliveries(sub["id"], state="pending")
    assert all(d["lastError"] for d in pend if d["attempts"]), pend
    assert hub.subscription(sub["id"])["status"] == "active"

    rc.restart()
    assert rc.port == port
    want = expected_keys(hub, subjects)
    assert len(want) == 25
    rc.wait_for(lambda r: r.acked_keys() >= want, 15, "every event after the restart")
    wait_until(lambda: hub.states(sub["id"]) == {"pending": 0, "delivered": 25, "dead": 0}, 5, "all delivered")
    assert_clean(rc, hub=hub)
    assert hub.subscription(sub["id"])["status"] == "active"


# -- 5. dead letters, no head-of-line blocking, $replay ---------------------------------------------------------------


def test_dead_letters_and_replay(hubs, receivers):
    hub = hubs("delivery-dead", flags(max_attempts=3))
    bad, good = receivers(), receivers()
    # Every request to `bad` fails and asks for a 1 s pause, so its three attempts take about 2 s per event.
    bad.behave(always_status=500, retry_after=[1])
    bad_sub = hub.subscribe(bad.url(), bad.secret)
    good_sub = hub.subscribe(good.url(), good.secret)

    t0 = time.monotonic()
    p1 = hub.new_patient()
    hub.rename(p1, "Again")
    p2 = hub.new_patient()
    written = time.monotonic()
    subjects = [f"Patient/{p1['id']}", f"Patient/{p2['id']}"]
    want = expected_keys(hub, subjects)
    assert len(want) == 3

    # The healthy subscriber gets everything at once while the other one is still failing.
    good.wait_for(lambda r: r.acked_keys() >= want, 2, "the healthy subscriber's deliveries")
    took = max(r.received_at for r in good.acked()) - written
    assert took < 1.0, f"healthy subscriber waited {took:.2f} s"
    assert hub.states(bad_sub["id"])["pending"] > 0, "the failing subscriber still has work (else no HOL test)"
    wait_until(lambda: hub.states(good_sub["id"]) == {"pending": 0, "delivered": 3, "dead": 0}, 2,
               "the healthy subscriber's deliveries recorded")

    # All three become dead letters after 3 attempts each.
    def dump():
        return (f"\nbad deliveries: {json.dumps(hub.deliveries(bad_sub['id']), indent=1)}"
                f"\nsubscription: {json.dumps(hub.subscription(bad_sub['id']))}\nhub log:\n{hub.log()}")

    try:
        wait_until(lambda: hub.states(bad_sub["id"]) == {"pending": 0, "delivered": 0, "dead": 3}, 8,
                   "3 dead letters")
    except AssertionError as e:
        raise AssertionError(f"{e}{dump()}") from None
    dead = hub.deliveries(bad_sub["id"], state="dead")
    assert all(d["attempts"] == 3 and d["lastStatus"] == 500 for d in dead), dead
    r = requests.get(hub.base + "/admin/deliveries", params={"state": "dead"}, timeout=10)
    assert {d["subscription"] for d in r.json()["deliveries"]} == {bad_sub["id"]}
    assert len(bad.snapshot()) == 9, "3 attempts x 3 events"
    s = hub.subscription(bad_sub["id"])
    assert s["status"] == "error", s
    assert s.get("error"), s
    assert hub.subscription(good_sub["id"])["status"] == "active"
    assert time.monotonic() - t0 < 15

    # An event written while the subscription is in error is kept for it.
    p3 = hub.new_patient()
    good.wait_for(lambda r: (f"Patient/{p3['id']}", 1) in r.acked_keys(), 2, "p3 at the healthy subscriber")

    # Fixed: replay the dead letters; everything arrives and the subscription is active again.
    bad.behave(always_status=None)
    replay_from = bad._next()  # arrival numbers after this one come after the replay
    r = hub.replay(bad_sub["id"], deadLetters=True)
    assert r.status_code == 200, describe(r)
    out = {p["name"]: p.get("valueInteger") for p in r.json()["parameter"]}
    assert out.get("requeued") == 3, r.json()
    want_all = want | {(f"Patient/{p3['id']}", 1)}
    try:
        bad.wait_for(lambda r: r.acked_keys() >= want, 6, "the replayed dead letters")
        wait_until(lambda: hub.subscription(bad_sub["id"])["status"] == "active", 3, "status active again")
        bad.wait_for(lambda r: r.acked_keys() >= want_all, 6,
                     "the event written while the subscription was in error")
    except AssertionError as e:
        raise AssertionError(f"{e}{dump()}") from None
    wait_until(lambda: hub.states(bad_sub["id"]) == {"pending": 0, "delivered": 4, "dead": 0}, 5, "all delivered")
    assert "error" not in hub.subscription(bad_sub["id"])
    assert_clean(bad, hub=hub, since_arrival=replay_from)
    assert_clean(good, hub=hub)
    replayed = [(r.subject, r.sequence) for r in bad.acked() if r.arrival > replay_from]
    assert sorted(replayed) == sorted(want_all), replayed


def test_replay_redelivers_with_same_ids(hubs, receivers):
    hub = hubs("delivery-replay", FAST)
    rc = receivers()
    sub = hub.subscribe(rc.url(), rc.secret)
    p = hub.new_patient()
    for i in range(3):
        hub.rename(p, f"R{i}")
    other = hub.new_patient()
    subjects = [f"Patient/{p['id']}", f"Patient/{other['id']}"]
    want = expected_keys(hub, subjects)
    rc.wait_for(lambda r: r.acked_keys() >= want, 10, "first deliveries")
    wait_until(lambda: hub.states(sub["id"])["pending"] == 0, 5, "none pending")
    first = {(r.subject, r.sequence): r.webhook_id for r in rc.acked()}
    assert len(rc.snapshot()) == 5, "sent once each before the replay:\n" + timelines(
        rc.snapshot(), {r.key for r in rc.snapshot()}, hub.deliveries(sub["id"]))

    # From the second event of p on: p's events 2..4 and `other`'s creation, delivered again.
    feed = hub.all_events(subject=subjects[0])
    from_seq = int(feed[1]["id"][4:])
    r = hub.replay(sub["id"], sequence=from_seq)
    assert r.status_code == 200, describe(r)
    out = {x["name"]: x.get("valueInteger") for x in r.json()["parameter"]}
    assert out == {"requeued": 4, "enqueued": 0}, r.json()
    rc.wait_for(lambda r: len(r.acked()) >= 9, 10, "4 replayed deliveries")
    wait_until(lambda: hub.states(sub["id"]) == {"pending": 0, "delivered": 5, "dead": 0}, 5, "all delivered")
    time.sleep(0.2)
    replayed = rc.acked()[5:]
    assert len(replayed) == 4, "replayed once each:\n" + timelines(
        rc.snapshot(), {r.key for r in rc.snapshot()}, hub.deliveries(sub["id"]))
    assert {(x.subject, x.sequence) for x in replayed} == {(subjects[0], n) for n in (2, 3, 4)} | {(subjects[1], 1)}
    for x in replayed:
        assert x.webhook_id == first[(x.subject, x.sequence)], "a replay keeps the event's id"
    p_replayed = [x.sequence for x in replayed if x.subject == subjects[0]]
    assert p_replayed == [2, 3, 4], "replayed in subject order"

    # One event by number.
    r = hub.replay(sub["id"], event=int(feed[0]["id"][4:]))
    assert r.status_code == 200, describe(r)
    rc.wait_for(lambda r: len(r.acked()) >= 10, 5, "the single replayed event")
    assert rc.acked()[-1].webhook_id == feed[0]["id"]

    # Nothing named: refused.
    r = hub.raw.post(f"Subscription/{sub['id']}/$replay", {"resourceType": "Parameters", "parameter": []})
    assert 400 <= r.status_code < 500, describe(r)
    assert not rc.errors, rc.errors
    assert duplicate_id_violations(rc.snapshot()) == []


# -- 6. polling feed ----------------------------------------------------------------------------------------------


def test_polling_feed(hubs):
    hub = hubs("delivery-feed", FAST)
    a = hub.new_patient()
    b = hub.new_patient()
    a2 = hub.rename(a, "A2")
    pr = hub.raw.create(helpers.practitioner())
    b2 = hub.rename(b, "B2")
    written = [("Patient", a["id"], 1), ("Patient", b["id"], 1), ("Patient", a["id"], 2),
               ("Practitioner", pr["id"], 1), ("Patient", b["id"], 2)]

    page = hub.events(after=0)
    evs = page["events"]
    assert [(e["subject"].split("/")[0], e["subject"].split("/")[1], int(e["sequence"])) for e in evs] == written
    seqs = [int(e["id"][4:]) for e in evs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert page["next"] == str(seqs[-1])
    assert evs[2]["data"] == a2 and evs[4]["data"] == b2
    assert [e["type"] for e in evs] == [
        "carebridge.patient.registered.v1", "carebridge.patient.registered.v1", "carebridge.patient.updated.v1",
        "carebridge.practitioner.created.v1", "carebridge.patient.updated.v1"]
    for e in evs:
        assert e["specversion"] == "1.0" and e["source"] == hub.base and e["time"]

    # Paging with limit and next.
    got, after = [], 0
    for _ in range(10):
        pg = hub.events(after=after, limit=2)
        if not pg["events"]:
            assert pg["next"] == str(after)
            break
        assert len(pg["events"]) <= 2
        got += pg["events"]
        after = pg["next"]
    assert [e["id"] for e in got] == [e["id"] for e in evs]

    # Nothing new, short wait: empty, same cursor, after about the wait.
    t = time.monotonic()
    pg = hub.events(after=page["next"], wait="300ms")
    assert pg == {"events": [], "next": page["next"]}
    assert 0.25 <= time.monotonic() - t < 2

    # Long poll answered early by a write from another thread.
    def later(delay, fn):
        def run():
            time.sleep(delay)
            fn()
        th = threading.Thread(target=run)
        th.start()
        return th

    made = {}
    th = later(0.5, lambda: made.setdefault("p", hub.new_patient()))
    t = time.monotonic()
    pg = hub.events(after=page["next"], wait="5s")
    took = time.monotonic() - t
    th.join()
    assert 0.4 <= took < 2.0, f"long poll answered after {took:.2f} s"
    assert [e["subject"] for e in pg["events"]] == [f"Patient/{made['p']['id']}"], pg
    cursor = pg["next"]

    # With a subject filter, a non-matching event does not end the wait; the matching one does.
    th1 = later(0.3, lambda: hub.rename(a, "A3"))
    th2 = later(0.9, lambda: hub.rename(b, "B3"))
    t = time.monotonic()
    pg = hub.events(after=cursor, wait="5s", subject=f"Patient/{b['id']}")
    took = time.monotonic() - t
    th1.join()
    th2.join()
    assert 0.8 <= took < 2.5, f"filtered long poll answered after {took:.2f} s: {pg}"
    assert [(e["subject"], e["sequence"]) for e in pg["events"]] == [(f"Patient/{b['id']}", "3")], pg

    # Filters.
    reg = hub.all_events(type="carebridge.patient.registered.v1")
    assert [e["subject"] for e in reg] == [f"Patient/{a['id']}", f"Patient/{b['id']}", f"Patient/{made['p']['id']}"]
    only_a = hub.all_events(subject=f"Patient/{a['id']}")
    assert [int(e["sequence"]) for e in only_a] == [1, 2, 3] and {e["subject"] for e in only_a} == {f"Patient/{a['id']}"}
    both = hub.all_events(type="carebridge.practitioner.created.v1,carebridge.patient.updated.v1",
                          subject=f"Patient/{b['id']},Practitioner/{pr['id']}")
    assert [(e["subject"], e["sequence"]) for e in both] == [
        (f"Practitioner/{pr['id']}", "1"), (f"Patient/{b['id']}", "2"), (f"Patient/{b['id']}", "3")]
    # A filtered page still moves the cursor past what it skipped.
    pg = hub.events(after=0, subject=f"Practitioner/{pr['id']}")
    assert len(pg["events"]) == 1 and int(pg["next"]) >= int(pg["events"][0]["id"][4:])
    r = requests.get(hub.base + "/events", params={"after": "x"}, timeout=10)
    assert r.status_code == 400, describe(r)


# -- 7. kill -9 mid-delivery ----------------------------------------------------------------------------------------


def test_crash_mid_delivery(hubs, receivers):
    args = flags(max_attempts=40)
    hub = hubs("delivery-crash", args)
    rc = receivers()
    rc.behave(delay_seconds=0.05)
    sub = hub.subscribe(rc.url(), rc.secret)
    patients = [hub.new_patient() for _ in range(5)]
    subjects = [f"Patient/{p['id']}" for p in patients]
    burst(hub, patients, 39, threads=5)
    total = 5 * 40
    acked_after_writes = len(rc.acked_keys())
    assert acked_after_writes < total * 0.8, f"delivery too far ahead of the writes ({acked_after_writes}/{total})"
    rc.wait_for(lambda r: len(r.acked_keys()) >= total * 0.3, 20, "some deliveries before the kill")
    hub.srv.proc.kill()
    hub.srv.proc.wait()
    acked_at_kill = len(rc.acked_keys())
    assert acked_at_kill < total, "the kill came after everything was delivered"

    hub2 = hubs("delivery-crash-restart", args, data_dir=hub.srv.data_dir)
    want = expected_keys(hub2, subjects)
    assert len(want) == total, "every acknowledged write survived the kill"
    rc.wait_for(lambda r: r.acked_keys() >= want, 30, "every event after the restart")
    wait_until(lambda: hub2.states(sub["id"]) == {"pending": 0, "delivered": total, "dead": 0}, 5, "all delivered")
    wait_quiet(rc)
    assert_clean(rc, hub=hub2)
    rs = rc.snapshot()
    assert {(r.subject, r.sequence) for r in rs} == want
    dups = len([r for r in rs if r.ack is not None]) - len(want)
    print(f"crash: {acked_at_kill}/{total} acknowledged at the kill, {dups} acknowledged twice")
