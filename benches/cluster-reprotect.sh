#!/usr/bin/env bash
# Re-protection speed (issue 13, docs/cluster.md "Re-protection"): how fast a node copies a volume
# to its new replica after its peer node is lost for good, against what the disk sustains, and
# what the volume's own random writes keep meanwhile.
#
#   1. the disk: fio sequential 1 MiB writes (O_DIRECT, depth 8) to a file in DIR, idle;
#   2. etcd and 4 `syncblock node`s on loopback; volume `r` (SIZE) filled with sequential writes
#      through its primary; fio 4 KiB random writes at depth 32 on it for RT seconds: the
#      foreground rate while both copies are in sync;
#   3. SIGKILL of the secondary's node, the volume idle: after the grace period the primary moves
#      the lost replica to another node and copies the whole volume there. The copy rate (SIZE /
#      time from the move to both copies in sync) against the disk (target >= 0.8), and what the
#      disk read and wrote meanwhile (/proc/diskstats) against what it sustains copying a file;
#   4. the same again (SIGKILL of the new secondary's node, the copy goes to the last node) while
#      the fio of step 2 runs, logging its IOPS every 500 ms: the foreground IOPS during the copy
#      against in sync (target >= 0.5), and the copy rate under that load.
#
# The nodes run with `--grace 5` instead of the default 600 s (the only non-default flag: the
# benchmark would otherwise wait ten minutes); etcd with --heartbeat-interval 50
# --election-timeout 500, as docs/cluster.md advises.
#
# Environment (all optional): DIR (/var/tmp/cluster-bench); SIZE (2G); RT (10); SKIP_BUILD=1;
# KEEP=1 keeps the run directory; NODE_DISK_MIBS=N gives each node a disk of its own of N MiB/s,
# emulated by a block-I/O cgroup (benches/lib.sh, "Emulated disks"; root only), and measures
# step 1 on such a disk: what a node does with a disk of its own, on a machine with one.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-2G}
RT=${RT:-10}
BASE=${DIR:-/var/tmp/cluster-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need "apt-get install etcd-server fio" etcd fio
open_run "$ROOT"
now() { date +%s.%N; }

make_disk disk
if [ -n "$DISK_CG" ]; then
  echo "1. each node's disk is emulated: $NODE_DISK_MIBS MiB/s of reads and as much of writes (NODE_DISK_MIBS)"
  echo "   such a disk, idle: sequential 1 MiB writes ..."
else
  echo "1. the disk, idle: sequential 1 MiB writes ..."
fi
DISK=$(sh -c "$IN_DISK" "$DISK_CG" fio --name=disk --filename="$RUN/disk.test" --rw=write --bs=1M --size="$SIZE" --direct=1 \
  --ioengine=libaio --iodepth=8 --end_fsync=1 --output-format=json | json 'd["jobs"][0]["write"]["bw_bytes"]')
echo "   $((DISK >> 20)) MiB/s"
echo "   and copying on this one disk: sequential 1 MiB reads of that file and writes of another at once ..."
# (With emulated disks, a copy reads one node's disk and writes another's: this measures the real
# disk doing both, which the emulation needs room for.)
DISKCOPY=$(fio --ioengine=libaio --direct=1 --bs=1M --iodepth=8 --size="$SIZE" --output-format=json \
  --name=rd --filename="$RUN/disk.test" --rw=read --name=wr --filename="$RUN/disk2.test" --rw=write --end_fsync=1 |
  json 'd["jobs"][1]["write"]["bw_bytes"]')
rm -f "$RUN/disk.test" "$RUN/disk2.test"
echo "   $((DISKCOPY >> 20)) MiB/s written while reading"

start_etcd "$RUN"
declare -A NODE_PID
for i in 1 2 3 4; do start_node "n$i" 16GiB --grace 5; done
await_joined n1 n2 n3 n4
"$BIN" volume create r --size "${SIZE}iB" --etcd "$ETCD" >/dev/null
# Fields of volume r from one `volume list`, space-separated: vol FIELD...
vol() {
  "$BIN" volume list --json --etcd "$ETCD" |
    json "' '.join(str([v for v in d if v['name']=='r'][0][k]) for k in '$*'.split())"
}
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

# Waits until the replica on $1 has moved away and the volume is in sync again; sets MOVED (when
# the primary learned of the move), DONE (when it committed the copy) and NEW (the new secondary).
# Both times come from the primary's own log lines, read every 0.1 s: asking etcd instead (a
# `volume list`, a process and a Python each time) took a tenth of this two-core machine from the
# copy being measured, and its 0.2 s step made a 3 s copy's figure wobble.
await_copy() {
  local log="$RUN/$PRIMARY.log" moves commits got=""
  moves=$(grep -c "other replica moved" "$log" || true)
  commits=$(grep -c "resync committed at tag" "$log" || true)
  for _ in $(seq 9000); do
    if [ "$(grep -c "other replica moved" "$log" || true)" -gt "$moves" ] &&
      [ "$(grep -c "resync committed at tag" "$log" || true)" -gt "$commits" ]; then
      got=1
      break
    fi
    sleep 0.1
  done
  [ -n "$got" ] || { echo "the copy away from $1 did not finish; logs in $RUN" >&2; KEEP=1; exit 1; }
  # The last move, and the first commit after it.
  read -r MOVED DONE NEW < <($PY - "$log" <<'PYEOF'
import re, sys
from datetime import datetime
lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(sys.argv[1], errors="replace")]
when = lambda l: datetime.fromisoformat(l.split()[0].replace("Z", "+00:00")).timestamp()
moved = [i for i, l in enumerate(lines) if "other replica moved" in l][-1]
done = next(i for i in range(moved, len(lines)) if "resync committed at tag" in lines[i])
new = re.search(r"new=(\S+)", lines[moved]).group(1)
print(when(lines[moved]), when(lines[done]), new)
PYEOF
  )
  read -r s st < <(vol secondary state)
  [ "$s" = "$NEW" ] && [ "$st" = in-sync ] ||
    { echo "the primary's log says the copy to $NEW finished, etcd says $s, $st; logs in $RUN" >&2; KEEP=1; exit 1; }
}
BYTES=$($PY -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")

# What the disk under DIR read and wrote during the copy: /proc/diskstats (sectors of 512 bytes)
# sampled every 0.1 s from the kill on, then taken between the samples nearest MOVED and DONE (the
# grace period before the copy is not always idle: the cleaner may be reclaiming what the random
# writes left). Prints "READ WRITE" in bytes per second.
DEV=$(basename "$(df --output=source "$RUN" | tail -1)")
sample_disk() {
  while :; do
    awk -v d="$DEV" -v t="$(now)" '$3 == d { printf "%s %.0f %.0f\n", t, $6 * 512, $10 * 512 }' /proc/diskstats
    sleep 0.1
  done >"$RUN/disk.samples"
}
copy_disk_rates() {
  $PY - "$RUN/disk.samples" "$MOVED" "$DONE" <<'PYEOF'
import sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 3]
t0, t1 = float(sys.argv[2]), float(sys.argv[3])
near = lambda t: min(rows, key=lambda r: abs(r[0] - t))
a, b = near(t0), near(t1)
secs = b[0] - a[0]
print(f"{(b[1] - a[1]) / secs:.0f} {(b[2] - a[2]) / secs:.0f}" if secs > 0 else "0 0")
PYEOF
}
echo "3. SIGKILL of $SECONDARY, the volume idle; re-protection after the 5 s grace period ..."
sample_disk &
SAMPLER=$!
PIDS+=($SAMPLER)
kill -9 "${NODE_PID[$SECONDARY]}"
{ wait "${NODE_PID[$SECONDARY]}"; } 2>/dev/null || true  # reaped here, so bash prints no "Killed" into the output
await_copy "$SECONDARY"
kill "$SAMPLER" 2>/dev/null || true
SECS=$(echo "$DONE - $MOVED" | bc -l)
COPY=$(echo "$BYTES / $SECS" | bc -l)
CONNECTS_BEFORE=$(grep -c "peer connected; resyncing" "$RUN/$PRIMARY.log" || true)
printf '   moved to %s; copied %s in %.1f s: %d MiB/s\n' "$NEW" "$SIZE" "$SECS" "$(echo "$COPY / 1048576" | bc)"
read -r RD WR < <(copy_disk_rates || echo "0 0")
if [ "${RD%.*}" -gt 0 ]; then
  printf '   the disk (%s) during the copy: read %d MiB/s, wrote %d MiB/s, %d MiB/s together (it sustains %d together copying a file)\n' \
    "$DEV" "$((RD >> 20))" "$((WR >> 20))" "$(((RD + WR) >> 20))" "$((2 * DISKCOPY >> 20))"
