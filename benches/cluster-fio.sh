#!/usr/bin/env bash
# What a client gets from a cluster volume against a `syncblock pair`, both with their defaults on
# the same disk: etcd and two `syncblock node`s on loopback with one replicated volume (its
# replication over the nodes' multiplexed link), and the README's first command's pair (both
# nodes and the witness in one process, replication over a TCP connection of its own). Both are
# filled once with sequential writes, then ROUNDS rounds alternate between them, each running
# fio's nbd engine on three workloads: 4 KiB random writes at depth 32, 1 MiB sequential writes
# at depth 8, and 4 KiB writes each followed by an fsync at depth 1. Prints each round and the
# medians, and the median of the per-round ratios cluster / pair.
#
#   bash benches/cluster-fio.sh        # ~4 min with the defaults
# Environment (all optional): DIR (/var/tmp/cluster-bench); SIZE (2G: the volume, and the region
# fio touches); RT (8 s per cell); ROUNDS (3); SKIP_BUILD=1; BIN (another syncblock binary).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-2G}
RT=${RT:-8}
ROUNDS=${ROUNDS:-3}
BASE=${DIR:-/var/tmp/cluster-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need "apt-get install etcd-server fio" etcd fio
open_run "$ROOT"

start_etcd "$RUN"
declare -A NODE_PID
for n in n1 n2; do start_node "$n" 8GiB; done
await_joined n1 n2
"$BIN" volume create c --size "${SIZE}iB" --etcd "$ETCD" >/dev/null
for _ in $(seq 300); do
  state=$("$BIN" volume list --json --etcd "$ETCD" | json "[v for v in d if v['name']=='c'][0]['state']")
  [ "$state" = in-sync ] && break
  sleep 0.2
done
CLUSTER=$("$BIN" volume list --json --etcd "$ETCD" | json "[v for v in d if v['name']=='c'][0]['nbd']")

PAIR_PORT=$(port)
"$BIN" pair --size=8GiB --listen "127.0.0.1:$PAIR_PORT" --data-dir "$RUN/pair" >"$RUN/pair.out" 2>"$RUN/pair.log" &
PIDS+=($!)
for _ in $(seq 200); do grep -qs "nbd://" "$RUN/pair.out" && break; sleep 0.1; done
PAIR="nbd://127.0.0.1:$PAIR_PORT/default"

for uri in "$CLUSTER" "$PAIR"; do
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size="$SIZE" --end_fsync=1 \
    --output-format=json >/dev/null 2>>"$RUN/fio.err" || { echo "fio failed: $(tail -3 "$RUN/fio.err")" >&2; exit 1; }
done
echo "cluster volume $CLUSTER and pair $PAIR, each filled with $SIZE; $ROUNDS rounds of $RT s per cell"

# One cell: prints the IOPS (or MiB/s for the sequential writes) of workload $2 on $1.
cell() {
  local args
  case $2 in
    randwrite) args="--rw=randwrite --bs=4k --iodepth=32" ;;
    seqwrite) args="--rw=write --bs=1M --iodepth=8" ;;
    fsync) args="--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
  esac
  # shellcheck disable=SC2086
  fio --name=cell --ioengine=nbd --uri="$1" $args --size="$SIZE" --time_based --runtime="$RT" \
    --randrepeat=0 --output-format=json 2>>"$RUN/fio.err" | sed -n '/^{/,$p' |
    json "d['jobs'][0]['write']['bw_bytes'] / 1048576 if '$2' == 'seqwrite' else d['jobs'][0]['write']['iops']"
}
: >"$RUN/results"
for r in $(seq "$ROUNDS"); do
  for w in randwrite seqwrite fsync; do
    # The order alternates round by round, so neither side always runs on a disk the other just
    # left busy.
    if [ $((r % 2)) = 1 ]; then order="cluster pair"; else order="pair cluster"; fi
    for side in $order; do
      if [ "$side" = cluster ]; then uri=$CLUSTER; else uri=$PAIR; fi
      v=$(cell "$uri" "$w")
      printf 'round %d %-9s %-7s %10.0f\n' "$r" "$w" "$side" "$v" | tee -a "$RUN/results"
    done
  done
done
$PY - "$RUN/results" <<'PYEOF'
import collections, statistics, sys
v = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    _, r, w, side, x = line.split()
    v[(w, int(r))][side] = float(x)
print("medians (4 KiB cells in IOPS, sequential in MiB/s):")
for w in ("randwrite", "seqwrite", "fsync"):
    rounds = [d for (ww, _), d in sorted(v.items()) if ww == w and len(d) == 2]
    c = statistics.median(d["cluster"] for d in rounds)
    p = statistics.median(d["pair"] for d in rounds)
    ratio = statistics.median(d["cluster"] / d["pair"] for d in rounds)
    print(f"  {w:9} cluster {c:9.0f}  pair {p:9.0f}  cluster/pair {ratio:.2f}")
PYEOF
