#!/usr/bin/env bash
# A replicated syncblock pair (primary + secondary, two `syncblock serve` processes on loopback, as
# in docs/replication.md) side by side with an unreplicated `syncblock serve` and with QEMU's
# synchronous mirror (the `qemu-mirror` peer of ../shared/bench/peers.sh: a quorum of a local file
# and an NBD peer, vote-threshold=2), on this machine's disk. Every round runs each of the three
# once, in a rotating order (the machine is noisy); the script prints per-round figures and the
# medians of per-round ratios against the targets of issue 4, and says whether any fio run against
# our servers saw an error, a stall or a server that died.
#
#   bash benches/repl-peers.sh                  # 3 rounds x 3 systems x 4 workloads x 8 s, ~6-7 min
#   ROUNDS=5 RT=10 bash benches/repl-peers.sh
#
# Environment (all optional):
#   DIR (/var/tmp/repl-bench): scratch directory on the disk under test (a tmpfs is refused); each
#       run works in a fresh subdirectory of it and deletes it at the end (KEEP=1 keeps it)
#   ROUNDS (3); RT seconds per cell (8); SIZE (1G): the region fio touches, as in peers.sh
#   VOLUME_SIZE (2GiB): the volume `vol`; STORE_SIZE (3GiB): each store file
#   PREFILL (1): before the rounds, write every store's whole log once through NBD (sequential
#       1 MiB writes over SIZE, repeated), as peers.sh writes its files in full with dd
#   VERIFY (1): after the rounds, compare the primary's and the secondary's exports (qemu-img compare)
#   PEERS (/work/shared/bench/peers.sh or ../shared/bench/peers.sh); SKIP_BUILD=1; KEEP_RESULTS=path
#   SINGLE_ARGS: extra `serve` flags for the unreplicated server (e.g. --write-through)
#   QUIET_WAIT (120), QUIET_CPU (25): on a shared machine, wait up to QUIET_WAIT s before each cell
#       until no rustc runs and the host is under QUIET_CPU % busy; cells are tagged either way
#       (see "Someone else's build" below) and suspect ones are listed at the end
#
# The three syncblock servers run for the whole run (idle while another system is measured; the
# CPU time each server used during every cell is logged so that background work shows up); the
# QEMU mirror is started and stopped by peers.sh for its cell. Our fio command lines are those of
# peers.sh (same flags, same JSON parsing) but run here, so that fio's error field, a timeout
# (stall) and the servers' log lines can be recorded per cell.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
export RT=${RT:-8} SIZE=${SIZE:-1G}
VOLUME_SIZE=${VOLUME_SIZE:-2GiB}
STORE_SIZE=${STORE_SIZE:-3GiB}
BASE=${DIR:-/var/tmp/repl-bench}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
find_peers "$ROOT"
need "apt-get install fio qemu-utils qemu-system-common iproute2" \
    fio qemu-io qemu-img qemu-nbd qemu-storage-daemon python3 timeout ss
mkdir -p "$BASE"
refuse_tmpfs "$BASE" DIR
for port in 10814 10815; do   # peers.sh's qemu-mirror uses fixed ports
    if ss -ltnH "sport = :$port" | grep -q .; then echo "port $port (qemu-mirror in peers.sh) is in use" >&2; exit 1; fi
done

build_syncblock "$ROOT"
REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(cd "$ROOT" && git status --porcelain -uno 2>/dev/null | wc -l)"

RUN=$(mktemp -d "$BASE/run.XXXXXX")
cd "$RUN"   # nothing of this run lands in the source tree
# A private copy of the binary: a rebuild in the source tree during the run cannot swap it.
cp "$TARGET/release/syncblock" "$RUN/syncblock"
BIN="$RUN/syncblock"

