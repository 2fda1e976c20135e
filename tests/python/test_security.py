"""Security: signed-JWT client credentials, Bearer tokens with SMART v2 system scopes, revocation, rate limits,
the audit trail, and the `clients` / `token` commands, against a hub started with authentication on.

Every negative case asserts the refusal (status and error) AND that nothing leaked (no token, no resource data
in the answer) or changed (the data read back by the admin client is as before).
"""

import hmac
import hashlib
import base64
import json
import os
import subprocess
import time
import uuid

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from conftest import FHIR_JSON, _binary, describe, run_cli, start_server, stop_server

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SECRET_NAME = "Leakcheck"
NHS = "9000000009"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(key, kid):
    pub = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        j = json.loads(RSAAlgorithm.to_jwk(pub))
    else:
        j = json.loads(ECAlgorithm.to_jwk(pub))
    j["kid"] = kid
    return j


class Hub:
    """A hub with auth on, its admin key, and methods to register clients and get tokens."""

    def __init__(self, srv, tmp):
        self.srv = srv
        self.base = srv.base_url
        self.token_url = self.base + "/oauth2/token"
        self.tmp = tmp
        key_file = srv.data_dir / "admin-client-key.pem"
        assert key_file.exists(), "the first start must write the admin client's key"
        assert (key_file.stat().st_mode & 0o777) == 0o600
        self.admin_key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        self.keys = {}

    def cli(self, *args, check=True):
        return run_cli(self.srv, *args, check=check)

    def add_client(self, cid, scopes, ods="RA1", key=None, kid=None, extra=()):
        key = key or rsa_key()
        kid = kid or f"{cid}-1"
        path = self.tmp / f"{cid}-{kid}.jwks"
        path.write_text(json.dumps({"keys": [jwk_of(key, kid)]}))
        self.cli("clients", "add", "--id", cid, "--ods", ods, "--scopes", scopes, "--jwks", str(path), *extra)
        self.keys[cid] = (key, kid)
        return key, kid

    def assertion(self, cid, key=None, kid=None, alg=None, headers=None, **claims):
        if key is None:
            key, kid0 = self.keys[cid]
            kid = kid or kid0
        alg = alg or ("ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS512")
        now = int(time.time())
        body = {"iss": cid, "sub": cid, "aud": self.token_url, "jti": uuid.uuid4().hex, "iat": now, "exp": now + 120}
        for k, v in claims.items():
            if v is None:
                body.pop(k, None)
            else:
                body[k] = v
        h = {"kid": kid, "typ": "JWT"}
        h.update(headers or {})
        return jwt.encode(body, key, algorithm=alg, headers=h)

    def token_response(self, assertion, grant="client_credentials", atype=ASSERTION_TYPE, scope=None, **kw):
        form = {"grant_type": grant, "client_assertion_type": atype, "client_assertion": assertion}
        if scope is not None:
            form["scope"] = scope
        return requests.post(self.token_url, data=form, timeout=30, **kw)

    def token(self, cid, scope=None):
        r = self.token_response(self.assertion(cid), scope=scope)
        assert r.status_code == 200, describe(r)
        return r.json()["access_token"]

    def admin_token(self):
        return self.token("admin")

    def call(self, method, path, token=None, body=None, headers=None):
        h = {"Accept": FHIR_JSON}
        if token:
            h["Authorization"] = f"Bearer {token}"
        if body is not None:
            h["Content-Type"] = FHIR_JSON
        h.update(headers or {})
        data = json.dumps(body) if body is not None else None
        return requests.request(method, self.base + path, headers=h, data=data, timeout=30)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    srv = start_server(tmp_path_factory, "secure", auth=True)
    h = Hub(srv, tmp_path_factory.mktemp("secure-keys"))
    h.keys["admin"] = (h.admin_key, "admin-1")
    yield h
    stop_server(srv)


@pytest.fixture(scope="module")
def admin(hub):
    return hub.admin_token()


