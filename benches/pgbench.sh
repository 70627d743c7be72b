#!/usr/bin/env bash
# pgbench TPS of PostgreSQL on four storage stacks on this machine's disk, interleaved by round:
#   sb-single   an unreplicated `syncblock serve` volume              \
#   sb-pair     a replicated volume: witness + two `syncblock serve`   } each through nbdfuse, a
#               nodes on loopback, the defaults (docs/replication.md)  } loop device and ext4
#   qemu-nbd    qemu-nbd -f raw --cache=none --aio=native on a raw     /
#               file written full of zeros first
#   local       a directory on the local ext4 file system (no NBD)
# Each cell starts fresh: new store or file, mkfs.ext4, initdb, `pgbench -i -s SCALE`, then
# `pgbench -c CLIENTS -j 2 -T SECS`. PostgreSQL runs with fsync, synchronous_commit and
# full_page_writes on (its defaults), as user postgres. Prints one line per cell and, at the end, the
# median TPS per stack and its ratio to `local`. Not CI. Needs root, nbdfuse, qemu-nbd, PostgreSQL.
#
#   benches/pgbench.sh                       2 rounds, all stacks
#   ROUNDS=3 ONLY=sb-pair,local benches/pgbench.sh
# Env: DIR (scratch on the disk to measure, default /var/tmp/syncblock-pgbench), ROUNDS (2), SCALE
# (20), CLIENTS (8), SECS (30), ONLY (comma-separated stacks), BIN (default target/release/syncblock,
# built if missing), VOL_SIZE (3GiB, the volume/raw file), STORE_SIZE (6GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-/var/tmp/syncblock-pgbench}; ROUNDS=${ROUNDS:-2}; SCALE=${SCALE:-20}; CLIENTS=${CLIENTS:-8}
SECS=${SECS:-30}; ONLY=${ONLY:-sb-single,sb-pair,qemu-nbd,local}; BIN=${BIN:-target/release/syncblock}
VOL_SIZE=${VOL_SIZE:-3GiB}; STORE_SIZE=${STORE_SIZE:-6GiB}
BIN=$(realpath -m "$BIN")
# shellcheck source=benches/lib.sh
. benches/lib.sh
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
AS_PG=(setpriv --reuid="$(id -u postgres)" --regid="$(id -g postgres)" --clear-groups --)
bytes() { numfmt --from=auto "${1%B}"; }

MNT="$DIR/mnt"; FUSE="$DIR/fuse"; SOCK="$DIR/sock"; LOOP=""
# Retries "$@" for up to 10 s: a loop device detached a moment ago may still hold its file.
retry() { for _ in $(seq 40); do "$@" 2>/dev/null && return 0; sleep 0.25; done; "$@"; }
teardown() {
  local d
  for d in "$MNT/pgdata" "$DIR/local/pgdata"; do
    if [ -f "$d/postmaster.pid" ]; then "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true; fi
  done
  if mountpoint -q "$MNT"; then retry umount "$MNT" || echo "teardown: umount $MNT failed" >&2; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" || echo "teardown: losetup -d $LOOP failed" >&2; LOOP=""; fi
  if mountpoint -q "$FUSE"; then retry fusermount3 -u "$FUSE" || echo "teardown: fusermount3 -u $FUSE failed" >&2; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap teardown EXIT

# Waits until the process writing $1 prints a line matching $2; prints that line.
wait_line() { for _ in $(seq 600); do grep -m1 "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "no '$2' in $1" >&2; return 1; }

# Starts the stack named $1 and sets URI (NBD stacks only).
start_stack() {
  rm -rf "$DIR/s"; mkdir -p "$DIR/s"
  case $1 in
    sb-single)
      "$BIN" serve --create --store "$DIR/s/a.img" --size="$STORE_SIZE" --zero-fill --volume="vol:$VOL_SIZE" \
        --listen "127.0.0.1:0" >"$DIR/s/a.out" 2>"$DIR/s/a.log" & PIDS+=($!)
      URI="$(wait_line "$DIR/s/a.out" '(default export' | awk '{print $1}')/vol" ;;
    sb-pair)
      local w ar br
      "$BIN" witness --listen 127.0.0.1:0 --state "$DIR/s/witness.state" >"$DIR/s/w.out" 2>"$DIR/s/w.log" & PIDS+=($!)
      w=$(wait_line "$DIR/s/w.out" '^witness on ' | awk '{print $3}')
      ar=$(port); br=$(port); AADMIN=127.0.0.1:$(port)
      "$BIN" serve --create --store "$DIR/s/b.img" --size="$STORE_SIZE" --zero-fill --volume="vol:$VOL_SIZE" \
        --listen 127.0.0.1:0 --role secondary --repl-listen "127.0.0.1:$br" --peer "127.0.0.1:$ar" \
        --witness "$w" --admin "127.0.0.1:$(port)" --node b >"$DIR/s/b.out" 2>"$DIR/s/b.log" & PIDS+=($!)
      wait_line "$DIR/s/b.out" '^admin endpoint' >/dev/null
      "$BIN" serve --create --store "$DIR/s/a.img" --size="$STORE_SIZE" --zero-fill --volume="vol:$VOL_SIZE" \
        --listen 127.0.0.1:0 --role primary --repl-listen "127.0.0.1:$ar" --peer "127.0.0.1:$br" \
        --witness "$w" --admin "$AADMIN" --node a >"$DIR/s/a.out" 2>"$DIR/s/a.log" & PIDS+=($!)
      URI="$(wait_line "$DIR/s/a.out" '(default export' | awk '{print $1}')/vol"
      for _ in $(seq 600); do
        "$BIN" status --json --admin "$AADMIN" 2>/dev/null | grep -q '"in_sync":true' && break; sleep 0.1
      done ;;
    qemu-nbd)
      local p; p=$(port)
      dd if=/dev/zero of="$DIR/s/raw.img" bs=1M count=$(( $(bytes "$VOL_SIZE") >> 20 )) oflag=direct status=none
      qemu-nbd -f raw --cache=none --aio=native -b 127.0.0.1 -p "$p" -e 8 -t "$DIR/s/raw.img" \
        >"$DIR/s/q.log" 2>&1 & PIDS+=($!)
      for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$p" >/dev/null 2>&1 && break; sleep 0.1; done
      URI="nbd://127.0.0.1:$p" ;;
  esac
}

