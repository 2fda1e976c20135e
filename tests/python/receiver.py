"""A real webhook receiver for the delivery tests.

A threaded HTTP server on 127.0.0.1 (an ephemeral port the first time, the same port after a restart) that
- verifies every request with the Standard Webhooks reference library (`standardwebhooks.Webhook.verify`),
- parses CloudEvents (structured `application/cloudevents+json`, or binary mode `ce-*` headers for an id-only
  signal) with the CloudEvents SDK (`cloudevents.http.from_http`), and FHIR notification Bundles as JSON,
- records every request (webhook-id, subject, sequence, type, arrival and acknowledgement order, status sent),
- can be told to fail at random (500/503, sometimes with `Retry-After`), to hang past the hub's timeout, to be
  slow, to always fail, or to be stopped and restarted later on the same port.

HTTP/1.0 (one request per connection), so a stopped receiver really is unreachable: no kept-alive connection
outlives it.

Ordering evidence: every request gets an `arrival` number when its headers are read; a request answered 2xx
gets an `ack` number from the same counter *before* its response is written. The hub can only send sequence
n+1 of a subject after it has seen the 2xx of n, so for every request of sequence n+1, the first 2xx of n must
have a smaller `ack` than that request's `arrival`.
"""

import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from cloudevents.http import from_http
from standardwebhooks import Webhook


