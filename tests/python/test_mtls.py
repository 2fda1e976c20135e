"""TLS and mutual TLS on the HTTP listener, RFC 8705 certificate-bound tokens, and JWKS URLs.

Certificates are made here with `cryptography`: a CA the hub trusts for clients (which also signs the server
certificate), two client certificates it signed, and a "stranger" certificate from another CA. Clients use
`requests`, verifying the hub against the CA.
"""

import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import subprocess
import threading
import time
import uuid

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import FHIR_JSON, _binary, describe, run_cli, start_server, stop_server
from test_security import jwk_of

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path, key):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


class Pki:
    """CA, server and client certificates in a directory: <name>.pem and <name>.key."""

    def __init__(self, d):
        self.d = d
        now = datetime.datetime.now(datetime.timezone.utc)
        self.start, self.end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)
        self.ca = self._ca("ca", "Carebridge Test CA")
        self.other = self._ca("other", "Other CA")
        self.leaf("server", self.ca, server=True)
        for name in ("client", "client2"):
            self.leaf(name, self.ca)
        self.leaf("stranger", self.other)

    def _ca(self, name, cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(self.start).not_valid_after(self.end)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        (self.d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.d / f"{name}.key", key)
        return cert, key

    def leaf(self, name, issuer, server=False):
        ca_cert, ca_key = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(self.start).not_valid_after(self.end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        (self.d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.d / f"{name}.key", key)
        return cert

    def path(self, name):
        return str(self.d / name)

    def cert(self, name):
        """requests' cert= for a client certificate."""
        return (self.path(f"{name}.pem"), self.path(f"{name}.key"))

    def thumbprint(self, name):
        cert = x509.load_pem_x509_certificate((self.d / f"{name}.pem").read_bytes())
        return b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


class Hub:
    def __init__(self, srv, pki, tmp):
        self.srv, self.pki, self.tmp = srv, pki, tmp
        self.base = srv.base_url
        self.token_url = self.base + "/oauth2/token"
        self.admin_key = serialization.load_pem_private_key(
            (srv.data_dir / "admin-client-key.pem").read_bytes(), password=None)

    def cli(self, *args, check=True):
        return run_cli(self.srv, *args, check=check)

    def add_client(self, cid, scopes="system/Patient.rs", key=None, kid=None, jwks=None, extra=()):
        key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = kid or f"{cid}-1"
        if jwks is None:
            path = self.tmp / f"{cid}.jwks"
            path.write_text(json.dumps({"keys": [jwk_of(key, kid)]}))
            jwks = str(path)
        self.cli("clients", "add", "--id", cid, "--ods", "RA1", "--scopes", scopes, "--jwks", jwks, *extra)
        return key, kid

    def assertion(self, cid, key, kid):
        now = int(time.time())
        return jwt.encode({"iss": cid, "sub": cid, "aud": self.token_url, "jti": uuid.uuid4().hex,
                           "iat": now, "exp": now + 120}, key, algorithm="RS512", headers={"kid": kid, "typ": "JWT"})

    def token_response(self, cid, key, kid, cert=None):
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(cid, key, kid)}
        return requests.post(self.token_url, data=form, timeout=30, verify=self.pki.path("ca.pem"), cert=cert)

    def get(self, path, token=None, cert=None):
        h = {"Accept": FHIR_JSON}
        if token:
            h["Authorization"] = f"Bearer {token}"
        return requests.get(self.base + path, headers=h, timeout=30, verify=self.pki.path("ca.pem"), cert=cert)


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory, pki):
    """HTTPS without client certificates."""
    srv = start_server(tmp_path_factory, "tls", auth=True, extra_args=[
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key")])
    yield Hub(srv, pki, tmp_path_factory.mktemp("tls-keys"))
    stop_server(srv)


@pytest.fixture(scope="module")
def mtls_hub(tmp_path_factory, pki):
    """HTTPS with client certificates from the test CA required (configured through the environment)."""
    srv = start_server(tmp_path_factory, "mtls", auth=True, env_extra={
        "CAREBRIDGE_TLS_CERT": pki.path("server.pem"), "CAREBRIDGE_TLS_KEY": pki.path("server.key"),
        "CAREBRIDGE_CLIENT_CA": pki.path("ca.pem")})
    yield Hub(srv, pki, tmp_path_factory.mktemp("mtls-keys"))
    stop_server(srv)


def test_https_with_a_verified_server_certificate(tls_hub):
    assert tls_hub.base.startswith("https://127.0.0.1:"), tls_hub.base
    r = tls_hub.get("/health")
    assert r.status_code == 200, describe(r)
    # The FHIR base and token audience are https too.
    r = tls_hub.get("/fhir/metadata")
    assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement"
    # The server certificate is checked: not trusted without the CA, and plain HTTP is not served.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_hub.base + "/health", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(tls_hub.base.replace("https://", "http://") + "/health", timeout=10)


def test_token_command_over_https(tls_hub):
    out = subprocess.run([str(_binary()), "token", "--key", str(tls_hub.srv.data_dir / "admin-client-key.pem"),
                          "--url", tls_hub.base, "--cacert", tls_hub.pki.path("ca.pem")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = tls_hub.get("/fhir/Patient", out.stdout.strip())
    assert r.status_code == 200, describe(r)


def test_a_bound_client_without_mutual_tls_gets_no_token(tls_hub):
    key, kid = tls_hub.add_client("bound-nomtls", extra=("--cert", tls_hub.pki.path("client.pem")))
    r = tls_hub.token_response("bound-nomtls", key, kid)
    assert r.status_code == 401, describe(r)
    body = r.json()
    assert body["error"] == "invalid_client" and "mutual TLS" in body["error_description"], body
    assert "access_token" not in body


def test_client_certificates_are_required_at_the_handshake(mtls_hub):
    assert mtls_hub.get("/health", cert=mtls_hub.pki.cert("client")).status_code == 200
    assert mtls_hub.get("/health", cert=mtls_hub.pki.cert("client2")).status_code == 200
    for cert in (None, mtls_hub.pki.cert("stranger")):
        with pytest.raises(requests.exceptions.ConnectionError):
            mtls_hub.get("/health", cert=cert)


def test_certificate_bound_tokens(mtls_hub):
    pki = mtls_hub.pki
    thumb = pki.thumbprint("client")
    key, kid = mtls_hub.add_client("bound", scopes="system/Patient.rs", extra=("--cert", pki.path("client.pem")))
    listed = [json.loads(line) for line in mtls_hub.cli("clients", "list", "--json").stdout.splitlines()]
    assert next(c for c in listed if c["id"] == "bound")["cert_thumbprint"] == thumb
    # Over mutual TLS with the bound certificate: a token carrying cnf.x5t#S256.
    r = mtls_hub.token_response("bound", key, kid, cert=pki.cert("client"))
    assert r.status_code == 200, describe(r)
    token = r.json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["cnf"] == {"x5t#S256": thumb}
    r = mtls_hub.get("/fhir/Patient", token, cert=pki.cert("client"))
    assert r.status_code == 200, describe(r)
    # The same token on a connection with another (trusted) certificate: 401 invalid_token.
    r = mtls_hub.get("/fhir/Patient", token, cert=pki.cert("client2"))
    assert r.status_code == 401, describe(r)
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"], r.headers
    assert "entry" not in r.text
    # A token request with another trusted certificate is refused.
    r = mtls_hub.token_response("bound", key, kid, cert=pki.cert("client2"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client", describe(r)
    assert "access_token" not in r.json()


def test_unbound_tokens_work_with_any_trusted_certificate(mtls_hub):
    pki = mtls_hub.pki
    key, kid = mtls_hub.add_client("free", scopes="system/Patient.rs")
    r = mtls_hub.token_response("free", key, kid, cert=pki.cert("client"))
    assert r.status_code == 200, describe(r)
    token = r.json()["access_token"]
    assert "cnf" not in jwt.decode(token, options={"verify_signature": False})
    assert mtls_hub.get("/fhir/Patient", token, cert=pki.cert("client2")).status_code == 200


def test_rebinding_and_unbinding_a_client(mtls_hub):
    pki = mtls_hub.pki
    key, kid = mtls_hub.add_client("rebind", extra=("--cert-thumbprint", pki.thumbprint("client")))
    assert mtls_hub.token_response("rebind", key, kid, cert=pki.cert("client2")).status_code == 401
    mtls_hub.cli("clients", "rotate-key", "--id", "rebind", "--cert", pki.path("client2.pem"))
    r = mtls_hub.token_response("rebind", key, kid, cert=pki.cert("client2"))
    assert r.status_code == 200, describe(r)
    assert jwt.decode(r.json()["access_token"], options={"verify_signature": False})["cnf"] == {
        "x5t#S256": pki.thumbprint("client2")}
    assert mtls_hub.token_response("rebind", key, kid, cert=pki.cert("client")).status_code == 401
    mtls_hub.cli("clients", "rotate-key", "--id", "rebind", "--unbind-cert")
    r = mtls_hub.token_response("rebind", key, kid, cert=pki.cert("client"))
    assert r.status_code == 200, describe(r)
    assert "cnf" not in jwt.decode(r.json()["access_token"], options={"verify_signature": False})


def test_bad_bindings_are_refused_by_the_cli(mtls_hub, tmp_path):
    for extra in (("--cert-thumbprint", "not-a-thumbprint"), ("--cert-thumbprint", "ab" * 32),
                  ("--cert", str(tmp_path / "missing.pem"))):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        f = tmp_path / "k.jwks"
        f.write_text(json.dumps({"keys": [jwk_of(key, "k1")]}))
        out = mtls_hub.cli("clients", "add", "--id", "badbind", "--ods", "RA1", "--scopes", "system/Patient.r",
                           "--jwks", str(f), *extra, check=False)
        assert out.returncode != 0, out.stdout
    assert "badbind" not in mtls_hub.cli("clients", "list").stdout


class JwksServer:
    """A local key server: path -> (status, JWKS), counting requests per path."""

    def __init__(self):
        self.docs = {}
        self.hits = {}
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                status, doc = outer.docs.get(self.path, (404, {}))
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "max-age=300")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def jwks_server():
    s = JwksServer()
    yield s
    s.close()


def test_jwks_url_with_rotation_by_unknown_kid(tls_hub, jwks_server):
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.docs["/rot.json"] = (200, {"keys": [jwk_of(k1, "k1")]})
    tls_hub.add_client("byurl", jwks=jwks_server.url + "/rot.json")
    assert jwks_server.url + "/rot.json" in tls_hub.cli("clients", "list").stdout
    before = jwks_server.hits["/rot.json"]  # the CLI checked the URL
    for _ in range(3):
        r = tls_hub.token_response("byurl", k1, "k1")
        assert r.status_code == 200, describe(r)
    assert jwks_server.hits["/rot.json"] == before + 1, "fetched once, then cached"
    # Rotation: the key server now has k2 only. An unknown kid refetches (at most once per 5 s per URL).
    jwks_server.docs["/rot.json"] = (200, {"keys": [jwk_of(k2, "k2")]})
    time.sleep(5.2)
    r = tls_hub.token_response("byurl", k2, "k2")
    assert r.status_code == 200, describe(r)
    assert jwks_server.hits["/rot.json"] == before + 2
    # The old key is gone from the refetched set; made-up kids do not trigger more fetches meanwhile.
    for kid in ("k1", "k9", "k10"):
        key = k1 if kid == "k1" else k2
        r = tls_hub.token_response("byurl", key, kid)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", describe(r)
        assert kid in r.json()["error_description"]
    assert jwks_server.hits["/rot.json"] == before + 2, "unknown kids are rate-limited"


def test_unreachable_jwks_url_is_refused_clearly(tls_hub, jwks_server):
    out = tls_hub.cli("clients", "add", "--id", "nourl", "--ods", "RA1", "--scopes", "system/Patient.r",
                      "--jwks", jwks_server.url + "/missing.json", check=False)
    assert out.returncode != 0 and "404" in out.stderr, out.stderr
    out = tls_hub.cli("clients", "add", "--id", "nourl", "--ods", "RA1", "--scopes", "system/Patient.r",
                      "--jwks", "http://127.0.0.1:1/jwks.json", check=False)
    assert out.returncode != 0 and "JWKS URL" in out.stderr, out.stderr
    # Registered while the key server worked; it fails when the hub first needs the keys.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.docs["/down.json"] = (200, {"keys": [jwk_of(key, "d1")]})
    tls_hub.add_client("downurl", jwks=jwks_server.url + "/down.json")
    jwks_server.docs["/down.json"] = (503, {})
    r = tls_hub.token_response("downurl", key, "d1")
    assert r.status_code == 401, describe(r)
    body = r.json()
    assert body["error"] == "invalid_client" and "could not be fetched" in body["error_description"], body
    assert "503" in body["error_description"]