fi
SECONDARY=$NEW

echo "4. SIGKILL of $SECONDARY while 4 KiB random writes run ..."
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
{ wait "${NODE_PID[$SECONDARY]}"; } 2>/dev/null || true  # reaped here, so bash prints no "Killed" into the output
await_copy "$SECONDARY"
kill -INT "$FIO" 2>/dev/null || true
wait "$FIO" 2>/dev/null || true
SECS2=$(echo "$DONE - $MOVED" | bc -l)
# Copies started again (the link to the new replica failed and came back): a healthy copy has none.
RESTARTS=$(( $(grep -c "peer connected; resyncing" "$RUN/$PRIMARY.log" || true) - CONNECTS_BEFORE - 1 ))
COPY2=$(echo "$BYTES / $SECS2" | bc -l)
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
printf '   moved to %s; copied %s in %.1f s under load: %d MiB/s\n' "$NEW" "$SIZE" "$SECS2" "$(echo "$COPY2 / 1048576" | bc)"
printf '   foreground during the copy: %.0f IOPS; copy restarted %d times\n' "$DURING" "$RESTARTS"
printf 'copy / disk, idle: %.2f (target >= 0.8; %.2f of what this disk sustains copying); foreground during / in sync: %.2f (target >= 0.5); copy / disk under load: %.2f\n' \
  "$(echo "$COPY / $DISK" | bc -l)" "$(echo "$COPY / $DISKCOPY" | bc -l)" "$(echo "$DURING / $BEFORE" | bc -l)" "$(echo "$COPY2 / $DISK" | bc -l)"
