#!/usr/bin/env python3
"""Instructions per request in otpd's own process, counted by callgrind.

Wall-clock figures on a shared 2-core machine move by a third from one run to
the next; instruction counts repeat to a fraction of a percent, so they show
what a small change gains. Kernel work (syscalls, TCP) is not counted.

    bench/callgrind.py target/release [label] [requests per phase] [store]

where store is memory (the default), sqlite (a new file), or a Redis URL whose
database is emptied first (redis://127.0.0.1:6379/5).

Starts the mock provider and `otpd serve` under valgrind with the benchmark's
config (`otpd-bench --print-config`: memory store, its policy; DLR polling
slowed to hourly so that no timer adds work), makes one warm-up round, then
counts each phase alone: native and BridgeX-style sends, wrong-code and
right-code checks.

    bench/callgrind.py --cpu target/release [label] [requests per phase] [store]

runs otpd without valgrind instead and, one request at a time, reports each
phase's latency (p50, p99) and the CPU time per request (user and kernel,
from /proc) of otpd and of the store's server (redis-server, or every
PostgreSQL process): what a quiet instance spends, round trips included,
which a saturated benchmark run can hide. Store may then also be a
PostgreSQL URL, whose database otpd_cg is created afresh
(postgres://postgres@127.0.0.1:5432/test). Use a few thousand requests:
/proc counts in 10 ms ticks.
"""
import glob, http.client, json, re, signal, socket, subprocess, sys, tempfile, time

cpu_mode = sys.argv[1] == "--cpu"
args = sys.argv[2:] if cpu_mode else sys.argv[1:]
bins = args[0]
label = args[1] if len(args) > 1 else "otpd"
N = int(args[2]) if len(args) > 2 else 300
store = args[3] if len(args) > 3 else "memory"
work = tempfile.mkdtemp(prefix=f"cg-{label}-")
store_server = None
if store == "memory":
    store_url = "memory://"
elif store == "sqlite":
    store_url = f"sqlite://{work}/otpd.db"
elif store.startswith("postgres://") and cpu_mode:
    subprocess.run(["psql", "-q", "-d", store, "-c", "DROP DATABASE IF EXISTS otpd_cg",
                    "-c", "CREATE DATABASE otpd_cg"], check=True, stdout=subprocess.DEVNULL)
    store_url = store.rsplit("/", 1)[0] + "/otpd_cg"
    store_server = ["pgrep", "-x", "postgres"]
elif store.startswith("redis://"):
    store_url = store
    subprocess.run(["redis-cli", "-u", store, "FLUSHDB"], check=True, stdout=subprocess.DEVNULL)
    store_server = ["pgrep", "-x", "redis-server"]
else:
    sys.exit(f"unknown store {store!r}: memory, sqlite or a redis:// URL")