@pytest.fixture(scope="module")
def patient(hub, admin):
    r = hub.call("POST", "/fhir/Patient", admin, {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS}],
        "name": [{"family": SECRET_NAME, "given": ["Ada"]}], "gender": "female", "birthDate": "1970-01-02",
        # Managed by RB2: clients of RB2 see it (organisation separation, see test_org_separation.py).
        "managingOrganization": {"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code",
                                                "value": "RB2"}}})
    assert r.status_code == 201, describe(r)
    return r.json()


@pytest.fixture(scope="module")
def clients(hub):
    hub.add_client("full", "system/*.cruds", ods="RA1")
    hub.add_client("reader", "system/Patient.rs", ods="RB2")
    hub.add_client("searcher", "system/Patient.s")
    hub.add_client("creator", "system/Patient.c")
    return hub


def no_leak(r):
    assert SECRET_NAME not in r.text and NHS not in r.text, describe(r)


def unchanged(hub, admin, patient):
    r = hub.call("GET", f"/fhir/Patient/{patient['id']}", admin)
    assert r.status_code == 200, describe(r)
    assert r.json()["meta"]["versionId"] == patient["meta"]["versionId"]
    assert r.json()["name"][0]["family"] == SECRET_NAME


def patient_count(hub, admin):
    r = hub.call("GET", "/fhir/Patient?_summary=count", admin)
    assert r.status_code == 200, describe(r)
    return r.json()["total"]


def assert_token_refused(r, *errors, status=None):
    assert r.status_code in (status,) if status else r.status_code in (400, 401), describe(r)
    body = r.json()
    assert body["error"] in errors, describe(r)
    assert body.get("error_description"), describe(r)
    assert "access_token" not in body
    assert r.headers.get("Cache-Control") == "no-store"


def assert_401(r):
    assert r.status_code == 401, describe(r)
    assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", ""), describe(r)
    assert r.headers["Content-Type"].startswith("application/fhir+json")
    assert r.json()["resourceType"] == "OperationOutcome"
    no_leak(r)


def assert_403(r, scope):
    assert r.status_code == 403, describe(r)
    out = r.json()
    assert out["resourceType"] == "OperationOutcome"
    assert scope in out["issue"][0]["diagnostics"], describe(r)
    no_leak(r)


# --- positive flow -------------------------------------------------------------------------------------------


def test_open_endpoints_need_no_token(hub):
    assert hub.call("GET", "/health").status_code == 200
    r = hub.call("GET", "/fhir/metadata")
    assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement"


def test_token_flow_and_scoped_access(clients, admin, patient):
    hub = clients
    r = hub.token_response(hub.assertion("reader"))
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/Patient.rs"
    assert r.headers["Cache-Control"] == "no-store"
    t = body["access_token"]
    r = hub.call("GET", f"/fhir/Patient/{patient['id']}", t)
    assert r.status_code == 200 and r.json()["name"][0]["family"] == SECRET_NAME
    r = hub.call("GET", f"/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{NHS}", t)
    assert r.status_code == 200 and r.json()["total"] == 1
    # A narrower scope on request.
    r = hub.token_response(hub.assertion("reader"), scope="system/Patient.r")
    assert r.status_code == 200 and r.json()["scope"] == "system/Patient.r"
    narrow = r.json()["access_token"]
    assert hub.call("GET", f"/fhir/Patient/{patient['id']}", narrow).status_code == 200
    assert_403(hub.call("GET", "/fhir/Patient", narrow), "system/Patient.s")


def test_admin_client_was_bootstrapped_and_is_listed(clients):
    out = clients.cli("clients", "list").stdout
    lines = {line.split("\t")[0]: line for line in out.splitlines()}
    assert "system/*.cruds admin" in lines["admin"]
    assert "keys=admin-1" in lines["admin"]
    assert "RB2" in lines["reader"] and "active" in lines["reader"]
    as_json = [json.loads(line) for line in clients.cli("clients", "list", "--json").stdout.splitlines()]
    assert {c["id"] for c in as_json} >= {"admin", "full", "reader"}


