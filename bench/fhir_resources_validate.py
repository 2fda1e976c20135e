#!/usr/bin/env python3
"""Time fhir.resources (pydantic) validation of one Patient JSON file, for comparison with cb-validate-bench.

Usage: fhir_resources_validate.py PATIENT_JSON [ITERATIONS] [--json]

fhir.resources 8.x default models are FHIR R5; the closest model to R4 it ships is R4B (4.3.0), so
fhir.resources.R4B.patient.Patient is used. It checks structure and datatypes only (no profiles, no
terminology, no NHS-number check digit). Like cb-validate-bench, each iteration parses the JSON text too.
"""
import json
import sys
import time


def main(argv):
    args = [a for a in argv if a != "--json"]
    if not args:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = args[0]
    iterations = int(args[1]) if len(args) > 1 else 2000
    try:
        import fhir.resources
        from fhir.resources.R4B.patient import Patient
    except ImportError as e:
        print(f"fhir_resources_validate: fhir.resources is not installed: {e}", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def validate(t):
        if hasattr(Patient, "model_validate_json"):
            return Patient.model_validate_json(t)
        return Patient.parse_raw(t)

    try:
        validate(text)
    except Exception as e:  # report, do not time an invalid sample
        print(f"fhir_resources_validate: the sample does not validate as R4B Patient: {e}", file=sys.stderr)
        return 1
    for _ in range(min(200, iterations)):  # warm-up
        validate(text)
    start = time.perf_counter()
    for _ in range(iterations):
        validate(text)
    secs = max(time.perf_counter() - start, 1e-9)
    per_s = iterations / secs
    version = getattr(fhir.resources, "__version__", "?")
    print(f"fhir.resources {version} R4B Patient: {per_s:.0f} validations/s "
          f"({iterations} of a {len(text.encode())}-byte Patient in {secs:.3f}s, {secs * 1e6 / iterations:.1f} us each)")
    if "--json" in argv:
        print(json.dumps({"validator": f"fhir.resources {version} R4B", "iterations": iterations,
                          "seconds": secs, "per_s": per_s,
                          "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