# nbdfuse, loop, ext4 on $URI, mounted on $MNT.
attach() {
  mkdir -p "$FUSE" "$MNT"
  rm -f "$DIR/nbdfuse.pid"
  nbdfuse -P "$DIR/nbdfuse.pid" "$FUSE/disk" "$URI" >"$DIR/s/nbdfuse.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 300); do [ -s "$DIR/nbdfuse.pid" ] && break; sleep 0.1; done
  LOOP=$(losetup --find --show "$FUSE/disk")
  mkfs.ext4 -q -F "$LOOP"
  mount -t ext4 "$LOOP" "$MNT"
}

# initdb in $1, start PostgreSQL, pgbench -i, pgbench; prints "init_s tps".
bench() {
  local data=$1
  mkdir -p "$data" "$SOCK"; chown postgres: "$data" "$SOCK" "$DIR/s"; chmod 700 "$data"
  "${AS_PG[@]}" "$PGBIN/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C >"$DIR/s/initdb.log" 2>&1
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$data" -w -l "$DIR/s/pg.log" \
    -o "-k $SOCK -c listen_addresses= -c fsync=on -c synchronous_commit=on -c full_page_writes=on" start >/dev/null
  local t0 t1 tps
  t0=$(date +%s.%N)
  "$PGBIN/pgbench" -h "$SOCK" -U postgres -i -s "$SCALE" -q postgres >"$DIR/s/init.log" 2>&1
  t1=$(date +%s.%N)
  tps=$("$PGBIN/pgbench" -h "$SOCK" -U postgres -c "$CLIENTS" -j 2 -T "$SECS" postgres 2>"$DIR/s/run.err" \
    | tee "$DIR/s/run.log" | awk '/^tps = / {print $3; exit}')
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  awk -v a="$t0" -v b="$t1" -v t="${tps:-FAILED}" 'BEGIN { printf "%.1f %s\n", b - a, t }'
}

mkdir -p "$DIR"; chmod 755 "$DIR"
RESULTS="$DIR/results.txt"; : >"$RESULTS"
echo "# $(date -u +%FT%TZ) $(nproc) cpus, commit $(git rev-parse --short HEAD 2>/dev/null), scale $SCALE, clients $CLIENTS, ${SECS}s, load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
  for stack in ${ONLY//,/ }; do
    if [ "$stack" = local ]; then
      rm -rf "$DIR/local" "$DIR/s"; mkdir -p "$DIR/local" "$DIR/s"; chmod 755 "$DIR/local"
      out=$(bench "$DIR/local/pgdata")
      rm -rf "$DIR/local"
    else
      start_stack "$stack"; attach
      out=$(bench "$MNT/pgdata")
      teardown
    fi
    set -- $out
    printf 'round %d %-10s init_s %6s  tps %10s  load %s\n' "$round" "$stack" "$1" "$2" "$(cut -d' ' -f1 /proc/loadavg)"
    echo "$stack $1 $2" >>"$RESULTS"
  done
done
rm -rf "$DIR/s"
echo "# median over rounds; ratio = tps / local tps"
awk '
  { tps[$1] = tps[$1] " " $3; init[$1] = init[$1] " " $2; if (!($1 in seen)) { order[++n] = $1; seen[$1] = 1 } }
  function median(list,   a, k, i, j, t) {
    k = split(list, a, " "); for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
  }
  END {
    base = ("local" in seen) ? median(tps["local"]) : 0
    for (i = 1; i <= n; i++) { s = order[i]; m = median(tps[s])
      printf "%-10s tps %10.1f  (runs:%s)  init_s %6.1f  ratio %s\n", s, m, tps[s], median(init[s]), base ? sprintf("%.2f", m / base) : "-" }
  }' "$RESULTS"
