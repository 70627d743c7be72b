# Helpers shared by the benchmark scripts that start syncblock processes; `source` it, after setting
# BIN (the syncblock binary, built here if missing) where the script uses a given binary. Not a
# script of its own.
#   port          a free TCP port on 127.0.0.1
#   json EXPR     evaluates EXPR on the JSON object read from stdin (as `d`) and prints it
#   status PORT   the replication status of the first volume of the node whose admin endpoint is
#                 on PORT (`syncblock status --json`, `volumes[0].replication`), or {}
#   wait_admin P  waits (up to 10 s) until that admin endpoint answers
#   ticks PID     the CPU time (user + system) process PID has used, in clock ticks (getconf CLK_TCK)
#   PIDS, kill_pids: processes to SIGKILL on exit (`trap kill_pids EXIT`)
#   find_peers ROOT       PEERS, unless set: ROOT/../shared/bench/peers.sh or /work/shared/bench/peers.sh
#   need HINT TOOL...     exits, naming HINT (what to install), if a TOOL is not installed
#   refuse_tmpfs DIR VAR  FSTYPE: DIR's file system type; exits if it is a tmpfs (VAR: the variable
#                         that picks another directory)
#   build_syncblock ROOT  TARGET (CARGO_TARGET_DIR or ROOT/target); builds the release syncblock
#                         binary there unless SKIP_BUILD=1
#   stop_server PID       SIGINT (a clean shutdown: flush + checkpoint), SIGKILL after 10 s
#   stop_peers PID        stops a peers.sh run interrupted mid-cell, and the servers it started
#   start_etcd DIR        one etcd member with its data in DIR/etcd, on free ports, with the
#                         election settings docs/cluster.md advises (1 s leases); sets ETCD (its
#                         client URL) and waits until `syncblock node list` answers
#   start_node NAME SIZE [FLAGS...]  a `syncblock node` with its store in RUN (see below)
#   make_disk NAME        DISK_CG: the emulated disk NAME when NODE_DISK_MIBS is set, else empty;
#                         `sh -c "$IN_DISK" "$DISK_CG" CMD...` runs CMD in it (see below)
#   await_joined NAME...  waits until those nodes have joined the cluster
#   open_run ROOT         BASE, BIN and RUN for a cluster benchmark, and its exit trap
PY=/usr/bin/python3
[ -z "${BIN:-}" ] || [ -x "$BIN" ] || cargo build --release -p syncblock-nbd
PIDS=()
kill_pids() { local p; for p in "${PIDS[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done; }
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json() { $PY -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
status() {
  { "$BIN" status --json --admin "127.0.0.1:$1" 2>/dev/null || echo '{}'; } |
    $PY -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps((d.get("volumes") or [{}])[0].get("replication") or {}))'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_admin() { for _ in $(seq 200); do "$BIN" status --json --admin "127.0.0.1:$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
find_peers() {
  if [ -z "${PEERS:-}" ]; then
    for p in "$1/../shared/bench/peers.sh" /work/shared/bench/peers.sh; do
      [ -f "$p" ] && { PEERS=$p; break; }
    done
  fi
  [ -n "${PEERS:-}" ] && [ -f "$PEERS" ] || { echo "peers.sh not found; set PEERS=" >&2; exit 1; }
}
need() {
  local hint=$1 t; shift
  for t in "$@"; do command -v "$t" >/dev/null || { echo "missing $t ($hint)" >&2; exit 1; }; done
}
refuse_tmpfs() {
  FSTYPE=$(df --output=fstype "$1" | tail -1 | tr -d ' ')
  if [ "$FSTYPE" = tmpfs ] || [ "$(stat -f -c %T "$1")" = tmpfs ]; then
    echo "$1 is a tmpfs; set $2 to a directory on the disk under test" >&2
    exit 1
  fi
}
build_syncblock() {
  TARGET=${CARGO_TARGET_DIR:-$1/target}
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$1" && cargo build --release -p syncblock-nbd --bin syncblock >&2)
  fi
}
stop_server() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -INT "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
}
stop_peers() {
  [ -n "$1" ] || return 0
  for c in $(ps -o pid= --ppid "$1"); do kill "$c" 2>/dev/null; done
  kill "$1" 2>/dev/null; wait "$1" 2>/dev/null
}
start_etcd() {
  local ec ep
  ec=$(port); ep=$(port)
  etcd --name e1 --data-dir "$1/etcd" --listen-client-urls "http://127.0.0.1:$ec" \
    --advertise-client-urls "http://127.0.0.1:$ec" --listen-peer-urls "http://127.0.0.1:$ep" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ep" --initial-cluster "e1=http://127.0.0.1:$ep" \
    --heartbeat-interval 50 --election-timeout 500 >"$1/etcd.log" 2>&1 &
  PIDS+=($!)
  ETCD="http://127.0.0.1:$ec"
  for _ in $(seq 100); do "$BIN" node list --etcd "$ETCD" >/dev/null 2>&1 && break; sleep 0.1; done
}
# etcd's current revision (one more for each write it applied).
etcd_revision() {
  etcdctl --endpoints "$ETCD" endpoint status -w json | $PY -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["header"]["revision"])'
}
# Starts `syncblock node` $1 with a store of size $2 in $RUN, on free loopback ports (NBD and
# replication; pass `--listen ADDR` to choose the NBD one), logging to $RUN/$1.out and .log; any
# further flags follow ($3...: `--admin ADDR`, `--grace 5`). Its pid goes in NODE_PID[$1] (an
# associative array the caller declares) and PIDS.
start_node() {
  local name=$1 size=$2 listen=()
  shift 2
  case " $* " in *" --listen "*) ;; *) listen=(--listen "127.0.0.1:$(port)") ;; esac
  make_disk "$name"
  sh -c "$IN_DISK" "$DISK_CG" "$BIN" node --etcd "$ETCD" --name "$name" --store "$RUN/$name.img" --size "$size" \
    --repl-listen "127.0.0.1:$(port)" "${listen[@]}" "$@" >"$RUN/$name.out" 2>"$RUN/$name.log" &
  NODE_PID[$name]=$!
  PIDS+=($!)
}
# Emulated disks, one per node: with NODE_DISK_MIBS=N, each node runs in a block-I/O cgroup of its
# own (`make_disk`; cgroup v2 `io.max`, or v1 `blkio.throttle.*`) that lets it read N MiB/s and
# write N MiB/s on the disk under RUN, as if each node had a disk of its own of that speed; with
# NODE_DISK_IOPS=M also at most M reads and M writes a second (an SSD's random 4 KiB limit). For
# measuring what a node does with its own disk on a machine with one: the nodes' reads and writes
# no longer queue behind each other's, as long as N times the nodes busy at once fits in what the
# real disk does. Needs root. The cgroups are removed on exit.
DISK_CGROUPS=()
DISK_DEV=""
make_disk() {
  local src parent dev bps
  DISK_CG=""
  [ -n "${NODE_DISK_MIBS:-}" ] || return 0
  if [ -z "$DISK_DEV" ]; then
    # The whole disk under RUN (throttles apply to disks, not partitions), found once.
    src=$(df --output=source "$RUN" | tail -1)
    parent=$(lsblk -no PKNAME "$src" | head -1 | tr -d ' ')
    [ -z "$parent" ] || src=/dev/$parent
    DISK_DEV=$(lsblk -dno MAJ:MIN "$src" | tr -d ' ')
  fi
  dev=$DISK_DEV
  bps=$((NODE_DISK_MIBS << 20))
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    DISK_CG=/sys/fs/cgroup/syncblock-bench-$$-$1
    grep -qw io /sys/fs/cgroup/cgroup.subtree_control || echo +io >/sys/fs/cgroup/cgroup.subtree_control
    mkdir -p "$DISK_CG"
    echo "$dev rbps=$bps wbps=$bps${NODE_DISK_IOPS:+ riops=$NODE_DISK_IOPS wiops=$NODE_DISK_IOPS}" >"$DISK_CG/io.max"
  else
    DISK_CG=/sys/fs/cgroup/blkio/syncblock-bench-$$-$1
    mkdir -p "$DISK_CG"
    echo "$dev $bps" >"$DISK_CG/blkio.throttle.read_bps_device"
    echo "$dev $bps" >"$DISK_CG/blkio.throttle.write_bps_device"
    if [ -n "${NODE_DISK_IOPS:-}" ]; then
      echo "$dev $NODE_DISK_IOPS" >"$DISK_CG/blkio.throttle.read_iops_device"
      echo "$dev $NODE_DISK_IOPS" >"$DISK_CG/blkio.throttle.write_iops_device"
    fi
  fi
  DISK_CGROUPS+=("$DISK_CG")
}
# `sh -c "$IN_DISK" "$DISK_CG" CMD...` runs CMD in the cgroup DISK_CG (none if empty) as the same
# process (so `$!` after a `&` is CMD's pid).
IN_DISK='[ -z "$0" ] || echo $$ >"$0/cgroup.procs" || exit 1; exec "$@"'
# Removes the emulated disks' cgroups (their processes must have exited).
remove_disks() {
  local d
  for d in "${DISK_CGROUPS[@]}"; do rmdir "$d" 2>/dev/null || true; done
}
# Waits until each node named has joined the cluster (20 s at most each).
await_joined() {
  local n
  for n in "$@"; do
    for _ in $(seq 200); do grep -qs "joined the cluster" "$RUN/$n.out" && break; sleep 0.1; done
  done
}
# The opening of a cluster benchmark: BASE made (refused if it is a tmpfs: the stores must be on
# the disk under test), the syncblock binary built unless BIN names one ($1: the repository), and
# RUN a fresh directory under BASE, removed on exit (kept with KEEP=1) once every process in PIDS
# has been killed.
open_run() {
  mkdir -p "$BASE"
  refuse_tmpfs "$BASE" DIR
  if [ -z "${BIN:-}" ]; then
    build_syncblock "$1"
    BIN=$TARGET/release/syncblock
  fi
  RUN=$(mktemp -d "$BASE/run.XXXXXX")
  trap 'kill_pids; remove_disks; [ "${KEEP:-0}" = 1 ] || rm -rf "$RUN"' EXIT
  trap 'exit 1' INT TERM
}