PRIMARY=""; SECONDARY=""; SINGLE=""; RUNNING=""
SAMPLER=""
cleanup() {
    set +e
    [ -n "$SAMPLER" ] && { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; }
    stop_peers "$RUNNING"
    stop_server "$PRIMARY"; stop_server "$SECONDARY"; stop_server "$SINGLE"
    if [ "${KEEP:-0}" = 1 ]; then echo "# kept $RUN" >&2; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_line() { # file, regex: wait up to 30 s for a line of stdout
    for _ in $(seq 300); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    return 1
}
fail_start() { echo "$1 did not start:" >&2; sed 's/\x1b\[[0-9;]*m//g' "$2" >&2; exit 1; }

# Secondary first (replication and NBD ports chosen by the kernel, read back from its stdout), then
# the primary pointing at it, then the unreplicated server; all stores in the same directory.
"$BIN" serve --create --store "$RUN/b.img" --size "$STORE_SIZE" --volume="vol:$VOLUME_SIZE" --listen 127.0.0.1:0 \
    --role secondary --repl-listen 127.0.0.1:0 --node b >"$RUN/b.out" 2>"$RUN/b.err" &
SECONDARY=$!
wait_line "$RUN/b.out" '^nbd://' || fail_start secondary "$RUN/b.err"
REPL_ADDR=$(grep -m1 -o 'as secondary on [0-9.:]*' "$RUN/b.out" | awk '{print $4}')
SEC_URI=$(grep -m1 -o '^nbd://[^ ]*/vol' "$RUN/b.out")
"$BIN" serve --create --store "$RUN/a.img" --size "$STORE_SIZE" --volume="vol:$VOLUME_SIZE" --listen 127.0.0.1:0 \
    --role primary --peer "$REPL_ADDR" --node a >"$RUN/a.out" 2>"$RUN/a.err" &
PRIMARY=$!
wait_line "$RUN/a.out" '^nbd://' || fail_start primary "$RUN/a.err"
PRI_URI=$(grep -m1 -o '^nbd://[^ ]*/vol' "$RUN/a.out")
# SINGLE_ARGS: extra flags for it, e.g. --write-through to compare against answer-when-written.
"$BIN" serve --create --store "$RUN/s.img" --size "$STORE_SIZE" --volume="vol:$VOLUME_SIZE" --listen 127.0.0.1:0 \
    ${SINGLE_ARGS:-} >"$RUN/s.out" 2>"$RUN/s.err" &
SINGLE=$!
wait_line "$RUN/s.out" '^nbd://' || fail_start "unreplicated server" "$RUN/s.err"
SINGLE_URI=$(grep -m1 -o '^nbd://[^ ]*/vol' "$RUN/s.out")

# In sync: a small write + flush through the primary completes only once the secondary has it
# durably, i.e. after the first connection's full sync has committed.
in_sync() {
    local t0=$(date +%s.%N)
    timeout 60 qemu-io -f raw -c 'write -P 0 0 4k' -c flush "$PRI_URI" >/dev/null \
        || { echo "# pair NOT in sync after 60 s (write+flush through the primary did not complete)" >&2; return 1; }
    python3 -c "import sys; print('%.3f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$(date +%s.%N)"
}
echo "# primary $PRI_URI -> secondary (repl $REPL_ADDR, NBD $SEC_URI); unreplicated $SINGLE_URI" >&2
echo "# binary $(stat -c %y "$TARGET/release/syncblock" | cut -d. -f1) from a tree at $REV ($DIRTY modified tracked files now); stores $STORE_SIZE, volume $VOLUME_SIZE in $RUN ($FSTYPE on $(df --output=source "$RUN" | tail -1))" >&2
t=$(in_sync) || exit 1
echo "# pair in sync (write+flush through the primary took $t s); RT=$RT SIZE=$SIZE ROUNDS=$ROUNDS; peers: $PEERS" >&2

if [ "${PREFILL:-1}" = 1 ]; then
    loops=$(python3 - "$STORE_SIZE" "$SIZE" <<'EOF'
import re, sys
def b(s):
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B?)", s.strip(), re.I)
    return int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2].upper()]