def test_clients_cli_refuses_bad_input(clients, tmp_path):
    bad = tmp_path / "bad.jwks"
    bad.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "x", "k": "AAAA"}]}))
    out = clients.cli("clients", "add", "--id", "bad", "--ods", "RA1", "--scopes", "system/*.read",
                      "--jwks", str(bad), check=False)
    assert out.returncode != 0 and "kty" in out.stderr
    good = tmp_path / "good.jwks"
    good.write_text(json.dumps({"keys": [jwk_of(rsa_key(), "k")]}))
    out = clients.cli("clients", "add", "--id", "bad", "--ods", "RA1", "--scopes", "patient/*.read",
                      "--jwks", str(good), check=False)
    assert out.returncode != 0 and "system scope" in out.stderr
    out = clients.cli("clients", "add", "--id", "reader", "--ods", "RA1", "--scopes", "system/*.read",
                      "--jwks", str(good), check=False)
    assert out.returncode != 0 and "already exists" in out.stderr
    assert "bad\t" not in clients.cli("clients", "list").stdout


def test_token_command_prints_a_working_token(hub, patient):
    out = subprocess.run([str(_binary()), "token", "--key", str(hub.srv.data_dir / "admin-client-key.pem"),
                          "--client", "admin", "--url", hub.base], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    t = out.stdout.strip()
    assert hub.call("GET", f"/fhir/Patient/{patient['id']}", t).status_code == 200


# --- the token endpoint refuses bad assertions ---------------------------------------------------------------


def test_wrong_grant_type(clients):
    r = clients.token_response(clients.assertion("reader"), grant="password")
    assert_token_refused(r, "unsupported_grant_type", status=400)


def test_wrong_assertion_type(clients):
    r = clients.token_response(clients.assertion("reader"), atype="urn:ietf:params:oauth:client-assertion-type:saml2-bearer")
    assert_token_refused(r, "invalid_request", status=400)


def test_missing_assertion(clients):
    r = requests.post(clients.token_url, data={"grant_type": "client_credentials",
                                              "client_assertion_type": ASSERTION_TYPE}, timeout=30)
    assert_token_refused(r, "invalid_request", status=400)


def test_json_body_is_refused(clients):
    r = requests.post(clients.token_url, json={"grant_type": "client_credentials",
                                               "client_assertion_type": ASSERTION_TYPE,
                                               "client_assertion": clients.assertion("reader")}, timeout=30)
    assert_token_refused(r, "invalid_request", status=400)


def test_malformed_assertion(clients):
    assert_token_refused(clients.token_response("not-a-jwt"), "invalid_request")
    assert_token_refused(clients.token_response("a.b.c"), "invalid_request")


def test_alg_none(clients):
    now = int(time.time())
    claims = {"iss": "reader", "sub": "reader", "aud": clients.token_url, "jti": uuid.uuid4().hex, "exp": now + 60}
    token = b64url(json.dumps({"alg": "none", "kid": "reader-1"}).encode()) + "." + \
        b64url(json.dumps(claims).encode()) + "."
    assert_token_refused(clients.token_response(token), "invalid_client", status=401)


def test_hs256_signed_with_the_rsa_public_key(clients):
    key, kid = clients.keys["reader"]
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    claims = {"iss": "reader", "sub": "reader", "aud": clients.token_url, "jti": uuid.uuid4().hex, "exp": now + 60}
    signing_input = b64url(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode()) + "." + \
        b64url(json.dumps(claims).encode())
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert_token_refused(clients.token_response(signing_input + "." + b64url(sig)), "invalid_client", status=401)


def test_rs256_where_rs512_is_required(clients):
    assert_token_refused(clients.token_response(clients.assertion("reader", alg="RS256")), "invalid_client",
                         status=401)


def test_bad_signature(clients):
    token = clients.assertion("reader")
    head, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = forged["iss"] = "reader"
    forged["scope"] = "admin"
    tampered = head + "." + b64url(json.dumps(forged).encode()) + "." + sig
    assert_token_refused(clients.token_response(tampered), "invalid_client", status=401)


def test_key_not_registered_under_that_kid(clients):
    # Signed with another key, claiming the registered kid.
    r = clients.token_response(clients.assertion("reader", key=rsa_key(), kid="reader-1"))
    assert_token_refused(r, "invalid_client", status=401)


def test_es384_with_an_rsa_kid(clients):
    r = clients.token_response(clients.assertion("reader", key=ec.generate_private_key(ec.SECP384R1()),
                                                 kid="reader-1"))
    assert_token_refused(r, "invalid_client", status=401)


def test_expired_assertion(clients):
    now = int(time.time())
    r = clients.token_response(clients.assertion("reader", exp=now - 120, iat=now - 300))
    assert_token_refused(r, "invalid_client", status=401)
    assert "expired" in r.json()["error_description"]


def test_exp_too_far_ahead(clients):
    r = clients.token_response(clients.assertion("reader", exp=int(time.time()) + 3600))
    assert_token_refused(r, "invalid_client", status=401)


def test_future_nbf(clients):
    r = clients.token_response(clients.assertion("reader", nbf=int(time.time()) + 120))
    assert_token_refused(r, "invalid_client", status=401)


def test_future_iat(clients):
    r = clients.token_response(clients.assertion("reader", iat=int(time.time()) + 120))
    assert_token_refused(r, "invalid_client", status=401)


def test_wrong_audience(clients):
    r = clients.token_response(clients.assertion("reader", aud="https://api.service.nhs.uk/oauth2/token"))
    assert_token_refused(r, "invalid_client", status=401)
    assert "aud" in r.json()["error_description"]


def test_iss_differs_from_sub(clients):
    r = clients.token_response(clients.assertion("reader", sub="full"))
    assert_token_refused(r, "invalid_client", status=401)


def test_unknown_client(clients):
    key = rsa_key()
    r = clients.token_response(clients.assertion("nobody", key=key, kid="nobody-1"))
    assert_token_refused(r, "invalid_client", status=401)


def test_unknown_kid(clients):
    key, _ = clients.keys["reader"]
    r = clients.token_response(clients.assertion("reader", key=key, kid="reader-9"))
    assert_token_refused(r, "invalid_client", status=401)
    assert "kid" in r.json()["error_description"]


def test_missing_jti(clients):
    assert_token_refused(clients.token_response(clients.assertion("reader", jti=None)), "invalid_client",
                         status=401)


def test_replayed_jti(clients):
    a = clients.assertion("reader")
    assert clients.token_response(a).status_code == 200
    assert_token_refused(clients.token_response(a), "invalid_grant", status=400)


def test_scope_beyond_the_grant(clients):
    r = clients.token_response(clients.assertion("reader"), scope="system/Patient.rs system/Patient.d")
    assert_token_refused(r, "invalid_scope", status=400)
    r = clients.token_response(clients.assertion("reader"), scope="admin")
    assert_token_refused(r, "invalid_scope", status=400)


# --- Bearer tokens on the API ---------------------------------------------------------------------------------


def test_missing_token(clients, patient):
    for path in [f"/fhir/Patient/{patient['id']}", "/fhir/Patient", "/events", "/metrics", "/admin/deliveries",
                 "/fhir/AuditEvent", "/fhir/NoSuchType"]:
        assert_401(clients.call("GET", path))


def test_malformed_and_foreign_tokens(clients, patient):
    path = f"/fhir/Patient/{patient['id']}"
    for bad in ["abc", "a.b.c", clients.assertion("reader")]:
        assert_401(clients.call("GET", path, bad))
    r = requests.get(clients.base + path, headers={"Authorization": "Basic YWRtaW46YWRtaW4="}, timeout=30)
    assert_401(r)


def test_tampered_access_token_scope(clients, admin, patient):
    t = clients.token("reader")
    head, payload, sig = t.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "system/*.cruds admin"
    forged = head + "." + b64url(json.dumps(claims).encode()) + "." + sig
    assert_401(clients.call("DELETE", f"/fhir/Patient/{patient['id']}", forged))
    unchanged(clients, admin, patient)


def test_token_of_another_hub_is_refused(clients, tmp_path_factory, admin, patient):
    other = start_server(tmp_path_factory, "other-hub", auth=True)
    try:
        other_hub = Hub(other, tmp_path_factory.mktemp("other-keys"))
        other_hub.keys["admin"] = (other_hub.admin_key, "admin-1")
        foreign = other_hub.admin_token()
        assert other_hub.call("GET", "/fhir/Patient", foreign).status_code == 200
    finally:
        stop_server(other)
    assert_401(clients.call("GET", f"/fhir/Patient/{patient['id']}", foreign))
    assert_401(clients.call("DELETE", f"/fhir/Patient/{patient['id']}", foreign))
    unchanged(clients, admin, patient)


def test_missing_scope_create(clients, admin, patient):
    before = patient_count(clients, admin)
    r = clients.call("POST", "/fhir/Patient", clients.token("reader"),
                     {"resourceType": "Patient", "name": [{"family": "Intruder"}]})
    assert_403(r, "system/Patient.c")
    assert patient_count(clients, admin) == before


def test_missing_scope_read(clients, patient):
    assert_403(clients.call("GET", f"/fhir/Patient/{patient['id']}", clients.token("searcher")), "system/Patient.r")


def test_missing_scope_vread_and_history(clients, patient):
    t = clients.token("searcher")
    assert_403(clients.call("GET", f"/fhir/Patient/{patient['id']}/_history", t), "system/Patient.r")
    assert_403(clients.call("GET", f"/fhir/Patient/{patient['id']}/_history/1", t), "system/Patient.r")
    assert_403(clients.call("GET", "/fhir/Patient/_history", t), "system/Patient.r")


def test_missing_scope_update(clients, admin, patient):
    changed = dict(patient, name=[{"family": "Overwritten"}])
    assert_403(clients.call("PUT", f"/fhir/Patient/{patient['id']}", clients.token("reader"), changed),
               "system/Patient.u")
    r = requests.patch(clients.base + f"/fhir/Patient/{patient['id']}",
                       headers={"Authorization": f"Bearer {clients.token('reader')}",
                                "Content-Type": "application/json-patch+json"},
                       data=json.dumps([{"op": "replace", "path": "/gender", "value": "male"}]), timeout=30)
    assert_403(r, "system/Patient.u")
    unchanged(clients, admin, patient)


def test_missing_scope_delete(clients, admin, patient):
    assert_403(clients.call("DELETE", f"/fhir/Patient/{patient['id']}", clients.token("reader")),
               "system/Patient.d")
    unchanged(clients, admin, patient)


def test_missing_scope_search(clients, patient):
    t = clients.token("creator")
    assert_403(clients.call("GET", f"/fhir/Patient?family={SECRET_NAME}", t), "system/Patient.s")
    r = requests.post(clients.base + "/fhir/Patient/_search", data={"family": SECRET_NAME},
                      headers={"Authorization": f"Bearer {t}"}, timeout=30)
    assert_403(r, "system/Patient.s")
    # Another type than the one granted.
    assert_403(clients.call("GET", "/fhir/Appointment", clients.token("reader")), "system/Appointment.s")


def test_include_needs_read_on_the_included_type(clients):
    t = clients.token("reader")
    assert_403(clients.call("GET", "/fhir/Patient?_revinclude=Appointment:patient", t), "system/Appointment.r")
    assert_403(clients.call("GET", "/fhir/Patient?_include=Patient:general-practitioner", t), "system/*.r")


def test_missing_scope_events(clients):
    assert_403(clients.call("GET", "/events?after=0", clients.token("reader")), "system/*.r")


def test_missing_scope_admin_metrics_audit_replay(clients):
    t = clients.token("full")  # every FHIR permission, but not admin
    assert_403(clients.call("GET", "/admin/deliveries", t), "admin")
    assert_403(clients.call("GET", "/metrics", t), "admin")
    assert_403(clients.call("GET", "/fhir/AuditEvent", t), "admin")
    assert_403(clients.call("POST", "/fhir/Subscription/x/$replay", t,
                            {"resourceType": "Parameters", "parameter": []}), "admin")


def test_missing_scope_in_a_bundle_entry(clients, admin, patient):
    before = patient_count(clients, admin)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Bundled"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": f"Patient/{patient['id']}"}}]}
    t = clients.token("creator")
    assert_403(clients.call("POST", "/fhir", t, bundle), "system/Patient.d")
    assert patient_count(clients, admin) == before
    unchanged(clients, admin, patient)


