"""The token flow driven by PyJWT (a JOSE library from another ecosystem) as the client: RS512 and ES384
assertions, the NHS API Platform request shape, and the access token read back with PyJWT."""

import json
import time
import uuid

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from conftest import _binary, describe, start_server, stop_server

import subprocess

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    srv = start_server(tmp_path_factory, "pyjwt", auth=True)
    yield srv
    stop_server(srv)


def register(srv, tmp_path, cid, key, kid, scopes):
    pub = key.public_key()
    jwk = json.loads((RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm).to_jwk(pub))
    jwk.update(kid=kid, use="sig")
    f = tmp_path / f"{cid}.jwks"
    f.write_text(json.dumps({"keys": [jwk]}))
    out = subprocess.run([str(_binary()), "clients", "add", "--id", cid, "--ods", "X26", "--scopes", scopes,
                          "--jwks", str(f), "--name", f"PyJWT {cid}", "--data-dir", str(srv.data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def get_token(srv, cid, key, kid, alg):
    token_url = srv.base_url + "/oauth2/token"
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": cid, "sub": cid, "aud": token_url, "jti": str(uuid.uuid4()), "exp": now + 300},
        key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
    r = requests.post(token_url, data={"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                                       "client_assertion": assertion}, timeout=30)
    assert r.status_code == 200, describe(r)
    return r.json()


@pytest.mark.parametrize("alg", ["RS512", "ES384"])
def test_pyjwt_client(hub, tmp_path, alg):
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072) if alg == "RS512" \
        else ec.generate_private_key(ec.SECP384R1())
    cid = f"pyjwt-{alg.lower()}"
    register(hub, tmp_path, cid, key, f"{cid}-k1", "system/Patient.cruds system/Appointment.rs")
    body = get_token(hub, cid, key, f"{cid}-k1", alg)
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "system/Patient.cruds system/Appointment.rs"
    assert body["expires_in"] == 300
    # The access token is a JWT: PyJWT reads its claims (the signature is the hub's own secret).
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"
    assert claims["client_id"] == cid and claims["sub"] == cid
    assert claims["org"] == "X26"
    assert claims["iss"] == hub.base_url
    assert claims["exp"] - claims["iat"] == 300
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    r = requests.post(hub.base_url + "/fhir/Patient", headers={**auth, "Content-Type": "application/fhir+json"},
                      data=json.dumps({"resourceType": "Patient", "name": [{"family": "Jwt"}]}), timeout=30)
    assert r.status_code == 201, describe(r)
    r = requests.get(hub.base_url + "/fhir/Appointment", headers=auth, timeout=30)
    assert r.status_code == 200, describe(r)
    r = requests.delete(hub.base_url + "/fhir/Appointment/x", headers=auth, timeout=30)
    assert r.status_code == 403, describe(r)


def test_pyjwt_rs256_is_refused(hub, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    register(hub, tmp_path, "pyjwt-rs256", key, "k1", "system/Patient.r")
    token_url = hub.base_url + "/oauth2/token"
    now = int(time.time())
    for alg in ["RS256", "PS512"]:
        assertion = jwt.encode({"iss": "pyjwt-rs256", "sub": "pyjwt-rs256", "aud": token_url,
                                "jti": str(uuid.uuid4()), "exp": now + 60}, key, algorithm=alg, headers={"kid": "k1"})
        r = requests.post(token_url, data={"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                                           "client_assertion": assertion}, timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", describe(r)