print(max(1, -(-b(sys.argv[1]) // b(sys.argv[2]))))
EOF
)
    for u in "$PRI_URI" "$SINGLE_URI"; do
        t0=$SECONDS
        timeout 600 fio --name=prefill --ioengine=nbd --uri="$u" --rw=write --bs=1m --iodepth=8 --size="$SIZE" \
            --loops="$loops" --output-format=terse >/dev/null \
            || { echo "prefill of $u failed" >&2; exit 1; }
        echo "# prefilled $u: $loops x $SIZE in $((SECONDS - t0)) s" >&2
    done
    t=$(in_sync) || exit 1
    echo "# pair in sync after prefill ($t s); load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
fi

WORKLOADS=(   # the same as peers.sh
    "randwrite4k_qd32 --rw=randwrite --bs=4k --iodepth=32"
    "randread4k_qd32 --rw=randread --bs=4k --iodepth=32"
    "seqwrite1m_qd8 --rw=write --bs=1m --iodepth=8"
    "syncwrite4k_qd1 --rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)
cpu() { # pid -> CPU seconds used so far (utime + stime), or "dead"
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo dead
}
log_lines() { wc -l <"$1"; }
RESULTS="$RUN/results.txt"; EVENTS="$RUN/events.txt"; : >"$RESULTS"; : >"$EVENTS"

# Someone else's build or test run on this machine moves every figure. A sampler notes every second
# whether a rustc runs; before each cell we wait (at most QUIET_WAIT s) until none does and the
# host is idle (under QUIET_CPU % busy over 2 s, our servers being idle); each cell is tagged with
# the seconds a rustc ran, the host's CPU use and, for our cells, the CPU time of everything else
# ("others_cpu_s": host busy time minus our servers' and fio's; loopback softirq work not charged
# to a process lands here too, so a clean cell shows about 1 s).
(while :; do echo "$(date +%s) $(pgrep -xc rustc)"; sleep 1; done >"$RUN/busy.log" 2>/dev/null) & SAMPLER=$!
host_cpu() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }   # busy idle (ticks)
host_busy() { # "busy idle" at the start, "pct" or "secs" -> % of all CPUs busy since, or busy CPU seconds
    local b0=${1% *} i0=${1#* } now; now=$(host_cpu)
    awk -v b0="$b0" -v i0="$i0" -v b1="${now% *}" -v i1="${now#* }" -v what="$2" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { d = (b1 - b0) + (i1 - i0);
                 if (what == "secs") printf("%.1f", (b1 - b0) / hz);
                 else printf("%.0f", (d > 0) ? 100 * (b1 - b0) / d : 0) }'
}
wait_quiet() {
    local t0=$SECONDS h
    while [ $((SECONDS - t0)) -lt "${QUIET_WAIT:-120}" ]; do
        if ! pgrep -x rustc >/dev/null; then
            h=$(host_cpu); sleep 2
            [ "$(host_busy "$h" pct)" -lt "${QUIET_CPU:-25}" ] && break
        else
            sleep 2
        fi
    done
    [ $((SECONDS - t0)) -gt 3 ] && echo "# waited $((SECONDS - t0)) s for the machine to be quiet" >&2
    return 0
}
tag_cell() { # started-epoch, host_cpu at start -> " t=… rustc_s=N host_cpu=P% host_cpu_s=S"
    local h; h=$(host_busy "$2" pct)
    echo " t=$(date -d "@$1" +%T) rustc_s=$(awk -v t="$1" '$1 >= t && $2 > 0 { n++ } END { print n + 0 }' "$RUN/busy.log") host_cpu=$h% host_cpu_s=$(host_busy "$2" secs)"
}

run_ours() { # round, system name, uri
    local r=$1 sys=$2 uri=$3 w wn pids
    if [ "$sys" = repl ]; then pids="$PRIMARY $SECONDARY"; else pids="$SINGLE"; fi
    for w in "${WORKLOADS[@]}"; do
        set -- $w; wn=$1; shift
        wait_quiet
        local la=$(log_lines "$RUN/a.err") lb=$(log_lines "$RUN/b.err") ls=$(log_lines "$RUN/s.err")
        local c0="$(cpu $PRIMARY) $(cpu $SECONDARY) $(cpu $SINGLE)" e0=$(date +%s) h0=$(host_cpu)
        local rc=0
        timeout $((RT * 3 + 60)) fio --name=x --size="$SIZE" --runtime="$RT" --time_based --group_reporting \
            --output-format=json "$@" --ioengine=nbd --uri="$uri" >"$RUN/fio.json" 2>"$RUN/fio.err" || rc=$?
        local c1="$(cpu $PRIMARY) $(cpu $SECONDARY) $(cpu $SINGLE)" tag; tag=$(tag_cell "$e0" "$h0")
        python3 - "$sys" "$wn" "$rc" "$RUN/fio.json" "$RUN/fio.err" "$c0" "$c1" "$tag" <<'EOF' | sed "s/^/round=$r /" | tee -a "$RESULTS" >&2
import json, re, sys
sys_, wn, rc, jf, ef, c0, c1, tag = sys.argv[1:]
ours = 0.0
def cpu(a, b):
    global ours
    out = []
    for n, x, y in zip("pbs", a.split(), b.split()):
        if "dead" in (x, y):
            out.append("%s=dead" % n)
        else:
            ours += float(y) - float(x)
            out.append("%s=%.1f" % (n, float(y) - float(x)))
    return "cpu_s[" + ",".join(out) + "]"
err = open(ef).read().strip().replace("\n", " | ")[:300]
try:
    txt = open(jf).read()
    j = json.loads(txt[txt.index("{"):])["jobs"][0]
except Exception:
    print("%-12s %-18s FAILED rc=%s stderr=%r %s%s" % (sys_, wn, rc, err, cpu(c0, c1), tag))
    sys.exit()
io = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p = io["clat_ns"].get("percentile") or {"50.000000": 0, "99.000000": 0}
extra = ""
if j.get("sync", {}).get("total_ios"):
    sp = j["sync"]["lat_ns"].get("percentile") or {"50.000000": 0, "99.000000": 0}
    extra = " fsync_p50_us=%.1f fsync_p99_us=%.1f" % (sp["50.000000"] / 1000, sp["99.000000"] / 1000)
servers = cpu(c0, c1)
fio_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
m = re.search(r"host_cpu_s=(\S+)", tag)
others = float(m[1]) - ours - fio_s if m else float("nan")
print("%-12s %-18s iops=%9.0f MiB/s=%8.1f p50_us=%8.1f p99_us=%8.1f err=%s rc=%s%s %s fio_cpu_s=%.1f%s others_cpu_s=%.1f%s" % (
    sys_, wn, io["iops"], io["bw"] / 1024, p["50.000000"] / 1000, p["99.000000"] / 1000,
    j.get("error", "?"), rc, extra, servers, fio_s, tag, others,
    (" stderr=%r" % err) if err else ""))
EOF
        # New server log lines during the cell (replication events, warnings, errors).
        for f in a:$la b:$lb s:$ls; do
            local n=${f%%:*} from=${f#*:}
            tail -n +$((from + 1)) "$RUN/$n.err" | sed 's/\x1b\[[0-9;]*m//g' | sed "s/^/round=$r cell=$sys\/$wn log=$n: /" >>"$EVENTS"
        done
        for p in $pids; do kill -0 "$p" 2>/dev/null || echo "round=$r cell=$sys/$wn SERVER $p DIED" | tee -a "$EVENTS" >&2; done
    done
}

SYSTEMS=(repl single qemu-mirror)
for r in $(seq 1 "$ROUNDS"); do
    n=${#SYSTEMS[@]}
    for i in $(seq 0 $((n - 1))); do
        s=${SYSTEMS[$(( (i + r - 1) % n ))]}
        case $s in
            repl)
                t=$(in_sync) || { echo "round=$r repl NOT IN SYNC before the cell" | tee -a "$EVENTS" >&2; t=nan; }
                echo "round=$r repl in_sync_s=$t" >>"$EVENTS"
                run_ours "$r" repl "$PRI_URI" ;;
            single) run_ours "$r" single "$SINGLE_URI" ;;
            qemu-mirror)   # one peers.sh call runs the four workloads; tags cover all four
                wait_quiet; e0=$(date +%s); h0=$(host_cpu)
                DIR="$RUN/peers" bash "$PEERS" --only qemu-mirror >"$RUN/out" 2>"$RUN/peers.err" & RUNNING=$!
                wait $RUNNING || true; RUNNING=""; tag=$(tag_cell "$e0" "$h0")
                sed "s/^/round=$r /; s/\$/ (peers.sh call:$tag)/" "$RUN/out" | tee -a "$RESULTS" >&2 ;;
        esac
    done
    echo "# round $r done; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

if [ "${VERIFY:-1}" = 1 ]; then
    t=$(in_sync) || t=nan
    if timeout 300 qemu-img compare -f raw -F raw "$PRI_URI" "$SEC_URI" >"$RUN/compare.out" 2>&1; then
        echo "verify: primary and secondary exports identical ($VOLUME_SIZE; in_sync ${t} s)" | tee -a "$EVENTS" >&2
    else
        echo "verify: primary and secondary DIFFER or compare failed: $(head -3 "$RUN/compare.out" | tr '\n' ' ')" | tee -a "$EVENTS" >&2
    fi
fi
for p in "$PRIMARY" "$SECONDARY" "$SINGLE"; do kill -0 "$p" 2>/dev/null || echo "server $p not running at the end" | tee -a "$EVENTS" >&2; done
[ -n "${KEEP_RESULTS:-}" ] && { cp "$RESULTS" "$KEEP_RESULTS"; cp "$EVENTS" "$KEEP_RESULTS.events"; }

python3 - "$RESULTS" "$EVENTS" "$RT" <<'EOF'
import re, statistics as st, sys
LIMIT = 0.25 * float(sys.argv[3]) + 0.5   # others' CPU-s in a cell beyond which it is suspect
rows, bad, busy = {}, [], []  # (workload, system) -> {round: MiB/s}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) (\S+)\s+(\S+)\s+iops=\s*(\S+) MiB/s=\s*(\S+)", line)
    if m:
        rows.setdefault((m[3], m[2]), {})[int(m[1])] = float(m[5])
        e = re.search(r"err=(\S+) rc=(\S+)", line)
        if e and (e[1] != "0" or e[2] != "0"):
            bad.append(line.strip())
        b = re.search(r"rustc_s=(\d+)", line)
        o = re.search(r"others_cpu_s=(\S+)", line)
        if (b and int(b[1]) > 0) or (o and float(o[1]) > LIMIT):
            busy.append(line.strip())
    elif "FAILED" in line:
        bad.append(line.strip())
wls = ["randwrite4k_qd32", "randread4k_qd32", "seqwrite1m_qd8", "syncwrite4k_qd1"]
systems = ["repl", "single", "qemu-mirror"]
rounds = sorted({r for v in rows.values() for r in v})
med = lambda xs: st.median(xs) if xs else float("nan")
def ratios(w, a, b):
    out = []
    for r in rounds:
        x, y = rows.get((w, a), {}).get(r), rows.get((w, b), {}).get(r)
        out.append(x / y if x and y else float("nan"))
    return out
def mratio(xs):
    xs = [x for x in xs if x == x]
    return med(xs)
print("\nMedian MiB/s over %d rounds; ratios are medians of per-round ratios" % len(rounds))
print("%-18s%10s%10s%13s%14s%14s%15s" % ("workload", "repl", "single", "qemu-mirror",
                                         "repl/mirror", "repl/single", "single/mirror"))
for w in wls:
    print("%-18s" % w + "".join("%10.1f" % med(list(rows.get((w, s), {}).values())) for s in systems[:2])
          + "%13.1f" % med(list(rows.get((w, "qemu-mirror"), {}).values()))
          + "%14.2f%14.2f%15.2f" % (mratio(ratios(w, "repl", "qemu-mirror")),
                                    mratio(ratios(w, "repl", "single")),
                                    mratio(ratios(w, "single", "qemu-mirror"))))
print("\nTargets (median of per-round ratios; per round in brackets):")
for w, b, t in [("randwrite4k_qd32", "qemu-mirror", 5.0), ("randwrite4k_qd32", "single", 0.6),
                ("syncwrite4k_qd1", "qemu-mirror", 2.0)]:
    rs = ratios(w, "repl", b)
    m = mratio(rs)
    print("  repl/%-11s %-17s >= %.1fx: %5.2fx [%s] %s" % (b, w, t, m, " ".join("%.2f" % x for x in rs),
          "met" if m >= t else "MISSED"))
print("\nPer round, MiB/s:")
for w in wls:
    for s in systems:
        print("%-18s %-12s %s" % (w, s, " ".join("%8.1f" % rows.get((w, s), {}).get(r, float("nan")) for r in rounds)))
ev = [l.rstrip("\n") for l in open(sys.argv[2])]
alarm = [l for l in ev if re.search(r"WARN|ERROR|DIED|NOT IN SYNC|DIFFER|not running|panick", l)]
print("\nfio runs against our servers with an error, a timeout or no result: %d" % len(bad))
for l in bad: print("  " + l)
print("server log warnings/errors during the cells, deaths, sync failures: %d" % len(alarm))
for l in alarm[:40]: print("  " + l)
for l in ev:
    if l.startswith("verify:"): print(l)
insync = [l.split("in_sync_s=")[1] for l in ev if "in_sync_s=" in l]
print("write+flush through the primary before each repl cell took (s): %s" % " ".join(insync))
print("cells during which a rustc ran, or (ours) others used > %.1f CPU-s (figures suspect): %d" % (LIMIT, len(busy)))
for l in busy: print("  " + l)
print("(qemu-mirror: peers.sh discards fio's stderr; a failed cell shows as FAILED above only if fio gave no JSON)")
EOF
echo "# events (server log lines per cell): $( [ "${KEEP:-0}" = 1 ] && echo "$EVENTS" || echo 'set KEEP=1 to keep')" >&2
