#!/usr/bin/env bash
# The floor under every NBD server on this machine: `nbd_null` (benches/src/bin/nbd_null.rs), a
# server that stores nothing and answers every request at once, measured in the same run as raw
# io_uring, qemu-nbd and the QEMU synchronous mirror, with the workloads and fio settings of
# ../shared/bench/peers.sh. A ratio target that even nbd_null misses cannot be met by a server that
# also writes to a disk (and, for the mirror targets, also ships every write to a peer).
#
#   bash benches/nbd-floor.sh            # 3 rounds, ~4 min
#   ROUNDS=5 RT=10 bash benches/nbd-floor.sh
#
# Env: ROUNDS (3), RT seconds per cell (8), SIZE (1G), DIR (/var/tmp/nbd-floor; not a tmpfs: raw,
# qemu-nbd and the mirror need O_DIRECT). Needs fio, qemu-utils (qemu-nbd, qemu-storage-daemon).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; RT=${RT:-8}; SIZE=${SIZE:-1G}; DIR=${DIR:-/var/tmp/nbd-floor}
PEERS=$(cd ../shared/bench 2>/dev/null && pwd)/peers.sh
[ -x "$PEERS" ] || [ -f "$PEERS" ] || { echo "needs ../shared/bench/peers.sh" >&2; exit 2; }
cargo build --release -q -p syncblock-benches --bin nbd_null
mkdir -p "$DIR"
OUT=$(mktemp)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -f "$OUT"; }
trap cleanup EXIT

target/release/nbd_null 127.0.0.1:0 > "$DIR/null.addr" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$DIR/null.addr" ] && break; sleep 0.1; done
URI=$(head -1 "$DIR/null.addr")
echo "# nbd_null at $URI; RT=$RT SIZE=$SIZE ROUNDS=$ROUNDS" >&2

for r in $(seq 1 "$ROUNDS"); do
  # Rotate the order so that no system always runs first (or last) in a round.
  systems=(null peers)
  [ $((r % 2)) -eq 0 ] && systems=(peers null)
  for s in "${systems[@]}"; do
    if [ "$s" = null ]; then
      DIR=$DIR/p RT=$RT SIZE=$SIZE bash "$PEERS" --only none --uri "$URI" --name nbd_null | sed "s/^/round=$r /" | tee -a "$OUT"
    else
      DIR=$DIR/p RT=$RT SIZE=$SIZE bash "$PEERS" --only raw,qemu-nbd,qemu-mirror | sed "s/^/round=$r /" | tee -a "$OUT"
    fi
  done
done
rm -rf "$DIR/p"

python3 - "$OUT" <<'EOF'
import re, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) (\S+)\s+(\S+)\s+iops=\s*([\d.]+)", line)
    if m:
        r, sysname, w, iops = int(m[1]), m[2], m[3], float(m[4])
        rows.setdefault((sysname, w), {})[r] = iops
def ratio(a, b, w):
    xs = [rows[(a, w)][r] / rows[(b, w)][r] for r in rows.get((a, w), {}) if r in rows.get((b, w), {}) and rows[(b, w)][r] > 0]
    return (statistics.median(xs), xs) if xs else (float("nan"), [])
print("\nMedian IOPS over rounds:")
for (s, w), v in sorted(rows.items()):
    print("  %-12s %-18s %10.0f" % (s, w, statistics.median(v.values())))
print("\nThe floor against the targets (median of per-round ratios; a target above the floor is out of")
print("reach of any NBD server on this machine):")
checks = [
    ("issue 3: randwrite QD32 >= 0.9x raw io_uring", "randwrite4k_qd32", "raw_uring", 0.9),
    ("issue 3: randwrite QD32 >= 2.0x qemu-nbd", "randwrite4k_qd32", "qemu-nbd", 2.0),
    ("issue 3: write+fsync QD1 >= 1.5x qemu-nbd", "syncwrite4k_qd1", "qemu-nbd", 1.5),
    ("issue 4: repl randwrite QD32 >= 5x QEMU mirror", "randwrite4k_qd32", "qemu-mirror", 5.0),
    ("issue 4: repl write+fsync QD1 >= 2x QEMU mirror", "syncwrite4k_qd1", "qemu-mirror", 2.0),
]
for name, w, peer, target in checks:
    med, xs = ratio("nbd_null", peer, w)
    verdict = "reachable in principle" if med >= target else "OUT OF REACH: even a server that stores nothing misses it"
    print("  %-50s nbd_null/%s = %.2fx (%s)  -> %s" % (name, peer, med, " / ".join("%.2f" % x for x in xs), verdict))
EOF
