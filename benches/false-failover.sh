#!/usr/bin/env bash
# Checks, with default settings, that a healthy pair never fails over under full load: a witness
# and a replicated pair on loopback (as docs/replication.md starts them), fio 4 KiB random writes
# at queue depth 32 through the primary, and one CPU hog per core, for MINUTES (default 10).
# Prints the failovers (must be 0), the replication links lost and resyncs (reconnections cost a
# resync, not a failover), the epochs at the end, and fio's IOPS.
#
#   benches/false-failover.sh            MINUTES=10 by default
# Env: DIR (scratch, default /var/tmp/syncblock-false-failover), MINUTES, HOGS (default: CPUs),
# BIN (syncblock binary, default target/release/syncblock, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-/var/tmp/syncblock-false-failover}; MINUTES=${MINUTES:-10}; HOGS=${HOGS:-$(nproc)}
BIN=${BIN:-target/release/syncblock}
# shellcheck source=benches/lib.sh
. benches/lib.sh
trap kill_pids EXIT

rm -rf "$DIR"; mkdir -p "$DIR"
W=$(port); AR=$(port); BR=$(port); AA=$(port); BA=$(port); AN=$(port); BN=$(port)
"$BIN" witness --listen "127.0.0.1:$W" --state "$DIR/witness.state" >/dev/null 2>>"$DIR/witness.log" &
PIDS+=($!)
node() { # name role repl peer admin nbd
  "$BIN" serve --create --store "$DIR/$1.img" --size=2GiB --volume=vol:1GiB --listen "127.0.0.1:$6" --role "$2" \
    --repl-listen "127.0.0.1:$3" --peer "127.0.0.1:$4" --witness "127.0.0.1:$W" \
    --admin "127.0.0.1:$5" --node "$1" >"$DIR/$1.out" 2>>"$DIR/$1.log" &
  PIDS+=($!)
}
node b secondary "$BR" "$AR" "$BA" "$BN"; wait_admin "$BA"
node a primary "$AR" "$BR" "$AA" "$AN"; wait_admin "$AA"
for _ in $(seq 600); do [ "$(status "$AA" | json 'd.get("rpo_zero")')" = "True" ] && break; sleep 0.05; done
for _ in $(seq "$HOGS"); do $PY -c 'while True: pass' & PIDS+=($!); done
echo "# $MINUTES min of fio randwrite QD32 through the primary and $HOGS CPU hogs"
fio --name=load --ioengine=nbd --uri="nbd://127.0.0.1:$AN/vol" --rw=randwrite --bs=4k --iodepth=32 \
  --size=1G --time_based --runtime=$((MINUTES * 60)) --output-format=json >"$DIR/fio.json"
a=$(status "$AA"); b=$(status "$BA")
failovers=$(cat "$DIR/a.log" "$DIR/b.log" | grep -c "automatic failover" || true)
links=$(grep -c "replication link:" "$DIR/a.log" || true)
resyncs=$(echo "$a" | json 'd["resync"]["count"]')
echo "failovers: $failovers (must be 0)"
echo "a: role $(echo "$a" | json 'd["role"]'), epoch $(echo "$a" | json 'd["epoch"]'), rpo_zero $(echo "$a" | json 'd.get("rpo_zero")'); b: role $(echo "$b" | json 'd["role"]'), epoch $(echo "$b" | json 'd["epoch"]')"
echo "replication links lost: $links; resyncs: $resyncs (1 is the first sync)"
echo "fio: $($PY -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):]); print(round(j["jobs"][0]["write"]["iops"]), "IOPS")' "$DIR/fio.json")"
[ "$failovers" = 0 ] && [ "$(echo "$a" | json 'd["role"]')" = primary ]