def test_full_client_can_do_fhir_but_events_need_cross_org(clients, admin):
    t = clients.token("full")
    r = clients.call("POST", "/fhir/Organization", t, {"resourceType": "Organization", "name": "Full Org"})
    assert r.status_code == 201, describe(r)
    # The feed carries every organisation's changes: system/*.r is not enough without cross-org.
    assert_403(clients.call("GET", "/events?after=0", t), "cross-org")
    assert clients.call("GET", "/events?after=0", admin).status_code == 200


# --- revocation, key rotation, rate limits, auth none ----------------------------------------------------------


def test_revoked_client(clients, admin, patient):
    clients.add_client("leaver", "system/Patient.rs system/Patient.cud", ods="RB2")
    t = clients.token("leaver")
    assert clients.call("GET", f"/fhir/Patient/{patient['id']}", t).status_code == 200
    clients.cli("clients", "revoke", "--id", "leaver")
    # New tokens: refused at once.
    assert_token_refused(clients.token_response(clients.assertion("leaver")), "invalid_client", status=401)
    # Existing tokens: refused once the per-process cache (1 s) has expired.
    time.sleep(1.3)
    assert_401(clients.call("GET", f"/fhir/Patient/{patient['id']}", t))
    assert_401(clients.call("DELETE", f"/fhir/Patient/{patient['id']}", t))
    unchanged(clients, admin, patient)
    assert "REVOKED" in clients.cli("clients", "list").stdout