@dataclass
class Receipt:
    arrival: int
    received_at: float
    path: str
    headers: dict
    body: bytes
    webhook_id: Optional[str] = None
    content_type: str = ""
    # Parsed CloudEvent (structured or binary mode), as a plain dict of attributes plus `data`.
    event: Optional[dict] = None
    # Parsed notification Bundle (payload application/fhir+json).
    bundle: Optional[dict] = None
    subject: Optional[str] = None
    sequence: Optional[int] = None
    type: Optional[str] = None
    status: Optional[int] = None  # what the receiver answered (None: no answer, e.g. hung then dropped)
    ack: Optional[int] = None  # set for 2xx answers, before the response is written
    behaviour: str = "ok"  # ok | fail | hang | always-fail | slow
    errors: list = field(default_factory=list)

    @property
    def key(self):
        return (self.path, self.subject, self.sequence)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class Receiver:
    """See the module docstring. `secret` is the subscription's `whsec_...` signing secret."""

    def __init__(self, secret: str, seed: Optional[int] = None):
        self.secret = secret
        self.webhook = Webhook(secret)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.receipts: list[Receipt] = []
        self.errors: list[str] = []
        self._counter = itertools.count(1)
        self.port = 0
        self.inflight = 0  # requests being handled right now
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        # Behaviour knobs (read under the lock for each request).
        self.fail_rate = 0.0  # fraction of requests answered 500/503
        self.retry_after = [None]  # Retry-After values to pick from for failures (None: no header)
        self.hang_rate = 0.0  # fraction of requests held for hang_seconds (then answered 503)
        self.hang_seconds = 1.6
        self.delay_seconds = 0.0  # every request sleeps this long before answering
        self.always_status: Optional[int] = None  # answer every request with this status (e.g. 500)
        self.ok_status = 200
        self.on_request: Optional[Callable[[Receipt], None]] = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self):
        handler = self._handler_class()
        srv = None
        deadline = time.monotonic() + 10
        while True:
            try:
                srv = _Server(("127.0.0.1", self.port), handler)
                break
            except OSError:
                # Restart on the same port: the old socket may take a moment to go.
                if self.port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._server = srv
        self.port = srv.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop listening; requests being handled are cut short (hangs end, nothing more is acknowledged)."""
        self._stopping.set()
        srv = self._server
        if srv is not None:
            srv.shutdown()
            srv.server_close()
            self._thread.join(5)
        self._server = None

    restart = start

    @property
    def running(self) -> bool:
        return self._server is not None

    def url(self, path: str = "hook") -> str:
        assert self.port, "start() the receiver first"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- behaviour ---------------------------------------------------------------------------------------------

    def behave(self, **knobs):
        with self.lock:
            for k, v in knobs.items():
                if not hasattr(self, k):
                    raise AttributeError(k)
                setattr(self, k, v)

    def _choose(self):
        """(behaviour, status, retry_after) for the next request."""
        with self.lock:
            if self.always_status is not None:
                return "always-fail", self.always_status, self.rng.choice(self.retry_after)
            r = self.rng.random()
            if r < self.hang_rate:
                return "hang", 503, None
            if r < self.hang_rate + self.fail_rate:
                return "fail", self.rng.choice([500, 503]), self.rng.choice(self.retry_after)
            if self.delay_seconds:
                return "slow", self.ok_status, None
            return "ok", self.ok_status, None

    # -- request handling ----------------------------------------------------------------------------------------

    def _handler_class(self):
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_error(405)

            def do_POST(self):
                with rec.lock:
                    rec.inflight += 1
                try:
                    self._post()
                finally:
                    with rec.lock:
                        rec.inflight -= 1
                        rec.cond.notify_all()

            def _post(self):
                arrival = rec._next()
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                r = Receipt(
                    arrival=arrival,
                    received_at=time.monotonic(),
                    path=self.path.lstrip("/"),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                rec._inspect(r)
                behaviour, status, retry_after = rec._choose()
                r.behaviour = behaviour
                if behaviour == "hang":
                    rec._stopping.wait(rec.hang_seconds)
                elif behaviour == "slow":
                    rec._stopping.wait(rec.delay_seconds)
                if rec._stopping.is_set():
                    # Stopped meanwhile: drop the connection without an answer.
                    with rec.lock:
                        rec.receipts.append(r)
                        rec.cond.notify_all()
                    self.close_connection = True
                    return
                with rec.lock:
                    r.status = status
                    if 200 <= status < 300:
                        r.ack = next(rec._counter)
                    rec.receipts.append(r)
                    rec.cond.notify_all()
                if rec.on_request:
                    rec.on_request(r)
                try:
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", str(retry_after))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError, socket.timeout):
                    pass

        return Handler

    def _next(self) -> int:
        with self.lock:
            return next(self._counter)

    def _error(self, r: Receipt, msg: str):
        r.errors.append(msg)
        with self.lock:
            self.errors.append(f"request #{r.arrival} to /{r.path} (webhook-id {r.webhook_id}): {msg}")

    def _inspect(self, r: Receipt):
        h = r.headers
        r.webhook_id = h.get("webhook-id")
        r.content_type = h.get("content-type", "").split(";")[0].strip()
        try:
            self.webhook.verify(r.body, h, json_parse=False)
        except Exception as e:  # noqa: BLE001 - any failure is a finding
            self._error(r, f"standardwebhooks verification failed: {type(e).__name__}: {e}")
        try:
            if r.content_type == "application/cloudevents+json":
                ev = from_http(h, r.body)
                r.event = _event_dict(ev)
            elif r.content_type == "application/fhir+json":
                r.bundle = json.loads(r.body)
            elif not r.body and "ce-id" in h:
                ev = from_http(h, r.body)
                r.event = _event_dict(ev)
            else:
                self._error(r, f"unexpected request: content-type {r.content_type!r}, {len(r.body)} bytes")
        except Exception as e:  # noqa: BLE001
            self._error(r, f"cannot parse: {type(e).__name__}: {e}")
        if r.event is not None:
            r.subject = r.event.get("subject")
            r.type = r.event.get("type")
            try:
                r.sequence = int(r.event.get("sequence"))
            except (TypeError, ValueError):
                self._error(r, f"sequence is not a number: {r.event.get('sequence')!r}")
            if r.event.get("id") != r.webhook_id:
                self._error(r, f"CloudEvents id {r.event.get('id')!r} != webhook-id {r.webhook_id!r}")
        elif r.bundle is not None:
            try:
                focus = r.bundle["entry"][1]["request"]["url"]
                r.subject = focus
            except (KeyError, IndexError, TypeError):
                self._error(r, "notification Bundle without a focus entry")

    # -- queries ------------------------------------------------------------------------------------------------

    def snapshot(self, path: Optional[str] = None) -> list[Receipt]:
        with self.lock:
            rs = list(self.receipts)
        return [r for r in rs if path is None or r.path == path.lstrip("/")]

    def acked(self, path: Optional[str] = None) -> list[Receipt]:
        return [r for r in self.snapshot(path) if r.ack is not None]

    def acked_keys(self, path: Optional[str] = None) -> set:
        return {(r.subject, r.sequence) for r in self.acked(path)}

    def wait_for(self, predicate: Callable[["Receiver"], bool], timeout: float, what: str = "condition"):
        """Wait until predicate(self) holds (re-checked on every request and every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            with self.cond:
                self.cond.wait(min(remaining, 0.1))


def _event_dict(ev) -> dict:
    d = {k: v for k, v in ev.get_attributes().items()}
    d["data"] = ev.data
    return d


def new_secret() -> str:
    import base64
    import os

    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


# -- checks on what was received ----------------------------------------------------------------------------------


def order_violations(receipts: list[Receipt]) -> list[str]:
    """Per-subject order: every request for sequence n of a subject must arrive after the first 2xx of every
    lower sequence of that subject that was acknowledged at all. Returns human-readable violations."""
    first_ack: dict = {}
    for r in receipts:
        if r.ack is not None and r.subject is not None:
            k = (r.path, r.subject, r.sequence)
            if k not in first_ack or r.ack < first_ack[k][0]:
                first_ack[k] = (r.ack, r)
    by_subject: dict = {}
    for (path, subject, seq), (ack, _) in first_ack.items():
        by_subject.setdefault((path, subject), []).append((seq, ack))
    out = []
    for r in receipts:
        if r.subject is None or r.sequence is None:
            continue
        for seq, ack in by_subject.get((r.path, r.subject), []):
            if seq < r.sequence and ack > r.arrival:
                out.append(
                    f"{r.subject} sequence {r.sequence} (request #{r.arrival}, {r.webhook_id}) arrived before "
                    f"sequence {seq} was first acknowledged (ack #{ack})"
                )
    return out


def first_receipt_order_violations(receipts: list[Receipt]) -> list[str]:
    """The weaker form: per subject, the first 2xx receipts are in increasing sequence order."""
    seen = set()
    last: dict = {}
    out = []
    for r in sorted((r for r in receipts if r.ack is not None), key=lambda r: r.ack):
        k = (r.path, r.subject, r.sequence)
        if k in seen:
            continue
        seen.add(k)
        prev = last.get((r.path, r.subject))
        if prev is not None and r.sequence <= prev:
            out.append(f"{r.subject}: first receipt of sequence {r.sequence} after that of {prev}")
        last[(r.path, r.subject)] = r.sequence
    return out


def duplicate_id_violations(receipts: list[Receipt]) -> list[str]:
    """Every receipt of one (subject, sequence) carries the same webhook-id, and one webhook-id names one event."""
    ids: dict = {}
    keys: dict = {}
    for r in receipts:
        if r.subject is None:
            continue
        ids.setdefault(r.key, set()).add(r.webhook_id)
        keys.setdefault((r.path, r.webhook_id), set()).add((r.subject, r.sequence))
    out = [f"{k}: several webhook-ids {sorted(v)}" for k, v in ids.items() if len(v) > 1]
    out += [f"webhook-id {k[1]} used for several events {sorted(v)}" for k, v in keys.items() if len(v) > 1]
    return out
