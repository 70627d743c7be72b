#!/usr/bin/env bash
# Our NBD server (`syncblock serve`) side by side with peer NBD servers (qemu-nbd, nbdkit,
# nbd-server) and raw local io_uring, on this machine's disk, with the workloads of issue 3.
# The peers are run by ../shared/bench/peers.sh (override with PEERS=...); this script starts our
# server on a temporary store, prefills it, runs every system once per round in a rotating order
# (the machine is noisy), stops everything and deletes the temporary files, then prints the
# per-round figures and the medians of the per-round ratios.
#
#   bash benches/nbd-peers.sh                 # 3 rounds x 5 systems x 4 workloads x 8 s, ~9-10 min
#   ROUNDS=5 RT=10 bash benches/nbd-peers.sh
#
# Environment (all optional):
#   SYNCBLOCK_BENCH_DIR  directory on the disk under test (default /var/tmp; a tmpfs is refused)
#   ROUNDS (3); RT seconds per cell (8) and SIZE (1G, the region fio touches) are passed to peers.sh
#   STORE_SIZE (4GiB): our store file; its default volume is as large as the store, fio uses SIZE of it
#   SYSTEMS ("syncblock raw qemu-nbd nbdkit nbd-server"); qemu-mirror is left out (replication, issue 4)
#   PEERS (/work/shared/bench/peers.sh or ../shared/bench/peers.sh); SKIP_BUILD=1; KEEP_RESULTS=path
#   BIN_BASE=path: another build of `syncblock` (e.g. the commit before a refactoring), served from
#     a store of its own, prefilled the same way, and measured as system "syncblock-base" in every
#     round (add it to SYSTEMS to choose its place; it is appended otherwise)
#
# Fairness: peers.sh writes its files in full with dd before use; we write our store's whole log
# once (sequential 1 MiB writes over SIZE through NBD, repeated until STORE_SIZE has been written)
# so that neither side pays first-write extent allocation, and every block fio reads is mapped.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
export RT=${RT:-8} SIZE=${SIZE:-1G}
STORE_SIZE=${STORE_SIZE:-4GiB}
SYSTEMS=(${SYSTEMS:-syncblock raw qemu-nbd nbdkit nbd-server})
BASE=${SYNCBLOCK_BENCH_DIR:-/var/tmp}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
find_peers "$ROOT"
need "apt-get install fio qemu-utils nbdkit nbd-server" fio qemu-nbd nbdkit nbd-server python3
refuse_tmpfs "$BASE" SYNCBLOCK_BENCH_DIR

build_syncblock "$ROOT"
BIN="$TARGET/release/syncblock"
BIN_BASE=${BIN_BASE:-}
if [ -n "$BIN_BASE" ] && [[ " ${SYSTEMS[*]} " != *" syncblock-base "* ]]; then SYSTEMS+=(syncblock-base); fi

DIR=$(mktemp -d "$BASE/syncblock-nbd-peers.XXXXXX")
SERVER=""; SERVER_BASE=""; RUNNING=""
cleanup() {
    set +e
    stop_peers "$RUNNING"
    [ -f "$DIR/peers/nbd-server.pid" ] && kill "$(cat "$DIR/peers/nbd-server.pid")" 2>/dev/null
    for s in $SERVER $SERVER_BASE; do stop_server "$s"; done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server BIN NAME: serves a new store NAME.img; sets SERVED_PID and SERVED_URI.
start_server() {
    local bin=$1 name=$2 port
    port=$(port)
    "$bin" serve --create --store "$DIR/$name.img" --size "$STORE_SIZE" --listen "127.0.0.1:$port" \
        >"$DIR/$name.out" 2>"$DIR/$name.err" &
    SERVED_PID=$!
    for _ in $(seq 100); do grep -q '^nbd://' "$DIR/$name.out" 2>/dev/null && break; sleep 0.1; done
    SERVED_URI=$(grep -m1 -o '^nbd://[^ ]*/[^ ]*' "$DIR/$name.out" || true)
    [ -n "$SERVED_URI" ] || { echo "server $name did not start:" >&2; cat "$DIR/$name.err" >&2; exit 1; }
}

# Prefill: write the whole log once through NBD (see Fairness above).
python3 - "$STORE_SIZE" "$SIZE" >"$DIR/loops" <<'EOF'
import re, sys
def b(s):
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B?)", s.strip(), re.I)
    return int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2].upper()]
