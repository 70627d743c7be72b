#!/usr/bin/env bash
# Re-protection speed (issue 13, docs/cluster.md "Re-protection"): how fast a node copies a volume
# to its new replica after its peer node is lost for good, against what the disk sustains, and
# what the volume's own random writes keep meanwhile.
#
#   1. the disk: fio sequential 1 MiB writes (O_DIRECT, depth 8) to a file in DIR, idle;
#   2. etcd and 3 `syncblock node`s on loopback; volume `r` (SIZE) filled with sequential writes
#      through its primary; fio 4 KiB random writes at depth 32 on it for RT seconds: the
#      foreground rate while both copies are in sync;
#   3. SIGKILL of the secondary's node while that fio runs again (logging its IOPS every 500 ms);
#      after the grace period the primary moves the lost replica to the third node and copies
#      the whole volume there: the copy rate (SIZE / time from the move to both copies in sync)
#      and the foreground IOPS during the copy, each as a ratio (targets: copy ≥ 0.8 × the disk,
#      foreground ≥ 0.5 × in sync).
#
# The nodes run with `--grace 5` instead of the default 600 s (the only non-default flag: the
# benchmark would otherwise wait ten minutes); etcd with --heartbeat-interval 50
# --election-timeout 500, as docs/cluster.md advises.
#
# Environment (all optional): DIR (/var/tmp/cluster-bench); SIZE (2G); RT (10); SKIP_BUILD=1;
# KEEP=1 keeps the run directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-2G}
RT=${RT:-10}
BASE=${DIR:-/var/tmp/cluster-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need "apt-get install etcd-server fio" etcd fio
mkdir -p "$BASE"
refuse_tmpfs "$BASE" DIR
build_syncblock "$ROOT"
BIN=$TARGET/release/syncblock
RUN=$(mktemp -d "$BASE/run.XXXXXX")
trap 'kill_pids; [ "${KEEP:-0}" = 1 ] || rm -rf "$RUN"' EXIT
trap 'exit 1' INT TERM
now() { date +%s.%N; }

echo "1. the disk, idle: sequential 1 MiB writes ..."
DISK=$(fio --name=disk --filename="$RUN/disk.test" --rw=write --bs=1M --size="$SIZE" --direct=1 \
  --ioengine=libaio --iodepth=8 --end_fsync=1 --output-format=json | json 'd["jobs"][0]["write"]["bw_bytes"]')
rm -f "$RUN/disk.test"
echo "   $((DISK >> 20)) MiB/s"

start_etcd "$RUN"
declare -A NODE_PID
for i in 1 2 3; do
  "$BIN" node --etcd "$ETCD" --name "n$i" --store "$RUN/n$i.img" --size 16GiB --grace 5 \
    --listen "127.0.0.1:$(port)" --repl-listen "127.0.0.1:$(port)" \
    >"$RUN/n$i.out" 2>"$RUN/n$i.log" &
  NODE_PID[n$i]=$!
  PIDS+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 200); do grep -qs "joined the cluster" "$RUN/n$i.out" && break; sleep 0.1; done
done
"$BIN" volume create r --size "${SIZE}iB" --etcd "$ETCD" >/dev/null
vol() { "$BIN" volume list --json --etcd "$ETCD" | json "[v for v in d if v['name']=='r'][0]['$1']"; }
for _ in $(seq 200); do [ "$(vol state)" = in-sync ] && break; sleep 0.2; done
URI=$(vol nbd); PRIMARY=$(vol primary); SECONDARY=$(vol secondary)
echo "2. volume r ($SIZE) on $PRIMARY (primary) and $SECONDARY: filling it ..."
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --size="$SIZE" --iodepth=8 --end_fsync=1 \
  --output-format=json >/dev/null
randwrite() { # $1: runtime, $2: extra fio args
  fio --name=fg --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
    --time_based --runtime="$1" --randrepeat=0 $2 --output-format=json 2>>"$RUN/fio.err" ||
    { echo "fio failed: $(tail -3 "$RUN/fio.err")" >&2; return 1; }
}
randwrite "$RT" "" >"$RUN/before.json"
# fio's nbd engine prints a line before the JSON.
BEFORE=$(sed -n '/^{/,$p' "$RUN/before.json" | json 'd["jobs"][0]["write"]["iops"]')
echo "   foreground 4 KiB random writes, in sync: ${BEFORE%.*} IOPS"

echo "3. SIGKILL of $SECONDARY; re-protection after the 5 s grace period ..."
FIO_START=$(now)
# fio itself in the background (not a function's subshell), so that SIGINT reaches it and it
# writes its IOPS log as it stops.
fio --name=fg --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
  --time_based --runtime=300 --randrepeat=0 --write_iops_log="$RUN/fg" --log_avg_msec=500 \
  --output-format=json >"$RUN/fg.json" 2>>"$RUN/fio.err" &
FIO=$!
PIDS+=($FIO)
sleep 2
kill -9 "${NODE_PID[$SECONDARY]}"
MOVED=""
for _ in $(seq 600); do
  s=$(vol secondary)
  if [ -z "$MOVED" ] && [ "$s" != "$SECONDARY" ]; then MOVED=$(now); NEW=$s; fi
  [ -n "$MOVED" ] && [ "$(vol state)" = in-sync ] && break
  sleep 0.2
done
DONE=$(now)
kill -INT "$FIO" 2>/dev/null || true
wait "$FIO" 2>/dev/null || true
[ -n "$MOVED" ] || { echo "the replica never moved; logs in $RUN" >&2; KEEP=1; exit 1; }
SECS=$(echo "$DONE - $MOVED" | bc -l)
BYTES=$($PY -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
COPY=$(echo "$BYTES / $SECS" | bc -l)
DURING=$($PY - "$RUN/fg_iops.1.log" "$FIO_START" "$MOVED" "$DONE" <<'EOF'
import sys
log, start, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
vals = []
for line in open(log):
    ms, v = line.split(",")[:2]
    t = start + int(ms) / 1000
    if t0 <= t <= t1:
        vals.append(int(v))
print(sum(vals) / len(vals) if vals else 0)
EOF
)
printf '   moved to %s; copied %s in %.1f s: %d MiB/s\n' "$NEW" "$SIZE" "$SECS" "$(echo "$COPY / 1048576" | bc)"
printf '   foreground during the copy: %.0f IOPS\n' "$DURING"
printf 'copy / disk: %.2f (target >= 0.8); foreground during / in sync: %.2f (target >= 0.5)\n' \
  "$(echo "$COPY / $DISK" | bc -l)" "$(echo "$DURING / $BEFORE" | bc -l)"
