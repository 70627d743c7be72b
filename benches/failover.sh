#!/usr/bin/env bash
# Measures, with default settings, on this machine:
#   1. failover time: a witness and a replicated pair (degrade policy) on loopback; the primary is
#      SIGKILLed; time until the secondary, promoted automatically, completes a write (qemu-io);
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
[ -x "$BIN" ] || cargo build --release -p syncblock-nbd
PY=/usr/bin/python3
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
json() { $PY -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

start_node() { # name role repl peer admin nbd store
  "$BIN" --store "$7" serve --size=1GiB --volume=vol:256MiB --listen "127.0.0.1:$6" --role "$2" \
    --repl-listen "127.0.0.1:$3" --peer "127.0.0.1:$4" --witness "127.0.0.1:$W" --policy degrade \
    --admin "127.0.0.1:$5" --node "$1" >"$DIR/$1.out" 2>>"$DIR/$1.log" &
  PIDS+=($!); echo $!
}
wait_admin() { for _ in $(seq 200); do "$BIN" status --admin "127.0.0.1:$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
status() { "$BIN" status --admin "127.0.0.1:$1" 2>/dev/null || echo '{}'; }

fresh() {
  rm -rf "$DIR"; mkdir -p "$DIR"
  W=$(port); "$BIN" witness --listen "127.0.0.1:$W" --state "$DIR/witness.state" >/dev/null 2>>"$DIR/witness.log" &
  PIDS+=($!)
  AR=$(port); BR=$(port); AA=$(port); BA=$(port); AN=$(port); BN=$(port)
  B_PID=$(start_node b secondary "$BR" "$AR" "$BA" "$BN" "$DIR/b.img"); wait_admin "$BA"
  A_PID=$(start_node a primary "$AR" "$BR" "$AA" "$AN" "$DIR/a.img"); wait_admin "$AA"
  qemu-io -t writeback -f raw -c 'write -P 1 0 1M' -c flush "nbd://127.0.0.1:$AN/vol" >/dev/null
}

echo "# failover: SIGKILL primary → new primary completes a write (default 2 s heartbeat timeout)"
times=()
for r in $(seq "$ROUNDS"); do
  fresh
  t0=$(now_ms); kill -9 "$A_PID"
  until qemu-io -t writeback -f raw -c 'write -P 2 4M 4k' "nbd://127.0.0.1:$BN/vol" 2>/dev/null | grep -q '^wrote'; do
    [ $(( $(now_ms) - t0 )) -lt 30000 ] || { echo "round $r: no failover within 30 s"; tail -5 "$DIR/b.log"; exit 1; }
    sleep 0.02
  done
  ms=$(( $(now_ms) - t0 )); times+=("$ms"); echo "round $r: ${ms} ms"
  cleanup; PIDS=()
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "failover median %d ms (min %d, max %d, %d rounds)\n", a[int((NR+1)/2)], a[1], a[NR], NR}'

echo "# resync volume after an outage: $N distinct blocks written twice while the secondary is away"
fresh
kill -9 "$B_PID"
qemu-io -t writeback -f raw -c "write -P 3 8M $((N * 4))k" -c "write -P 4 8M $((N * 4))k" -c flush \
  "nbd://127.0.0.1:$AN/vol" >/dev/null
B_PID=$(start_node b secondary "$BR" "$AR" "$BA" "$BN" "$DIR/b.img"); wait_admin "$BA"
for _ in $(seq 600); do
  s=$(status "$AA"); [ "$(echo "$s" | json 'd.get("rpo_zero")')" = "True" ] && break; sleep 0.05
done
shipped=$(echo "$s" | json 'd["resync"]["bytes_shipped"]')
distinct=$((N * 4096))
echo "resync shipped $shipped bytes for $distinct distinct bytes written meanwhile: ratio $($PY -c "print(round($shipped/$distinct, 3))") (target ≤ 1.1)"
