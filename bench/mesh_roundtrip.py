"""MESH round trip through a local mesh-sandbox: the hub's Rust client against NHS England's `mesh_client`.

    target/py-venv/bin/python bench/mesh_roundtrip.py --hub-bin target/release/carebridge [--n 1000]

Starts its own mesh-sandbox (uvicorn, full NHSMESH authentication, in-memory store) on a free loopback port,
then in the same run (after a 50-message warm-up of each client, the two clients alternating `--repeat` times,
the median run of each reported):

1. `carebridge-mesh`: `crates/mesh/examples/roundtrip.rs` (release build; built here when missing) sends N
   small HL7 messages X26ABC1 -> X26ABC2, lists the inbox, downloads and acknowledges each one, checking every
   body, and reports its elapsed time and its own CPU time (utime + stime);
2. `mesh-client`: the same loop with `mesh_client.MeshClient` in this process, CPU measured with
   `time.process_time()`;
3. `carebridge serve`: N HL7 ADT A28 messages are put in X26ABC2's inbox by mesh-client, then the hub
   (`--hub-bin`) polls, applies each one to its store (a Patient per message) and acknowledges it; elapsed is
   until the inbox is empty, CPU is the hub process's (applying included, so it is not comparable with 1-2).

The sandbox runs on the same two cores, so elapsed times are mostly the sandbox's; CPU per message of the
client process is the figure that compares the clients. Prints a Markdown table. Loopback traffic only; every
loop is bounded by N and by a time limit.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from mesh_client import MeshClient

REPO = Path(__file__).resolve().parents[1]
SHARED_KEY = "BenchKey"
PASSWORD = "password"
SENDER, RECEIVER, WORKFLOW = "X26ABC1", "X26ABC2", "TEST_WORKFLOW"
TIME_LIMIT_S = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sandbox(workdir):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(AUTH_MODE="full", STORE_MODE="memory", SHARED_KEY=SHARED_KEY)
    log = open(Path(workdir) / "sandbox.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "uvicorn", "mesh_sandbox.api:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--log-level", "warning"],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mesh-sandbox exited with {proc.returncode}; see {workdir}/sandbox.log")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("mesh-sandbox did not start within 30 s")


def reset(url):
    requests.delete(url + "/messageexchange/admin/reset", timeout=10).raise_for_status()


def client(url, mailbox):
    return MeshClient(url, mailbox, PASSWORD, shared_key=SHARED_KEY.encode(), max_retries=0)


def body(i, size):
    b = f"MSH|^~\\&|HUB|RXX|GP|Y01|20300101120000||ADT^A08|PY{i:06d}|P|2.4\r".encode()
    return b + b"x" * max(0, size - len(b))


def run_rust(bin_path, url, n, size):
    out = subprocess.run([str(bin_path), "--url", url, "--shared-key", SHARED_KEY, "--password", PASSWORD,
                          "--from", SENDER, "--to", RECEIVER, "--workflow", WORKFLOW, "--n", str(n),
                          "--size", str(size)], capture_output=True, text=True, timeout=TIME_LIMIT_S)
    if out.returncode != 0:
        sys.exit(f"roundtrip failed: {out.stderr.strip()}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"elapsed_s": r["elapsed_s"], "cpu_s": r["cpu_s"]}


def run_python(url, n, size):
    with client(url, SENDER) as a, client(url, RECEIVER) as b:
        a.handshake()
        b.handshake()
        started, cpu0 = time.perf_counter(), time.process_time()
        sent = {}
        for i in range(n):
            payload = body(i, size)
            mid = a.send_message(RECEIVER, payload, workflow_id=WORKFLOW, local_id=f"py-{uuid.uuid4()}")
            sent[mid] = payload
        listed = set(b.iterate_message_ids())
        missing = [m for m in sent if m not in listed]
        if missing:
            sys.exit(f"{len(missing)} messages missing from the inbox")
        for mid, payload in sent.items():
            msg = b.retrieve_message(mid)
            if msg.read() != payload:
                sys.exit(f"message {mid}: body differs")
            msg.acknowledge()
        return {"elapsed_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu0}


def proc_cpu_s(pid):
    """utime + stime of a process, in seconds (USER_HZ is 100 on Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def run_hub(hub_bin, url, n, workdir):
    """N ADT A28 into the hub's mailbox, then the hub polls, applies and acknowledges all of them."""
    with client(url, SENDER) as a:
        for i in range(n):
            msg = (f"MSH|^~\\&|PAS|RXX|HUB|RXX|20310101120000||ADT^A28^ADT_A05|BENCH{i}|P|2.4\r"
                   f"EVN|A28|20310101120000\rPID|1||BENCH{i}^^^RXX^MR||Bench^Ann||19800101|F\r"
                   f"PV1|1|N\r").encode()
            a.send_message(RECEIVER, msg, workflow_id=WORKFLOW)
    cfg = Path(workdir) / "hub.toml"
    cfg.write_text(f'[[mesh.mailboxes]]\nurl = "{url}"\nmailbox = "{RECEIVER}"\npassword = "{PASSWORD}"\n'
                   f'shared_key = "{SHARED_KEY}"\npoll_interval = "100ms"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    env["CAREBRIDGE_AUTH"] = "none"  # loopback only; the MESH path is what is measured
    log = open(Path(workdir) / "hub.log", "wb")
    started = time.perf_counter()
    hub = subprocess.Popen([str(hub_bin), "serve", "--http", "127.0.0.1:0", "--data-dir", str(Path(workdir) / "data"),
                            "--config", str(cfg)], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with client(url, RECEIVER) as b:
            deadline = time.monotonic() + TIME_LIMIT_S
            while b.list_messages(max_results=10) and time.monotonic() < deadline:
                if hub.poll() is not None:
                    sys.exit(f"the hub exited with {hub.returncode}; see {workdir}/hub.log")
                time.sleep(0.05)
            if b.list_messages(max_results=10):
                sys.exit("the hub did not empty the inbox in time")
        elapsed = time.perf_counter() - started
        cpu = proc_cpu_s(hub.pid)
    finally:
        hub.terminate()
        hub.wait(timeout=30)
    return {"elapsed_s": elapsed, "cpu_s": cpu}


def median(runs):
    return sorted(runs, key=lambda r: r["cpu_s"])[len(runs) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hub-bin", default=str(REPO / "target" / "release" / "carebridge"))
    ap.add_argument("--roundtrip-bin", default=str(REPO / "target" / "release" / "examples" / "roundtrip"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=120, help="bytes per payload")
    ap.add_argument("--repeat", type=int, default=5, help="runs per client; the median (by CPU) is reported")
    args = ap.parse_args()
    rt = Path(args.roundtrip_bin)
    if not rt.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "mesh", "--example", "roundtrip"], cwd=REPO, check=True)
    work = tempfile.mkdtemp(prefix="mesh-bench-")
    proc, url = start_sandbox(work)
    try:
        # Warm-up (the sandbox's first requests are slower), then alternate the clients so both see the same
        # machine state; report the median run of each.
        for warm in (lambda: run_rust(rt, url, 50, args.size), lambda: run_python(url, 50, args.size)):
            reset(url)
            warm()
        rust_runs, py_runs = [], []
        for _ in range(max(1, args.repeat)):
            reset(url)
            rust_runs.append(run_rust(rt, url, args.n, args.size))
            reset(url)
            py_runs.append(run_python(url, args.n, args.size))
        rust, py = median(rust_runs), median(py_runs)
        hub = None
        if Path(args.hub_bin).exists():
            reset(url)
            hub = run_hub(args.hub_bin, url, args.n, work)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    n = args.n

    def row(name, r, what):
        per = r["cpu_s"] / n * 1e3
        return (f"| {name} | {what} | {n} | {r['elapsed_s']:.2f} s | {n / r['elapsed_s']:.0f} | "
                f"{r['cpu_s']:.2f} s | {per:.3f} ms |")

    print("| client | loop | messages | elapsed | msgs/s | client CPU | client CPU / message |")
    print("|---|---|---|---|---|---|---|")
    print(row("carebridge-mesh (Rust)", rust, "send + list + download + ack"))
    print(row("mesh-client 5.0.2 (Python)", py, "send + list + download + ack"))
    if hub:
        print(row("carebridge serve", hub, "poll + download + apply A28 + ack"))
    ratio = (rust["cpu_s"] / n) / (py["cpu_s"] / n) if py["cpu_s"] > 0 else float("nan")
    print()
    print("CPU of every run (s): carebridge-mesh " + ", ".join(f"{r['cpu_s']:.2f}" for r in rust_runs)
          + "; mesh-client " + ", ".join(f"{r['cpu_s']:.2f}" for r in py_runs))
    print(f"CPU per message, carebridge-mesh / mesh-client: {ratio:.3f} (target: at most 0.1)")


if __name__ == "__main__":
    main()
