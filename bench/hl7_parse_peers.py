"""HL7 v2 parse throughput of the Python peers, comparable with `crates/hl7/examples/parse_bench.rs`.

    python bench/hl7_parse_peers.py DIR_OR_FILES... [--iterations N] [--hl7apy-iterations M]

Loads every .hl7 file given (directories searched recursively), normalises each to the canonical form both
peers need (byte-order mark dropped, CR after every non-blank line, decoded as UTF-8, or Latin-1 when that
fails), then N times parses every message and reads MSH-9, MSH-10, PID-3 and PID-5 as strings, with
python-hl7 (`hl7.parse`) and with hl7apy (`parse_message`, validation QUIET, `find_groups=False`). Prints one
JSON line per peer with the same fields as the Rust benchmark. hl7apy is much slower, so it runs fewer
iterations by default (a tenth, at least one).

Install the peers in a throwaway venv: `pip install hl7==0.4.5 hl7apy==1.3.5`.
"""

import json
import os
import sys
import time


def collect(path, out):
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            child = os.path.join(path, name)
            if os.path.isdir(child) or name.endswith(".hl7"):
                collect(child, out)
    elif os.path.isfile(path):
        out.append(path)


def canonical(raw):
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = b"".join(line + b"\r" for line in lines if line.strip())
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError:
        return data, data.decode("latin-1")


def run(name, iterations, messages, work):
    for _, text in messages:  # warm-up
        work(text)
    start = time.perf_counter()
    for _ in range(iterations):
        for _, text in messages:
            work(text)
    seconds = time.perf_counter() - start
    count = len(messages) * iterations
    print(json.dumps({
        "impl": name,
        "messages": count,
        "bytes": sum(len(raw) for raw, _ in messages) * iterations,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(count / seconds) if seconds > 0 else 0,
    }), flush=True)


def main(argv):
    iterations, apy_iterations, paths = 200, None, []
    args = iter(argv)
    for a in args:
        if a == "--iterations":
            iterations = int(next(args))
        elif a == "--hl7apy-iterations":
            apy_iterations = int(next(args))
        else:
            paths.append(a)
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    files = []
    for p in paths:
        collect(p, files)
    messages = []
    for f in files:
        with open(f, "rb") as fh:
            messages.append(canonical(fh.read()))
    if not messages:
        print("no messages", file=sys.stderr)
        return 1

    import hl7

    def python_hl7(text):
        m = hl7.parse(text)
        msh = m.segment("MSH")
        out = [str(msh[9]), str(msh[10])]
        try:
            pid = m.segment("PID")
            out += [str(pid[3]), str(pid[5])]
        except KeyError:
            pass
        return out

    run("python-hl7", iterations, messages, python_hl7)

    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    def hl7apy_work(text):
        m = parse_message(text, validation_level=VALIDATION_LEVEL.QUIET, find_groups=False)
        out = [m.msh.msh_9.to_er7(), m.msh.msh_10.to_er7()]
        if m.children.get("PID"):
            out += [m.pid.pid_3.to_er7(), m.pid.pid_5.to_er7()]
        return out

    run("hl7apy", apy_iterations or max(1, iterations // 10), messages, hl7apy_work)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
