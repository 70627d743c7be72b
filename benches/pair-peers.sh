#!/usr/bin/env bash
# `syncblock pair` with its defaults (both nodes and the witness in one process, as the README's
# first command runs them) side by side with QEMU's synchronous mirror (the `qemu-mirror` peer of
# ../shared/bench/peers.sh), ROUNDS rounds of peers.sh's four workloads on each; prints per-round
# figures and the medians of the per-round ratios pair/mirror.
#
#   bash benches/pair-peers.sh            # 3 rounds, ~5 min
# Env: DIR (scratch on the disk under test, default /var/tmp/pair-bench), ROUNDS (3), RT (8),
# SIZE (1G: the region fio touches), STORE_SIZE (3GiB: each node's store, prefilled once through
# NBD so the log has been written before measuring), PEERS (path of peers.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${DIR:-/var/tmp/pair-bench}; ROUNDS=${ROUNDS:-3}; export RT=${RT:-8} SIZE=${SIZE:-1G}
STORE_SIZE=${STORE_SIZE:-3GiB}
PEERS=${PEERS:-$ROOT/../shared/bench/peers.sh}
[ -f "$PEERS" ] || { echo "peers.sh not found; set PEERS=" >&2; exit 1; }
BIN=${BIN:-$ROOT/target/release/syncblock}
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release -p syncblock-nbd)
rm -rf "$BASE"; mkdir -p "$BASE"
PY=/usr/bin/python3
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" pair --size="$STORE_SIZE" --listen "127.0.0.1:$PORT" --data-dir "$BASE/data" >"$BASE/pair.out" 2>"$BASE/pair.log" &
PAIR=$!
trap 'kill $PAIR 2>/dev/null; wait $PAIR 2>/dev/null; rm -rf "$BASE"' EXIT
URI="nbd://127.0.0.1:$PORT/default"
for _ in $(seq 200); do grep -q "nbd://" "$BASE/pair.out" 2>/dev/null && break; sleep 0.1; done
for _ in 1 2 3; do
  fio --name=prefill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size="$SIZE" >/dev/null 2>&1
done
echo "# syncblock pair (defaults) at $URI, prefilled; RT=$RT SIZE=$SIZE ROUNDS=$ROUNDS"
: >"$BASE/results"
for r in $(seq "$ROUNDS"); do
  DIR="$BASE/peers" bash "$PEERS" --only qemu-mirror --uri "$URI" --name pair | sed "s/^/round=$r /" | tee -a "$BASE/results"
done
$PY - "$BASE/results" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) (\S+)\s+(\S+)\s+iops=\s*([\d.]+)", line)
    if m:
        rows.setdefault((m.group(3), int(m.group(1))), {})[m.group(2)] = float(m.group(4))
print("\nmedian of per-round ratios pair/qemu-mirror (IOPS):")
for w in sorted({k[0] for k in rows}):
    ratios = [v["pair"] / v["qemu-mirror"] for (wn, _), v in rows.items() if wn == w and "pair" in v and v.get("qemu-mirror")]
    pair = [v["pair"] for (wn, _), v in rows.items() if wn == w and "pair" in v]
    mirror = [v["qemu-mirror"] for (wn, _), v in rows.items() if wn == w and "qemu-mirror" in v]
    if ratios:
        print(f"  {w:18} pair {statistics.median(pair):9.0f}  mirror {statistics.median(mirror):9.0f}  ratio {statistics.median(ratios):.2f}x  {[round(x, 2) for x in ratios]}")
PY
