#!/usr/bin/env bash
# Planned switchover (docs/cluster.md "Switchover", docs/replication.md "Switchover"): how long a
# volume's writers wait when its primary role moves to the in-sync secondary, and that none of
# their acknowledged writes is lost. One etcd member and 2 `syncblock node`s on loopback, default
# settings, VOLUMES thin volumes of 256 MiB.
#
#   1. One volume at a time: a libnbd client writes 4 KiB blocks with FUA in a loop on the primary
#      (each to the next of 256 blocks, holding a counter); `syncblock switchover --admin PRIMARY`
#      runs; the client, refused, reconnects to the other node until a write is acknowledged
#      there. Per volume: the command's duration, the client's gap (last write acknowledged by the
#      old primary to the first by the new one), and a read of all 256 blocks from the new primary
#      against the last acknowledged counter of each.
#   2. Rebalancing: every volume moved back at once (one command each, in parallel): the time
#      until the last command returned.
#
#   bash benches/cluster-switchover.sh
#   VOLUMES=50 bash benches/cluster-switchover.sh
#
# etcd runs with --heartbeat-interval 50 --election-timeout 500, as docs/cluster.md advises.
# Environment (all optional): DIR (/var/tmp/cluster-bench); VOLUMES (20); SKIP_BUILD=1; KEEP=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VOLUMES=${VOLUMES:-20}
BASE=${DIR:-/var/tmp/cluster-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need "apt-get install etcd-server python3-libnbd" etcd
$PY -c 'import nbd' 2>/dev/null || { echo "missing the python3 nbd module (apt-get install python3-libnbd)" >&2; exit 1; }
open_run "$ROOT"

start_etcd "$RUN"
declare -A ADMIN NBD_AT
declare -A NODE_PID
for n in n1 n2; do
  ADMIN[$n]=127.0.0.1:$(port)
  NBD_AT[$n]=127.0.0.1:$(port)
  start_node "$n" 16GiB --listen "${NBD_AT[$n]}" --admin "${ADMIN[$n]}"
done
await_joined n1 n2
for v in $(seq 1 "$VOLUMES"); do
  "$BIN" volume create "v$v" --size 256MiB --etcd "$ETCD" >/dev/null
done
for _ in $(seq 600); do
  states=$("$BIN" volume list --json --etcd "$ETCD" | $PY -c 'import json,sys; l=json.load(sys.stdin); print(sum(v["state"]=="in-sync" for v in l), len(l))')
  set -- $states
  [ "$1" = "$2" ] && break
  sleep 0.5
done
[ "$1" = "$2" ] || { echo "not every volume reached sync; logs in $RUN" >&2; KEEP=1; exit 1; }
echo "$VOLUMES volumes in sync on n1 and n2"

"$BIN" volume list --json --etcd "$ETCD" >"$RUN/volumes.json"
$PY - "$RUN/volumes.json" "$BIN" "n1=${ADMIN[n1]},n2=${ADMIN[n2]}" "n1=${NBD_AT[n1]},n2=${NBD_AT[n2]}" <<'PYEOF'
import json, statistics, subprocess, sys, threading, time
import nbd

vols = json.load(open(sys.argv[1]))
bin_ = sys.argv[2]
admin = dict(kv.split("=") for kv in sys.argv[3].split(","))
nbd_at = dict(kv.split("=") for kv in sys.argv[4].split(","))
BLOCKS = 256

def uri(node, vol):
    return "nbd://%s/%s" % (nbd_at[node], vol)

def block(k):
    return k.to_bytes(8, "little") * 512

def switchover(node, vol):
    t = time.monotonic()
    p = subprocess.run([bin_, "switchover", "--admin", admin[node], "--volume", vol], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit("switchover of %s on %s failed: %s" % (vol, node, p.stderr.strip()))
    return time.monotonic() - t

cmd_s, gap_s, lost = [], [], 0
for v in vols:
    name, old, new = v["name"], v["primary"], v["secondary"]
    acked = {}          # block -> last acknowledged counter
    state = {"last_ok_old": None, "first_ok_new": None, "stop": False}

    def writer():
        k, node = 0, old
        h = nbd.NBD(); h.connect_uri(uri(old, name))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            k += 1
            try:
                h.pwrite(block(k), (k % BLOCKS) * 4096, nbd.CMD_FLAG_FUA)
            except Exception:
                try:
                    h.shutdown()
                except Exception:
                    pass
                # Reconnect to the other node until it serves (its listener redirects meanwhile).
                node = new
                while True:
                    try:
                        h = nbd.NBD(); h.connect_uri(uri(new, name)); break
                    except Exception:
                        time.sleep(0.002)
                continue
            acked[k % BLOCKS] = k
            now = time.monotonic()
            if node == old:
                state["last_ok_old"] = now
            elif state["first_ok_new"] is None:
                state["first_ok_new"] = now
            if state["stop"]:
                break
        h.shutdown()

    t = threading.Thread(target=writer); t.start()
    time.sleep(0.3)
    cmd_s.append(switchover(old, name))
    for _ in range(3000):
        if state["first_ok_new"] is not None:
            break
        time.sleep(0.01)
    state["stop"] = True
    t.join()
    if state["first_ok_new"] is None:
        raise SystemExit("%s: no write acknowledged by the new primary %s" % (name, new))
    gap_s.append(state["first_ok_new"] - state["last_ok_old"])
    h = nbd.NBD(); h.connect_uri(uri(new, name))
    for b, k in acked.items():
        if h.pread(4096, b * 4096) != block(k):
            lost += 1
    h.shutdown()

def show(label, xs):
    xs = sorted(xs)
    print("  %s: min %.0f ms, median %.0f ms, max %.0f ms" % (label, 1000 * xs[0], 1000 * statistics.median(xs), 1000 * xs[-1]))

print("1. switchover of %d volumes, one at a time, a client writing 4 KiB FUA blocks throughout:" % len(vols))
show("command (hold, confirm, grant, step down)", cmd_s)
show("client gap (last ack on the old primary to first on the new)", gap_s)
print("  acknowledged blocks read back from the new primary: %d lost of %d volumes x %d blocks" % (lost, len(vols), BLOCKS))

t0 = time.monotonic()
threads = [threading.Thread(target=switchover, args=(v["secondary"], v["name"])) for v in vols]
for t in threads: t.start()
for t in threads: t.join()
print("2. all %d moved back at once (one command each, in parallel): %.2f s" % (len(vols), time.monotonic() - t0))
if lost:
    sys.exit(1)
PYEOF
"$BIN" volume list --etcd "$ETCD" | head -5
