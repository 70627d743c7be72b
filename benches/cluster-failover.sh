#!/usr/bin/env bash
# Cluster failover at scale (issue 13, docs/cluster.md): one etcd member and 4 `syncblock node`s on
# loopback, all with default settings, holding 200 thin volumes of 256 MiB (two replicas each).
# Measures, in order:
#   1. what an idle replicated volume costs a node in memory: each node's RSS after joining, and
#      again with every volume in sync and idle; the difference over the replicas it holds;
#   2. failover: every volume gets a 64 KiB pattern, flushed; then the node that is primary of the
#      most volumes is SIGKILLed, and a libnbd client per affected volume retries a 4 KiB write +
#      flush on the volume's secondary every 20 ms: the time from SIGKILL to each volume's first
#      acknowledged flush (worst case is the figure of the issue: ≤ 2 s);
#   3. that nothing flushed was lost: every failed-over volume's pattern is read back.
#
#   bash benches/cluster-failover.sh
#   VOLUMES=40 NODES=3 bash benches/cluster-failover.sh     # smaller
#
# etcd runs with --heartbeat-interval 50 --election-timeout 500, as docs/cluster.md advises: its
# minimum lease TTL is 1.5 election timeouts rounded up to whole seconds, so with etcd's own
# defaults (100/1000 ms) the node leases would be 2 s and failover about a second longer.
#
# Environment (all optional): DIR (/var/tmp/cluster-bench) scratch directory; VOLUMES (200);
# NODES (4); VSIZE (256MiB); STORE (40GiB, sparse: the volumes are thin but placed as if full);
# IDLE_S (60) how long the volumes idle before memory is measured again; SKIP_BUILD=1; KEEP=1 keeps
# the run directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VOLUMES=${VOLUMES:-200}
NODES=${NODES:-4}
VSIZE=${VSIZE:-256MiB}
STORE=${STORE:-40GiB}
BASE=${DIR:-/var/tmp/cluster-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need "apt-get install etcd-server python3-libnbd" etcd
need "apt-get install etcd-client" etcdctl
$PY -c 'import nbd' 2>/dev/null || { echo "missing the python3 nbd module (apt-get install python3-libnbd)" >&2; exit 1; }
open_run "$ROOT"

start_etcd "$RUN"

declare -A NODE_PID
for i in $(seq 1 "$NODES"); do start_node "n$i" "$STORE" --admin "127.0.0.1:$(port)"; done
# shellcheck disable=SC2046
await_joined $(for i in $(seq 1 "$NODES"); do echo "n$i"; done)
sleep 2
rss() { ps -o rss= -p "$1" | tr -d ' '; }
declare -A RSS0
for n in "${!NODE_PID[@]}"; do RSS0[$n]=$(rss "${NODE_PID[$n]}"); done

echo "creating $VOLUMES volumes of $VSIZE on $NODES nodes ..."
t0=$(date +%s.%N)
for v in $(seq 1 "$VOLUMES"); do
  "$BIN" volume create "v$v" --size "$VSIZE" --etcd "$ETCD" >/dev/null
done
t1=$(date +%s.%N)
echo "created in $(echo "$t1 - $t0" | bc) s; waiting for every pair to sync ..."
for _ in $(seq 600); do
  states=$("$BIN" volume list --json --etcd "$ETCD" | $PY -c 'import json,sys; l=json.load(sys.stdin); print(sum(v["state"]=="in-sync" for v in l), len(l))')
  set -- $states
  [ "$1" = "$2" ] && break
  sleep 0.5
done
echo "in sync: $states (after $(echo "$(date +%s.%N) - $t1" | bc) s)"
if [ "$1" != "$2" ]; then
  echo "not every volume reached two in-sync copies; logs in $RUN" >&2
  KEEP=1
  exit 1
fi
sleep 10
"$BIN" node list --etcd "$ETCD"
echo
echo "memory of an idle replicated volume (RSS growth / replicas held):"
"$BIN" node list --json --etcd "$ETCD" >"$RUN/nodes.json"
per_volume() {
  for n in $(echo "${!NODE_PID[@]}" | tr ' ' '\n' | sort); do
    after=$(rss "${NODE_PID[$n]}")
    held=$(json "[x['volumes'] for x in d if x['name']=='$n'][0]" <"$RUN/nodes.json")
    echo "  $n: ${RSS0[$n]} KiB -> $after KiB with $held replicas: $(( (after - RSS0[$n]) / (held > 0 ? held : 1) )) KiB per volume"
  done
}
per_volume
# Heartbeats keep every link busy a little: a buffer that their bytes walk through shows up only
# over time, so the figure is taken again after a while idle.
# CPU while idle, over the same wait: what heartbeats, reports and timers cost (ticks, lib.sh).
# Times the node's threads went to sleep and were woken since they started (voluntary context
# switches): steadier than CPU time on a shared machine, and what per-volume timers cost.
wakeups() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'; }
declare -A CPU0 WAKE0
for n in "${!NODE_PID[@]}"; do CPU0[$n]=$(ticks "${NODE_PID[$n]}"); WAKE0[$n]=$(wakeups "${NODE_PID[$n]}"); done
sleep "${IDLE_S:-60}"
echo "again after ${IDLE_S:-60} s more idle:"
per_volume
echo "CPU while idle (those ${IDLE_S:-60} s):"
for n in $(echo "${!NODE_PID[@]}" | tr ' ' '\n' | sort); do
  used=$(( $(ticks "${NODE_PID[$n]}") - CPU0[$n] ))
  woke=$(( $(wakeups "${NODE_PID[$n]}") - WAKE0[$n] ))
  echo "  $n: $(echo "scale=1; 100 * $used / $(getconf CLK_TCK) / ${IDLE_S:-60}" | bc -l) % of a core, $(( woke / ${IDLE_S:-60} )) thread wake-ups a second"
done

"$BIN" volume list --json --etcd "$ETCD" >"$RUN/volumes.json"
VICTIM=$(json "max(set(v['primary'] for v in d), key=lambda n: sum(v['primary']==n for v in d))" <"$RUN/volumes.json")
"$BIN" node list --json --etcd "$ETCD" >"$RUN/nodes.json"
echo
echo "killing $VICTIM (primary of $(json "sum(v['primary']=='$VICTIM' for v in d)" <"$RUN/volumes.json") volumes) ..."
REV0=$(etcd_revision)
$PY - "$RUN/volumes.json" "$RUN/nodes.json" "$VICTIM" "${NODE_PID[$VICTIM]}" <<'EOF'
import json, os, signal, sys, threading, time
import nbd

vols = json.load(open(sys.argv[1]))
nodes = {n["name"]: n for n in json.load(open(sys.argv[2]))}
victim, pid = sys.argv[3], int(sys.argv[4])
PATTERN = lambda v: bytes([hash(v) & 0xff or 1]) * 65536

def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h

# Every volume gets its pattern, flushed, before the kill.
for v in vols:
    h = connect(v["nbd"])
    h.pwrite(PATTERN(v["name"]), 0)
    h.flush()
    h.shutdown()

affected = [v for v in vols if v["primary"] == victim]
times = {}
failed = {}
start = threading.Event()

def watch(v):
    uri = "nbd://%s/%s" % (nodes[v["secondary"]]["nbd"], v["name"])
    start.wait()
    deadline = t0 + 60
    last = None
    while time.monotonic() < deadline:
        try:
            h = connect(uri)
            h.pwrite(b"\x5a" * 4096, 1 << 20)
            h.flush()
            times[v["name"]] = time.monotonic() - t0
            got = h.pread(65536, 0)
            if got != PATTERN(v["name"]):
                failed[v["name"]] = "flushed pattern lost"
            h.shutdown()
            return
        except Exception as e:
            last = str(e)
            time.sleep(0.02)
    failed[v["name"]] = "no failover within 60 s: %s" % last

threads = [threading.Thread(target=watch, args=(v,)) for v in affected]
for t in threads:
    t.start()
time.sleep(0.5)
t0 = time.monotonic()
open(os.path.join(os.path.dirname(sys.argv[1]), "kill.time"), "w").write("%.6f\n" % time.time())
os.kill(pid, signal.SIGKILL)
start.set()
for t in threads:
    t.join()
ts = sorted(times.values())
if ts:
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]
    print("failover of %d volumes after SIGKILL of %s: min %.2f s, median %.2f s, p90 %.2f s, max %.2f s (target: all within 2 s)"
          % (len(ts), victim, ts[0], q(0.5), q(0.9), ts[-1]))
