"""Real-world FHIR JSON from <repo>/../shared/corpus/fhir/**: every example of a served type (a whole file, or an
entry of a Bundle file) is either stored losslessly (read back equal to what was sent, apart from id and meta)
or refused and listed with its reason: in <repo>/crates/fhir/tests/corpus-expected.json when the resource is
invalid FHIR/UK Core ("fhir/bars/x.json" or "fhir/pds/y.json#entry[0]" -> reason), or in
tests/python/corpus-business-refusals.json when it is valid but a business rule of the hub refuses it (key ->
{"status", "reason"}). The examples are loaded in file order into a hub of their own."""

import json

import pytest

from conftest import REPO, Raw, describe, start_server, stop_server
from helpers import TYPES

CORPUS = REPO.parent / "shared" / "corpus"
EXPECTED_FILE = REPO / "crates" / "fhir" / "tests" / "corpus-expected.json"
BUSINESS_FILE = REPO / "tests" / "python" / "corpus-business-refusals.json"


@pytest.fixture(scope="module")
def corpus_raw(tmp_path_factory):
    """A hub of its own, so the examples meet only each other (and the order is the file order)."""
    srv = start_server(tmp_path_factory, "corpus")
    yield Raw(srv.base_url + "/fhir")
    stop_server(srv)


def corpus_cases():
    """(key, resource) for every file holding a served type, and for every entry of a served type inside a
    Bundle file (key `fhir/x/y.json#entry[N]`, the form corpus-expected.json uses)."""
    root = CORPUS / "fhir"
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        rel = path.relative_to(CORPUS).as_posix()
        if data.get("resourceType") in TYPES:
            out.append((rel, data))
        elif data.get("resourceType") == "Bundle":
            for i, entry in enumerate(data.get("entry") or []):
                res = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(res, dict) and res.get("resourceType") in TYPES:
                    out.append((f"{rel}#entry[{i}]", res))
    return out


def expected_refusals() -> dict:
    if not EXPECTED_FILE.exists():
        return {}
    return json.loads(EXPECTED_FILE.read_text(encoding="utf-8"))


CASES = corpus_cases()


def strip(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


ODS_SYSTEMS = {
    "ods-organization-code": "https://fhir.nhs.uk/Id/ods-organization-code",
    "ods-organisation-code": "https://fhir.nhs.uk/Id/ods-organization-code",
    "ods-site-code": "https://fhir.nhs.uk/Id/ods-site-code",
}


def normalise_ods(value):
    """The one documented rewrite on input: ODS identifier systems take their canonical UK Core spelling."""
    if isinstance(value, dict):
        out = {k: normalise_ods(v) for k, v in value.items()}
        system = out.get("system")
        if isinstance(system, str) and system.lower().startswith("https://fhir.nhs.uk/id/"):
            tail = system.rsplit("/", 1)[-1].lower()
            if tail in ODS_SYSTEMS:
                out["system"] = ODS_SYSTEMS[tail]
        return out
    if isinstance(value, list):
        return [normalise_ods(v) for v in value]
    return value


@pytest.mark.parametrize("key,data", CASES or [("<none>", None)], ids=[k for k, _ in CASES] or ["<none>"])
def test_corpus_example(corpus_raw, key, data):
    raw = corpus_raw
    if not CASES:
        pytest.skip(f"no FHIR corpus: {CORPUS / 'fhir'} is absent or holds no JSON of a served type")
    sent = strip(data)
    refusals = expected_refusals()
    r = raw.post(data["resourceType"], sent)
    business = json.loads(BUSINESS_FILE.read_text(encoding="utf-8")) if BUSINESS_FILE.exists() else {}
    if key in business:
        want = business[key]
        assert r.status_code == want["status"], (
            f"{key} is listed as refused by a business rule ({want['reason']!r}) with {want['status']}"
            f" but got {r.status_code}" + describe(r)
        )
        assert r.json()["resourceType"] == "OperationOutcome", describe(r)
        return
    if key in refusals:
        assert r.status_code in (400, 422), (
            f"{key} is listed as refused ({refusals[key]!r}) but got {r.status_code}" + describe(r)
        )
        assert r.json()["resourceType"] == "OperationOutcome", describe(r)
        return
    assert r.status_code == 201, f"{key} was refused and is not listed in {EXPECTED_FILE.name}" + describe(r)
    stored_id = r.json()["id"]
    back = raw.get(f"{data['resourceType']}/{stored_id}")
    assert back.status_code == 200, describe(back)
    got = strip(back.json())
    expected = normalise_ods(sent)
    assert got == expected, f"{key}: read-back differs from what was sent" + diff(expected, got)


def diff(a, b, path="$") -> str:
    """First differences between two JSON values, as a readable list."""
    out = []

    def walk(x, y, p):
        if len(out) >= 10:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                if k not in y:
                    out.append(f"{p}.{k}: dropped (sent {json.dumps(x[k])[:200]})")
                elif k not in x:
                    out.append(f"{p}.{k}: added ({json.dumps(y[k])[:200]})")
                else:
                    walk(x[k], y[k], f"{p}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (xi, yi) in enumerate(zip(x, y)):
                walk(xi, yi, f"{p}[{i}]")
        elif x != y:
            out.append(f"{p}: sent {json.dumps(x)[:200]} got {json.dumps(y)[:200]}")

    walk(a, b, path)
    return "\n" + "\n".join(out)
