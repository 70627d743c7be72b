#!/usr/bin/env bash
# What TLS costs: a replicated pair (a witness and two `syncblock serve` nodes on loopback, default
# settings) with every link under TLS (NBD required, replication, witness; X.509 with a CA, so
# AES-GCM), interleaved with the same pair without TLS, and beside qemu-nbd with and without TLS on
# the same disk. Every round runs each system once per workload, in a rotating order (the machine
# is noisy); the script prints per-cell figures and the medians of per-round ratios against the
# targets of issue 15 (TLS/plain: randwrite ≥ 0.85, seqwrite ≥ 0.7, write+fsync ≥ 0.9; TLS pair /
# qemu-nbd TLS randwrite ≥ 2). An unreplicated `serve` with and without TLS runs too: qemu-nbd is
# unreplicated, so that is the like-for-like comparison with it.
#
#   bash benches/tls-cost.sh                 # 3 rounds x 6 systems x 3 workloads x 8 s, ~10 min
#   ROUNDS=5 RT=10 bash benches/tls-cost.sh
#
# The stores are created with --zero-fill (both pairs alike): a sparse store file makes every durable
# write wait for ext4 to allocate until the log has wrapped once, which on this machine's disk made
# cell-to-cell noise larger than the effect measured. TLS flags are the only difference between the
# pairs; everything else is the default.
#
# Then the CPU each pair spends per write at a fixed rate (CPU_IOPS, 15,000 4 KiB random writes
# a second, below every pair's capacity here, for CPU_RT seconds, rotating as above): the primary's,
# the secondary's and fio's, from their CPU times. At a fixed rate the batching is the same with
# and without TLS, so these are what TLS costs per write whatever the machine, while the ratios
# above depend on how the client, primary and secondary share this machine's cores.
#
# Environment (all optional): DIR (/var/tmp/tls-bench): scratch directory on the disk under test;
# ROUNDS (3); RT seconds per cell (8); SIZE (1G): the region fio touches; SKIP_BUILD=1;
# BASELINE=path/to/another/syncblock: a third pair with TLS, run by that binary, joins the rotation
# ("tlsbase"), for an interleaved before-and-after of a change to the TLS path.
#
# fio's nbd engine (libnbd) cannot be given a certificate directory in its URI (libnbd refuses
# local files in URIs unless the program allows them), so fio runs as the user `nobody` with HOME
# set to a directory whose .pki/libnbd holds the client's credentials: libnbd's default place for
# a non-root user (docs/security.md). Every system's fio runs that way, TLS or not.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
RT=${RT:-8}
SIZE=${SIZE:-1G}
BASE=${DIR:-/var/tmp/tls-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need "apt-get install fio qemu-utils openssl util-linux" fio qemu-nbd openssl setpriv
mkdir -p "$BASE"
refuse_tmpfs "$BASE" DIR
build_syncblock "$ROOT"
RUN=$(mktemp -d "$BASE/run.XXXXXX")
# The run directory goes at the end unless a cell failed (its logs stay for a look) or KEEP=1.
FAILED=0
trap 'kill_pids; if [ "$FAILED" = 0 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$RUN"; else echo "logs kept in $RUN" >&2; fi' EXIT
cd "$RUN"
cp "$TARGET/release/syncblock" "$RUN/syncblock"
BIN="$RUN/syncblock"
REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# Credentials, made as docs/security.md shows.
mkdir pki && (
  cd pki
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj '/CN=syncblock CA' -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
  for name in a b witness bench server; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
      -keyout $name-key.pem -out $name.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > $name.ext
    openssl x509 -req -in $name.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 3650 \
      -extfile $name.ext -out $name-cert.pem 2>/dev/null
  done
)
mkdir -p home/.pki/libnbd qemu-server
cp pki/ca-cert.pem home/.pki/libnbd/; cp pki/bench-cert.pem home/.pki/libnbd/client-cert.pem
cp pki/bench-key.pem home/.pki/libnbd/client-key.pem
cp pki/ca-cert.pem qemu-server/; cp pki/server-cert.pem qemu-server/server-cert.pem
cp pki/server-key.pem qemu-server/server-key.pem
chmod -R a+rX "$RUN"
chmod 0644 home/.pki/libnbd/client-key.pem
CLIENT_TLS=(--tls-cert pki/bench-cert.pem --tls-key pki/bench-key.pem --tls-ca pki/ca-cert.pem)

# A pair: witness, then b (secondary) and a (primary), each on its own store, defaults otherwise.
# $1: tag; $2: "tls" or "plain"; $3: the binary (default $BIN). Sets URI_<tag>.
start_pair() {
  local tag=$1 mode=$2 bin=${3:-$BIN} w_port a_repl b_repl a_admin b_admin nbd
  w_port=$(port); a_repl=$(port); b_repl=$(port); a_admin=$(port); b_admin=$(port); nbd=$(port)
  local -a w_tls=() a_tls=() b_tls=() st=()
  if [ "$mode" = tls ]; then
    w_tls=(--tls-cert pki/witness-cert.pem --tls-key pki/witness-key.pem --tls-ca pki/ca-cert.pem)
    a_tls=(--tls-cert pki/a-cert.pem --tls-key pki/a-key.pem --tls-ca pki/ca-cert.pem)
    b_tls=(--tls-cert pki/b-cert.pem --tls-key pki/b-key.pem --tls-ca pki/ca-cert.pem)
    st=("${CLIENT_TLS[@]}")
  fi
  "$bin" witness --listen 127.0.0.1:$w_port --state $tag-witness.state "${w_tls[@]}" >$tag-witness.log 2>&1 &
  PIDS+=($!)
  "$bin" serve --create --zero-fill --store $tag-b.img --size 3GiB --volume vol:2GiB --listen 127.0.0.1:$(port) \
    --role secondary --repl-listen 127.0.0.1:$b_repl --peer 127.0.0.1:$a_repl --node b \
    --witness 127.0.0.1:$w_port --admin 127.0.0.1:$b_admin "${b_tls[@]}" >$tag-b.log 2>&1 &
  PIDS+=($!)
  eval "PID_B_$tag=$!"
  "$bin" serve --create --zero-fill --store $tag-a.img --size 3GiB --volume vol:2GiB --listen 127.0.0.1:$nbd \
    --role primary --repl-listen 127.0.0.1:$a_repl --peer 127.0.0.1:$b_repl --node a \
    --witness 127.0.0.1:$w_port --admin 127.0.0.1:$a_admin "${a_tls[@]}" >$tag-a.log 2>&1 &
  PIDS+=($!)
  eval "PID_A_$tag=$!"
  for _ in $(seq 200); do "$BIN" status --admin 127.0.0.1:$a_admin "${st[@]}" >/dev/null 2>&1 && break; sleep 0.05; done
  "$BIN" status --admin 127.0.0.1:$a_admin --wait-sync --wait-max 60 "${st[@]}" >/dev/null ||
    { echo "pair $tag did not get in sync; logs in $RUN" >&2; for f in $tag-*.log; do echo "== $f" >&2; grep -v "^ *[0-9]*: \|^ *at " "$f" | tail -n 5 >&2; done; exit 1; }
  local scheme=nbd; [ "$mode" = tls ] && scheme=nbds
  eval "URI_$tag=$scheme://127.0.0.1:$nbd/vol"
}

# An unreplicated `syncblock serve` (defaults), for the comparison with qemu-nbd, which is
# unreplicated too. $1: tag; $2: "tls" or "plain".
start_single() {
  local tag=$1 nbd; nbd=$(port)
  local -a t=()
  [ "$2" = tls ] && t=(--tls-cert pki/server-cert.pem --tls-key pki/server-key.pem --tls-ca pki/ca-cert.pem)
  "$BIN" serve --create --zero-fill --store $tag.img --size 3GiB --volume vol:2GiB --listen 127.0.0.1:$nbd \
    "${t[@]}" >$tag.log 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do grep -q "://127.0.0.1:$nbd/vol" $tag.log 2>/dev/null && break; sleep 0.1; done
  local scheme=nbd; [ "$2" = tls ] && scheme=nbds
  eval "URI_$tag=$scheme://127.0.0.1:$nbd/vol"
}

start_qemu() { # $1 tag, $2 tls|plain
  local p; p=$(port)
  # Allocated, as the syncblock stores are (--zero-fill).
  dd if=/dev/zero of=$1.img bs=1M count=2048 oflag=direct status=none
  local -a t=()
  [ "$2" = tls ] && t=(--object tls-creds-x509,id=tls0,dir=$RUN/qemu-server,endpoint=server,verify-peer=yes --tls-creds tls0)
  qemu-nbd "${t[@]}" -f raw --aio=io_uring --cache=none --discard=unmap -b 127.0.0.1 -p $p -t -e 8 $1.img >$1.log 2>&1 &
  PIDS+=($!)
  sleep 1
  local scheme=nbd; [ "$2" = tls ] && scheme=nbds
  eval "URI_$1=$scheme://127.0.0.1:$p/"
}

FIO_AS=(setpriv --reuid=nobody --regid=nogroup --clear-groups env HOME=$RUN/home)
fio_cell() { # uri, fio args...: prints "iops MiB/s" or "FAILED"
  local uri=$1; shift
  "${FIO_AS[@]}" fio --name=x --size=$SIZE --runtime=$RT --time_based --group_reporting --output-format=json \
    --ioengine=nbd --uri="$uri" "$@" 2>/dev/null | sed -n '/^{/,$p' | $PY -c '
import json,sys
try:
    j=json.load(sys.stdin)["jobs"][0]
except Exception:
    print("FAILED"); sys.exit()
io=j["read"] if j["read"]["io_bytes"]>0 else j["write"]
print("%.0f %.1f" % (io["iops"], io["bw"]/1024))'
}

echo "tls-cost: rev $REV, $ROUNDS rounds x ${RT}s, region $SIZE, in $RUN" >&2
start_pair plain plain
start_pair tls tls
start_single single plain
start_single singletls tls
start_qemu qnbd plain
start_qemu qnbdtls tls
SYSTEMS=(plain tls single singletls qnbd qnbdtls)
if [ -n "${BASELINE:-}" ]; then
  cp "$BASELINE" "$RUN/baseline"
  start_pair tlsbase tls "$RUN/baseline"
  SYSTEMS+=(tlsbase)
fi
# Every system's volume written once in full over the region, so that all rounds measure
# rewrites (the log wrapped, the cleaner on for syncblock; allocated blocks for qemu-nbd).
for sys in "${SYSTEMS[@]}"; do
  uri_var=URI_$sys
  "${FIO_AS[@]}" fio --name=fill --ioengine=nbd --uri="${!uri_var}" --rw=write --bs=1m --iodepth=8 --size=$SIZE \
    >/dev/null 2>&1 || { echo "prefill of $sys failed" >&2; exit 1; }
done

WORKLOADS=(
  "randwrite4k_qd32 --rw=randwrite --bs=4k --iodepth=32"
  "seqwrite1m_qd8 --rw=write --bs=1m --iodepth=8"
  "syncwrite4k_qd1 --rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)
RESULTS=$RUN/results.txt
: >"$RESULTS"
for r in $(seq 1 "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    set -- $w; wn=$1; shift
    n=${#SYSTEMS[@]}
    for i in $(seq 0 $((n - 1))); do
      sys=${SYSTEMS[$(( (i + r + ${#wn}) % n ))]}
      uri_var=URI_$sys
      out=$(fio_cell "${!uri_var}" "$@") || out=FAILED
      if [ "$out" = FAILED ]; then
        FAILED=1
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || echo "process $pid has exited" >&2; done
      fi
      echo "$r $wn $sys $out" | tee -a "$RESULTS" >&2
    done
  done
done

# CPU per write at a fixed rate: for each pair, the CPU time its primary, its secondary and fio
# used over the run, divided by the writes done.
HZ=$(getconf CLK_TCK)
CPU_RESULTS=$RUN/cpu.txt
: >"$CPU_RESULTS"
PAIRS=(plain tls); [ -n "${BASELINE:-}" ] && PAIRS+=(tlsbase)
for r in $(seq 1 "$ROUNDS"); do
  n=${#PAIRS[@]}
  for i in $(seq 0 $((n - 1))); do
    sys=${PAIRS[$(( (i + r) % n ))]}
    uri_var=URI_$sys; a_var=PID_A_$sys; b_var=PID_B_$sys
    a0=$(ticks "${!a_var}"); b0=$(ticks "${!b_var}")
    out=$("${FIO_AS[@]}" fio --name=x --size=$SIZE --runtime=${CPU_RT:-8} --time_based --output-format=json \
      --ioengine=nbd --uri="${!uri_var}" --rw=randwrite --bs=4k --iodepth=32 --rate_iops=${CPU_IOPS:-15000} \
      2>/dev/null | sed -n '/^{/,$p')
    a1=$(ticks "${!a_var}"); b1=$(ticks "${!b_var}")
    line=$(echo "$out" | $PY -c '
import json, sys
a0, a1, b0, b1, hz = map(int, sys.argv[1:])
try:
    j = json.load(sys.stdin)["jobs"][0]
except Exception:
    print("FAILED"); sys.exit()
n = j["write"]["total_ios"]
fio = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["elapsed"]
print("%.0f %.1f %.1f %.1f" % (j["write"]["iops"], (a1 - a0) / hz / n * 1e6, (b1 - b0) / hz / n * 1e6, fio / n * 1e6))
' "$a0" "$a1" "$b0" "$b1" "$HZ")
    echo "cpu $r $sys $line" | tee -a "$CPU_RESULTS" >&2
  done
done

$PY - "$RESULTS" "$CPU_RESULTS" <<'EOF'
import sys, statistics
cells = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) < 5: continue
    r, w, s, iops = f[0], f[1], f[2], float(f[3])
    cells[(r, w, s)] = iops
rounds = sorted({k[0] for k in cells}); works = sorted({k[1] for k in cells})
def med(w, a, b):
    v = [cells[(r, w, a)] / cells[(r, w, b)] for r in rounds if (r, w, a) in cells and (r, w, b) in cells and cells[(r, w, b)] > 0]
    return statistics.median(v) if v else float("nan")
target = {"randwrite4k_qd32": 0.85, "seqwrite1m_qd8": 0.7, "syncwrite4k_qd1": 0.9}
print("%-18s %9s %9s %9s %8s | %9s %9s %9s | %9s %9s %9s" % ("workload", "pair TLS", "pair", "TLS/plain", "target",
      "serve TLS", "serve", "TLS/plain", "qemu TLS", "TLS/plain", "serve/qemu (TLS)"))
for w in works:
    m = lambda s: statistics.median([cells[(r, w, s)] for r in rounds if (r, w, s) in cells] or [float("nan")])
    print("%-18s %9.0f %9.0f %9.2f %8s | %9.0f %9.0f %9.2f | %9.0f %9.2f %9.2f" % (w, m("tls"), m("plain"),
          med(w, "tls", "plain"), ">= %.2f" % target[w], m("singletls"), m("single"), med(w, "singletls", "single"),
          m("qnbdtls"), med(w, "qnbdtls", "qnbd"), med(w, "singletls", "qnbdtls")))
if any(k[2] == "tlsbase" for k in cells):
    for w in works:
        print("%-18s baseline pair TLS/plain %5.2f; this pair TLS / baseline pair TLS %5.2f" % (w,
              med(w, "tlsbase", "plain"), med(w, "tls", "tlsbase")))
cpu = {}
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) == 7:
        cpu.setdefault(f[2], []).append([float(x) for x in f[3:]])
if cpu:
    print("CPU per 4 KiB write at a fixed rate (µs, medians over rounds): pair, iops, primary, secondary, fio, total")
    for s in [p for p in ("plain", "tls", "tlsbase") if p in cpu]:
        c = [statistics.median(col) for col in zip(*cpu[s])]
        print("  %-8s %7.0f %9.1f %9.1f %9.1f %9.1f" % (s, c[0], c[1], c[2], c[3], c[1] + c[2] + c[3]))
print("(iops are medians over rounds; ratios are medians of per-round ratios; seqwrite iops are 1 MiB writes)")
EOF
