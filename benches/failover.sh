#!/usr/bin/env bash
# Measures, with default settings (no tuning flags), on this machine:
#   1. failover time: a witness and a replicated pair on loopback, started as docs/replication.md
#      starts them; the primary is SIGKILLed while a client writes; time until the secondary,
#      promoted automatically, completes a FUA write (a libnbd client that reconnects every 5 ms
#      and writes with FUA, as a client retrying would);
#   2. resync volume: the secondary is stopped, the primary writes N distinct 4 KiB blocks (each twice,
#      alone with the witness's consent), the secondary returns; bytes the resync shipped / (N × 4 KiB).
#
#   benches/failover.sh            ROUNDS (default 5) failovers, then the resync measurement
# Env: DIR (scratch, default /var/tmp/syncblock-failover), ROUNDS, N (default 2000), BIN (syncblock
# binary, default target/release/syncblock, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-/var/tmp/syncblock-failover}; ROUNDS=${ROUNDS:-5}; N=${N:-2000}
BIN=${BIN:-target/release/syncblock}
# shellcheck source=benches/lib.sh
. benches/lib.sh
trap kill_pids EXIT
now_ms() { date +%s%3N; }

start_node() { # name role repl peer admin nbd store
  "$BIN" serve --create --store "$7" --size=1GiB --volume=vol:256MiB --listen "127.0.0.1:$6" --role "$2" \
    --repl-listen "127.0.0.1:$3" --peer "127.0.0.1:$4" --witness "127.0.0.1:$W" \
    --admin "127.0.0.1:$5" --node "$1" >"$DIR/$1.out" 2>>"$DIR/$1.log" &
  echo $!
}

fresh() {
  rm -rf "$DIR"; mkdir -p "$DIR"
  W=$(port); "$BIN" witness --listen "127.0.0.1:$W" --state "$DIR/witness.state" >/dev/null 2>>"$DIR/witness.log" &
  PIDS+=($!)
  AR=$(port); BR=$(port); AA=$(port); BA=$(port); AN=$(port); BN=$(port)
  # start_node runs in a subshell: its PIDS+= is lost, so the pids are recorded here.
  B_PID=$(start_node b secondary "$BR" "$AR" "$BA" "$BN" "$DIR/b.img"); PIDS+=("$B_PID"); wait_admin "$BA"
  A_PID=$(start_node a primary "$AR" "$BR" "$AA" "$AN" "$DIR/a.img"); PIDS+=("$A_PID"); wait_admin "$AA"
  qemu-io -t writeback -f raw -c 'write -P 1 0 1M' -c flush "nbd://127.0.0.1:$AN/vol" >/dev/null
  for _ in $(seq 600); do
    [ "$(status "$AA" | json 'd.get("rpo_zero")')" = "True" ] && break; sleep 0.05
  done
}

# A client writing through the primary (4 KiB random writes, 8 in flight) while it is killed.
load() {
  fio --name=load --ioengine=nbd --uri="nbd://127.0.0.1:$AN/vol" --rw=randwrite --bs=4k --iodepth=8 \
    --size=64M --time_based --runtime=60 >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 1
}

# Kills the primary, then connects to the survivor every 5 ms until a FUA write completes; prints
# the milliseconds from the kill to that write's completion.
cat >"${DIR%/}.fua.py" <<'PY'
import os, signal, sys, time, nbd
pid, uri = int(sys.argv[1]), sys.argv[2]
t0 = time.monotonic()
os.kill(pid, signal.SIGKILL)
while time.monotonic() - t0 < 30:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.pwrite(b"\2" * 4096, 4 << 20, nbd.CMD_FLAG_FUA)
        print(round((time.monotonic() - t0) * 1000)); sys.exit(0)
    except nbd.Error:
        time.sleep(0.005)
    finally:
        del h
sys.exit("no failover within 30 s")
PY

echo "# failover: SIGKILL primary → the survivor completes a FUA write (defaults)"
times=()
for r in $(seq "$ROUNDS"); do
  fresh; load
  ms=$($PY "${DIR%/}.fua.py" "$A_PID" "nbd://127.0.0.1:$BN/vol") || { echo "round $r: no failover"; tail -5 "$DIR/b.log"; exit 1; }
  times+=("$ms"); echo "round $r: ${ms} ms"
  kill_pids; PIDS=()
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "failover median %d ms (min %d, max %d, %d rounds)\n", a[int((NR+1)/2)], a[1], a[NR], NR}'

echo "# resync volume after an outage: $N distinct blocks written twice while the secondary is away"
fresh
kill -9 "$B_PID"
qemu-io -t writeback -f raw -c "write -P 3 8M $((N * 4))k" -c "write -P 4 8M $((N * 4))k" -c flush \
  "nbd://127.0.0.1:$AN/vol" >/dev/null
B_PID=$(start_node b secondary "$BR" "$AR" "$BA" "$BN" "$DIR/b.img"); PIDS+=("$B_PID"); wait_admin "$BA"
for _ in $(seq 600); do
  s=$(status "$AA"); [ "$(echo "$s" | json 'd.get("rpo_zero")')" = "True" ] && break; sleep 0.05
done
shipped=$(echo "$s" | json 'd["resync"]["bytes_shipped"]')
distinct=$((N * 4096))
echo "resync shipped $shipped bytes for $distinct distinct bytes written meanwhile: ratio $($PY -c "print(round($shipped/$distinct, 3))") (target ≤ 1.1)"
