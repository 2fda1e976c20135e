"""Carebridge as a client of NHS APIs (`carebridge outbound`): the NHS API Platform's signed-JWT flow with
environment profiles.

The platform itself cannot be reached from here, so its token endpoint is simulated from its published rules
(RS512 only, `kid`, `iss` = `sub` = the API key, `aud` = the exact token URL, `exp` at most 5 minutes ahead,
single-use `jti`; `expires_in` sent as a string), with PyJWT verifying each assertion against the registered
public key. The same flow is also run against the hub's own token endpoint, which implements the pattern."""

import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from conftest import _binary, start_server, stop_server

API_KEY = "AppApiKey0123456789"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class Platform:
    """A simulated API Platform: /oauth2/token and one protected resource."""

    def __init__(self, public_key, kid):
        self.public_key = public_key
        self.kid = kid
        self.token_requests = 0
        self.refusals = []
        self.jtis = set()
        self.issued = set()
        self.api_calls = 0
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                platform.token_requests += 1
                try:
                    status, body = platform.token(form, f"{platform.url}/oauth2/token")
                except Exception as e:  # noqa: BLE001 - any failure is a refusal with its reason
                    status, body = 400, {"error": "invalid_request", "error_description": str(e)}
                if status != 200:
                    platform.refusals.append(body["error_description"])
                self.reply(status, body)

            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer ") or auth[7:] not in platform.issued:
                    self.reply(401, {"issue": [{"code": "forbidden"}]})
                    return
                platform.api_calls += 1
                self.reply(200, {"resourceType": "Patient", "id": self.path.rsplit("/", 1)[-1]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, form, token_url):
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type", "error_description": "grant_type"}
        if form.get("client_assertion_type") != [ASSERTION_TYPE]:
            return 400, {"error": "invalid_request", "error_description": "client_assertion_type"}
        assertion = form["client_assertion"][0]
        header = jwt.get_unverified_header(assertion)
        if header.get("alg") != "RS512":
            return 400, {"error": "invalid_request", "error_description": "Invalid alg: RS512 only"}
        if header.get("kid") != self.kid:
            return 401, {"error": "invalid_request", "error_description": "Invalid 'kid' header in JWT"}
        claims = jwt.decode(assertion, self.public_key, algorithms=["RS512"], audience=token_url,
                            options={"require": ["exp", "iss", "sub", "aud", "jti"]})
        if claims["iss"] != API_KEY or claims["sub"] != API_KEY:
            return 401, {"error": "invalid_request", "error_description": "Invalid iss/sub claims in JWT"}
        if claims["exp"] > time.time() + 300:
            return 400, {"error": "invalid_request", "error_description": "Invalid exp claim in JWT - more than 5 minutes in future"}
        if claims["jti"] in self.jtis:
            return 400, {"error": "invalid_request", "error_description": "Non-unique jti claim in JWT"}
        self.jtis.add(claims["jti"])
        token = uuid.uuid4().hex
        self.issued.add(token)
        return 200, {"access_token": token, "expires_in": "599", "token_type": "Bearer",
                     "issued_at": str(int(time.time() * 1000))}

    def close(self):
        self.server.shutdown()


def config(tmp_path, keys, profiles):
    """Write an [outbound] configuration; keys: (kid, environment, private key); profiles: dicts."""
    lines = []
    for kid, env, key in keys:
        f = tmp_path / f"{kid}.pem"
        f.write_text(pem(key))
        lines += ["[[outbound.keys]]", f'kid = "{kid}"', f'environment = "{env}"', f'private_key = "{f.name}"', ""]
    for p in profiles:
        lines.append("[[outbound.profiles]]")
        lines += [f'{k} = "{v}"' for k, v in p.items()]
        lines.append("")
    path = tmp_path / "carebridge.toml"
    path.write_text("\n".join(lines))
    return path


def outbound(cfg, *args):
    return subprocess.run([str(_binary()), "outbound", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=60)


def test_one_token_serves_many_calls_and_passes_the_platform_checks(tmp_path):
    key = new_key()
    platform = Platform(key.public_key(), "int-1")
    try:
        cfg = config(tmp_path, [("int-1", "int", key)],
                     [{"name": "int", "environment": "int", "api_key": API_KEY, "kid": "int-1",
                       "base_url": platform.url}])
        out = outbound(cfg, "get", "--profile", "int", "Patient/9000000009", "Patient/9000000017",
                       "Patient/9000000025")
        assert out.returncode == 0, out.stderr
        assert platform.refusals == []
        assert platform.token_requests == 1, "the token is cached for the three calls"
        assert platform.api_calls == 3
        assert out.stdout.count("200 Patient/") == 3
        assert '"id": "9000000017"' in out.stdout or '"id":"9000000017"' in out.stdout
        # A second process signs a new assertion with a fresh jti (the platform refuses a replayed one).
        out = outbound(cfg, "token", "--profile", "int")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() in platform.issued
        assert platform.token_requests == 2 and len(platform.jtis) == 2
    finally:
        platform.close()


def test_a_refusal_from_the_token_endpoint_is_reported(tmp_path):
    registered, other = new_key(), new_key()
    platform = Platform(registered.public_key(), "int-1")
    try:
        # Signed with a key the platform does not know under that kid: its signature check fails.
        cfg = config(tmp_path, [("int-1", "int", other)],
                     [{"name": "int", "environment": "int", "api_key": API_KEY, "kid": "int-1",
                       "base_url": platform.url}])
        out = outbound(cfg, "get", "--profile", "int", "Patient/9000000009")
        assert out.returncode == 2
        assert "Signature verification failed" in out.stderr, out.stderr
        assert platform.api_calls == 0
    finally:
        platform.close()


def test_a_key_of_one_environment_is_refused_for_another(tmp_path):
    prod_key = new_key()
    cfg = config(tmp_path, [("prod-1", "prod", prod_key)],
                 [{"name": "int", "environment": "int", "api_key": API_KEY, "kid": "prod-1"}])
    out = outbound(cfg, "check")
    assert out.returncode == 2
    assert "is for int but key 'prod-1' was registered for prod" in out.stderr, out.stderr
    # The same key material under two environments is refused too.
    both = tmp_path / "both"
    both.mkdir()
    cfg2 = config(both, [("int-1", "int", prod_key), ("prod-1", "prod", prod_key)], [])
    out = outbound(cfg2, "check")
    assert out.returncode == 2 and "same key" in out.stderr, out.stderr
    # serve refuses such a configuration at start-up.
    out = subprocess.run([str(_binary()), "serve", "--config", str(cfg), "--http", "127.0.0.1:0",
                          "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=60,
                         env={"CAREBRIDGE_AUTH": "none", "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "registered for prod" in out.stderr, out.stderr


def test_profiles_check_lists_environments(tmp_path):
    cfg = config(tmp_path, [("int-1", "int", new_key()), ("prod-1", "prod", new_key())],
                 [{"name": "int", "environment": "int", "api_key": API_KEY, "kid": "int-1"},
                  {"name": "live", "environment": "prod", "api_key": "LiveKey", "kid": "prod-1"}])
    out = outbound(cfg, "check")
    assert out.returncode == 0, out.stderr
    assert "int: int via https://int.api.service.nhs.uk/oauth2/token" in out.stdout
    assert "live: prod via https://api.service.nhs.uk/oauth2/token" in out.stdout


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    srv = start_server(tmp_path_factory, "outbound-hub", auth=True)
    yield srv
    stop_server(srv)


def test_against_a_real_token_endpoint_the_hubs_own(hub, tmp_path):
    """Another Carebridge hub implements the same pattern: register the outbound key there and call it."""
    key = new_key()
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="int-1", use="sig")
    jwks = tmp_path / "app.jwks"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    out = subprocess.run([str(_binary()), "clients", "add", "--id", API_KEY, "--ods", "X26", "--scopes",
                          "system/Patient.rs", "--jwks", str(jwks), "--data-dir", str(hub.data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = config(tmp_path, [("int-1", "int", key)],
                 [{"name": "int", "environment": "int", "api_key": API_KEY, "kid": "int-1",
                   "base_url": hub.base_url}])
    out = outbound(cfg, "get", "--profile", "int", "fhir/Patient?_count=1", "fhir/Appointment")
    assert "200 fhir/Patient?_count=1" in out.stdout, out.stdout + out.stderr
    assert "403 fhir/Appointment" in out.stdout, "scopes granted by the hub are enforced"
    assert out.returncode == 1
    assert "2 request(s), 1 token request(s)" in out.stderr