print("flushed data checked on every failed-over volume: %s" % ("all present" if not failed else failed))
open(os.path.join(os.path.dirname(sys.argv[1]), "failover.times"), "w").write(" ".join("%.6f" % t for t in ts))
sys.exit(1 if failed else 0)
EOF
# What the failover cost etcd: its writes in the 5 s after the kill (the victim's lease expiring,
# the takeovers of its primaries, the survivors' requests to acknowledge alone for the volumes whose
# secondary it was, and their records becoming synced again), each node's grant changes that came
# together being one write (replicator/src/cluster/batch.rs).
sleep "$($PY -c "import time; print(max(0, float(open('$RUN/kill.time').read()) + 5 - time.time()))")"
echo "etcd writes in the 5 s after the kill: $(($(etcd_revision) - REV0)) (for $(json "sum(v['primary']=='$VICTIM' or v['secondary']=='$VICTIM' for v in d)" <"$RUN/volumes.json") volumes that lost a replica)"
# How much of that is etcd's: when the survivors saw the victim's alive key go (its lease TTL, and
# etcd's expiry check every 500 ms), and how long after that the volumes served again.
$PY - "$RUN" "$VICTIM" <<'EOF'
import glob, re, sys
from datetime import datetime
run, victim = sys.argv[1], sys.argv[2]
kill = float(open(run + "/kill.time").read())
ts = sorted(float(t) for t in open(run + "/failover.times").read().split())
seen = []
for log in glob.glob(run + "/n*.log"):
    for line in open(log, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if "node %s is gone from the cluster" % victim in line:
            seen.append(datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() - kill)
if seen and ts:
    gone = min(seen)
    after = sorted(t - gone for t in ts)
    print("  of which etcd: the survivors saw %s's alive key go %.2f s after the kill; the volumes served "
          "again %.3f s (median) and %.3f s (max) after that" % (victim, gone, after[len(after) // 2], after[-1]))
EOF