def test_key_rotation_overlaps_then_removes(clients, tmp_path, patient):
    old_key, old_kid = clients.add_client("rotator", "system/Patient.r")
    new_key = ec.generate_private_key(ec.SECP384R1())
    jwks = tmp_path / "new.jwks"
    jwks.write_text(json.dumps({"keys": [jwk_of(new_key, "rotator-2")]}))
    clients.cli("clients", "rotate-key", "--id", "rotator", "--jwks", str(jwks))
    # Both keys work during the overlap.
    assert clients.token_response(clients.assertion("rotator", key=old_key, kid=old_kid)).status_code == 200
    r = clients.token_response(clients.assertion("rotator", key=new_key, kid="rotator-2"))
    assert r.status_code == 200, describe(r)
    clients.cli("clients", "rotate-key", "--id", "rotator", "--remove-kid", old_kid)
    r = clients.token_response(clients.assertion("rotator", key=old_key, kid=old_kid))
    assert_token_refused(r, "invalid_client", status=401)
    assert clients.token_response(clients.assertion("rotator", key=new_key, kid="rotator-2")).status_code == 200
    out = clients.cli("clients", "rotate-key", "--id", "rotator", "--remove-kid", "rotator-2", check=False)
    assert out.returncode != 0, "removing the last key must be refused"