mock = subprocess.Popen([f"{bins}/mock-provider", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
mock_addr = None
for line in mock.stdout:
    if "listening on" in line:
        mock_addr = line.split("listening on")[1].strip()
        break
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
# The benchmark's own config (memory store, its policy, routes to the mock),
# with DLR polling slowed to hourly, the longest otpd allows.
cfg = subprocess.run([f"{bins}/otpd-bench", "--print-config", f"127.0.0.1:{port}", mock_addr,
                      f"{work}/data", store_url], check=True, capture_output=True, text=True).stdout
cfg += "\n[dlr]\npoll_interval_seconds = 3600\n"
open(f"{work}/c.toml", "w").write(cfg)
out = f"{work}/cg.out"
# Names in full in every dump, so that each phase's file annotates on its own.
under = [] if cpu_mode else ["valgrind", "--tool=callgrind", "--compress-strings=no",
                              f"--callgrind-out-file={out}"]
srv = subprocess.Popen(under + [f"{bins}/otpd", "--config", f"{work}/c.toml", "serve"],
                       stdout=subprocess.PIPE, stderr=open(f"{work}/err.log", "w"), text=True)
key = None
for line in srv.stdout:
    if "API key:" in line:
        key = line.split("API key:")[1].strip()
        break
if key is None:
    mock.terminate()
    sys.exit(f"otpd did not start; see {work}/err.log")
for _ in range(600):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close(); break
    except OSError:
        time.sleep(0.1)
conn = http.client.HTTPConnection("127.0.0.1", port)

def post(path, body):
    conn.request("POST", path, json.dumps(body), {"x-api-key": key, "content-type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()

def ctl(flag):
    subprocess.run(["callgrind_control", flag, str(srv.pid)], stdout=subprocess.DEVNULL, check=True)

def ticks(pids):
    """User and kernel CPU of `pids` so far, in clock ticks (10 ms)."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass  # ended meanwhile
    return total

def redis_commands():
    """Redis's calls and µs per command so far (INFO commandstats)."""
    if not store.startswith("redis://"):
        return {}
    text = subprocess.run(["redis-cli", "-u", store, "INFO", "commandstats"],
                          capture_output=True, text=True).stdout
    return {m[1]: (int(m[2]), int(m[3])) for m in
            re.finditer(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", text)}

def server_pids():
    if store_server is None:
        return []
    return subprocess.run(store_server, capture_output=True, text=True).stdout.split()

results = {}
def phase(name, fn):
    if not cpu_mode:
        ctl("-z")
        statuses = [fn(i) for i in range(N)]
        ctl("-d")
        results[name] = statuses
        return
    servers = server_pids()
    before = (ticks([srv.pid]), ticks(servers))
    commands = redis_commands()
    # otpd's CPU time as the kernel's scheduler clock counts it (`perf stat`'s
    # task-clock): finer than /proc's 10 ms ticks.
    counting = subprocess.Popen(["perf", "stat", "-x,", "-e", "task-clock",
                                 "-p", str(srv.pid)], stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)
    latencies, statuses = [], []
    for i in range(N):
        started = time.perf_counter()
        statuses.append(fn(i))
        latencies.append(time.perf_counter() - started)
    otpd, server = ticks([srv.pid]) - before[0], ticks(servers) - before[1]
    counting.send_signal(signal.SIGINT)
    clock_ms = 0.0
    for line in counting.communicate()[1].splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("task-clock"):
            clock_ms = float(fields[0] or 0)
    latencies.sort()
    if name != "warm-up":
        ms = lambda q: latencies[min(int(q * N), N - 1)] * 1000
        store_cpu = f"{server * 10_000 / N:7.1f} µs" if store_server else "      -   "
        print(f"{label:6} {name:22} p50 {ms(0.5):6.2f} ms  p99 {ms(0.99):6.2f} ms  "
              f"otpd {otpd * 10_000 / N:7.1f} µs (task-clock {clock_ms * 1000 / N:6.1f} µs)  "
              f"store {store_cpu}  statuses {sorted(set(statuses))}")
        # What Redis ran per request, by command: calls and its own µs.
        after = redis_commands()
        spent = {c: (n - commands.get(c, (0, 0))[0], u - commands.get(c, (0, 0))[1])
                 for c, (n, u) in after.items()}
        if spent:
            print("       redis per request: " + ", ".join(
                f"{c} {n / N:.2f}× {u / N:.1f} µs" for c, (n, u) in
                sorted(spent.items(), key=lambda kv: -kv[1][1]) if n))

native, bx = [], []
def send_native(i, block="1"):
    st, b = post("/v1/verifications", {"to": f"+316{block}{i:07d}", "purpose": "login"})
    j = json.loads(b); native.append((j["id"], j["debug_code"])); return st
def send_bx(i):
    st, b = post("/send-otp", {"phone_number": f"3162{i:07d}", "purpose": "login", "route_id": 1})
    j = json.loads(b); bx.append((f"3162{i:07d}", j["debug_code"])); return st
def wrong(c): return "0" * len(c) if c != "0" * len(c) else "1" * len(c)
# Warm-up (lazy statics, connection pools), counted but not reported.
phase("warm-up", lambda i: send_native(i, "3") if i < 20 else post("/v1/verifications/check", {"id": native[i % 20][0], "code": wrong(native[i % 20][1])})[0])
native.clear()
phase("send native", send_native)
phase("send bridgex", send_bx)
phase("check wrong native", lambda i: post("/v1/verifications/check", {"id": native[i][0], "code": wrong(native[i][1])})[0])
phase("check wrong bridgex", lambda i: post("/verify-otp", {"phone_number": bx[i][0], "purpose": "login", "code": wrong(bx[i][1])})[0])
phase("check right native", lambda i: post("/v1/verifications/check", {"id": native[i][0], "code": native[i][1]})[0])
phase("check right bridgex", lambda i: post("/verify-otp", {"phone_number": bx[i][0], "purpose": "login", "code": bx[i][1]})[0])
srv.terminate(); srv.wait(); mock.terminate()
if cpu_mode:
    sys.exit(0)
# One numbered dump per phase, in order (cg.out.1, cg.out.2, ...).
dumps = sorted((d for d in glob.glob(f"{out}.*") if re.search(r"\.\d+$", d)),
               key=lambda d: int(d.rsplit(".", 1)[1]))
for (name, sts), d in list(zip(results.items(), dumps))[1:]:
    total = 0
    for line in open(d):
        if line.startswith("summary:") or line.startswith("totals:"):
            total = int(line.split()[1]); break
    print(f"{label:6} {name:22} {total / N / 1000:8.1f}k instr/req  statuses {sorted(set(sts))}")