print(max(1, -(-b(sys.argv[1]) // b(sys.argv[2]))))
EOF
prefill() {
    fio --name=prefill --ioengine=nbd --uri="$1" --rw=write --bs=1m --iodepth=8 --size="$SIZE" \
        --loops="$(cat "$DIR/loops")" --output-format=terse >/dev/null
}

start_server "$BIN" store
SERVER=$SERVED_PID URI=$SERVED_URI
echo "# syncblock at $URI (store $STORE_SIZE in $DIR); peers: $PEERS; RT=$RT SIZE=$SIZE ROUNDS=$ROUNDS" >&2
prefill "$URI"
URI_BASE=""
if [ -n "$BIN_BASE" ]; then
    start_server "$BIN_BASE" store-base
    SERVER_BASE=$SERVED_PID URI_BASE=$SERVED_URI
    echo "# syncblock-base ($BIN_BASE) at $URI_BASE" >&2
    prefill "$URI_BASE"
fi
echo "# prefilled $(cat "$DIR/loops") x $SIZE; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

RESULTS="$DIR/results.txt"
for r in $(seq 1 "$ROUNDS"); do
    n=${#SYSTEMS[@]}
    for i in $(seq 0 $((n - 1))); do
        s=${SYSTEMS[$(( (i + r - 1) % n ))]}
        case "$s" in
            syncblock) args=(--only none --uri "$URI" --name syncblock) ;;
            syncblock-base) args=(--only none --uri "$URI_BASE" --name syncblock-base) ;;
            *) args=(--only "$s") ;;
        esac
        DIR="$DIR/peers" bash "$PEERS" "${args[@]}" >"$DIR/out" 2>&1 & RUNNING=$!
        wait $RUNNING || true; RUNNING=""
        sed "s/^/round=$r /" "$DIR/out" | tee -a "$RESULTS" >&2
    done
    echo "# round $r done; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
[ -n "${KEEP_RESULTS:-}" ] && cp "$RESULTS" "$KEEP_RESULTS"

python3 - "$RESULTS" <<'EOF'
import re, statistics as st, sys
rows = {}  # (workload, system) -> {round: MiB/s}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) (\S+)\s+(\S+)\s+iops=\s*(\S+) MiB/s=\s*(\S+)", line)
    if m:
        rows.setdefault((m[3], m[2]), {})[int(m[1])] = float(m[5])
wls = ["randwrite4k_qd32", "randread4k_qd32", "seqwrite1m_qd8", "syncwrite4k_qd1"]
systems = ["syncblock", "raw_uring", "qemu-nbd", "nbdkit-file", "nbd-server"]
systems = [s for s in systems if any(k[1] == s for k in rows)] or systems
peers = ["qemu-nbd", "nbdkit-file", "nbd-server"]
rounds = sorted({r for v in rows.values() for r in v})
med = lambda xs: st.median(xs) if xs else float("nan")
print("\nMedian MiB/s over %d rounds; ratios are medians of per-round ratios" % len(rounds))
print("%-18s" % "workload" + "".join("%12s" % s for s in systems)
      + "%12s%12s%12s" % ("/qemu-nbd", "/best peer", "/raw"))
for w in wls:
    get = lambda s, r: rows.get((w, s), {}).get(r)
    line = "%-18s" % w + "".join("%12.1f" % med(list(rows.get((w, s), {}).values())) for s in systems)
    q, b, rw = [], [], []
    for r in rounds:
        o = get("syncblock", r)
        if not o: continue
        if get("qemu-nbd", r): q.append(o / get("qemu-nbd", r))
        ps = [get(p, r) for p in peers if get(p, r)]
        if ps: b.append(o / max(ps))
        if get("raw_uring", r): rw.append(o / get("raw_uring", r))
    print(line + "%12.2f%12.2f%12.2f" % (med(q), med(b), med(rw)))
if any(s == "syncblock-base" for (_, s) in rows):
    print("\nAgainst the base build (syncblock-base), medians of per-round ratios:")
    print("%-18s%12s%12s%16s%16s" % ("workload", "base MiB/s", "ours/base", "base/qemu-nbd", "ours/qemu-nbd"))
    for w in wls:
        get = lambda s, r: rows.get((w, s), {}).get(r)
        ob, bq, oq = [], [], []
        for r in rounds:
            o, b_, q_ = get("syncblock", r), get("syncblock-base", r), get("qemu-nbd", r)
            if o and b_: ob.append(o / b_)
            if b_ and q_: bq.append(b_ / q_)
            if o and q_: oq.append(o / q_)
        print("%-18s%12.1f%12.2f%16.2f%16.2f" % (w, med(list(rows.get((w, "syncblock-base"), {}).values())), med(ob), med(bq), med(oq)))
print("\nPer round, MiB/s:")
for w in wls:
    for s in systems:
        print("%-18s %-12s %s" % (w, s, " ".join("%8.1f" % rows.get((w, s), {}).get(r, float("nan")) for r in rounds)))
EOF