def test_rate_limit(clients, patient):
    clients.add_client("chatty", "system/Patient.r", ods="RB2", extra=("--rate-limit", "5"))
    t = clients.token("chatty")
    codes = [clients.call("GET", f"/fhir/Patient/{patient['id']}", t) for _ in range(20)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert int(limited[0].headers["Retry-After"]) >= 1
    no_leak(limited[0])
    # Another client is not affected.
    assert clients.call("GET", f"/fhir/Patient/{patient['id']}", clients.token("reader")).status_code == 200


def test_auth_none_refused_off_loopback(tmp_path):
    out = subprocess.run([str(_binary()), "serve", "--http", "0.0.0.0:0", "--auth", "none", "--data-dir",
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")})
    assert out.returncode != 0
    assert "loopback" in out.stderr
    assert "listening" not in out.stdout


# --- audit trail ------------------------------------------------------------------------------------------------


def test_audit_trail(clients, admin, patient):
    corr = "audit-" + uuid.uuid4().hex
    t = clients.token("reader")
    assert clients.call("GET", f"/fhir/Patient/{patient['id']}", t, headers={"X-Correlation-ID": corr}).status_code == 200
    assert clients.call("DELETE", f"/fhir/Patient/{patient['id']}", t,
                        headers={"X-Correlation-ID": corr}).status_code == 403
    records = []
    for _ in range(50):
        r = clients.call("GET", "/fhir/AuditEvent?agent=reader&_count=200", admin)
        assert r.status_code == 200, describe(r)
        records = [e["resource"] for e in r.json().get("entry", [])
                   if any(x.get("what", {}).get("identifier", {}).get("value") == corr for x in e["resource"].get("entity", []))]
        if len(records) >= 2:
            break
        time.sleep(0.1)
    assert len(records) == 2, records
    by_outcome = {e["outcome"]: e for e in records}
    read = by_outcome["0"]
    assert read["action"] == "R" and read["subtype"][0]["code"] == "read"
    assert {"reference": f"Patient/{patient['id']}"} in [x["what"] for x in read["entity"]]
    agents = [a["who"]["identifier"]["value"] for a in read["agent"]]
    assert agents == ["reader", "RB2"]
    refused = by_outcome["4"]
    assert refused["action"] == "D" and "403" in refused["outcomeDesc"]
    # Audit records never carry names or NHS numbers.
    assert SECRET_NAME not in r.text and NHS not in r.text
    # Token issues are audited too, and a record can be read by id.
    r = clients.call("GET", "/fhir/AuditEvent?subtype=token&_count=5", admin)
    assert r.status_code == 200 and r.json()["entry"], describe(r)
    one = r.json()["entry"][0]["resource"]
    r = clients.call("GET", f"/fhir/AuditEvent/{one['id']}", admin)
    assert r.status_code == 200 and r.json() == one


def test_audit_trail_is_append_only(clients, admin):
    r = clients.call("GET", "/fhir/AuditEvent?_count=1", admin)
    one = r.json()["entry"][0]["resource"]
    for method, path, body in [("POST", "/fhir/AuditEvent", one), ("PUT", f"/fhir/AuditEvent/{one['id']}", one),
                               ("DELETE", f"/fhir/AuditEvent/{one['id']}", None)]:
        r = clients.call(method, path, admin, body)
        assert r.status_code in (404, 405), describe(r)
    assert clients.call("GET", f"/fhir/AuditEvent/{one['id']}", admin).json() == one


def test_logs_do_not_contain_names_or_nhs_numbers(clients):
    log = clients.srv.log()
    assert SECRET_NAME not in log and NHS not in log


def test_encoded_paths_and_head_do_not_bypass_scopes(clients, admin, patient):
    t = clients.token("searcher")  # system/Patient.s only
    assert_403(clients.call("GET", f"/fhir/%50atient/{patient['id']}", t), "system/Patient.r")
    r = requests.head(clients.base + f"/fhir/Patient/{patient['id']}", headers={"Authorization": f"Bearer {t}"},
                      timeout=30)
    assert r.status_code == 403 and "ETag" not in r.headers, r.headers
    creator = clients.token("creator")
    assert_403(clients.call("GET", f"/fhir/Patient?%5Frevinclude=Appointment:patient", clients.token("reader")),
               "system/Appointment.r")
    assert_403(clients.call("DELETE", f"/fhir/Patient/%{ord(patient['id'][0]):02X}{patient['id'][1:]}", creator),
               "system/Patient.d")
    unchanged(clients, admin, patient)
