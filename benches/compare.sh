#!/usr/bin/env bash
# Side-by-side comparison of the syncblock engine with fio (io_uring, O_DIRECT) on a plain file on
# the same disk, same access pattern. Runs are interleaved (ours, raw, ours, raw, ...) because the
# machine is noisy; the table quotes the median of the per-round ratios ours/raw.
#
#   bash benches/compare.sh                 # 3 rounds x 5 workloads x 10 s each, ~5-6 minutes
#   ROUNDS=5 RUNTIME=20 bash benches/compare.sh
#
# Environment (all optional):
#   SYNCBLOCK_BENCH_DIR  directory on the disk under test (default /var/tmp; a tmpfs is refused)
#   ROUNDS (3), RUNTIME seconds per run (10), WORKLOADS (see below)
#   RAW_BYTES (1G): the fio file, and the size of our volume
#   STORE_BYTES (2G): our store for the rewritten-store runs (volume = RAW_BYTES, so 50 % full)
#   FRESH_STORE_BYTES (8G): our store for the *-fresh runs, big enough that the log never wraps
#   SKIP_BUILD=1: use the already built target/release/engine_fio
#   ENGINE_BASE=path: another build of engine_fio (e.g. the commit before a refactoring), run in
#     every round right after ours on the same store, and reported as ours / base
#
# Workloads (ours: benches/src/bin/engine_fio.rs; raw: the fio job in fio_args below):
#   randwrite        4 KiB random writes, 32 in flight, rewritten store (cleaner active)
#   randwrite-fresh  the same on a freshly formatted, empty store (no cleaning: log append only)
#   randread         4 KiB random reads, 32 in flight, every block written
#   seqwrite         1 MiB sequential writes, 4 in flight, rewritten store
#   writeflush       4 KiB random write + flush (fio: fdatasync), 1 in flight
#
# Fresh-file effects: a sparse file pays the file system's extent allocation on first write, so the
# fio file and both store files are written in full before any measured run.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAW_BYTES=${RAW_BYTES:-1G}
STORE_BYTES=${STORE_BYTES:-2G}
FRESH_STORE_BYTES=${FRESH_STORE_BYTES:-8G}
WORKLOADS=${WORKLOADS:-"randwrite randwrite-fresh randread seqwrite writeflush"}
BASE=${SYNCBLOCK_BENCH_DIR:-/var/tmp}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need fio || ! need jq; then
    echo "installing fio and jq" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq fio jq >/dev/null
fi
if [ "$(stat -f -c %T "$BASE")" = tmpfs ]; then
    echo "$BASE is a tmpfs; set SYNCBLOCK_BENCH_DIR to a directory on the disk under test" >&2
    exit 1
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p syncblock-benches --bins >&2)
fi
ENGINE="$TARGET/release/engine_fio"
ENGINE_BASE=${ENGINE_BASE:-}

DIR=$(mktemp -d "$BASE/syncblock-compare.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
RAW="$DIR/raw.img"
STORE="$DIR/store.img"
FRESH="$DIR/store-fresh.img"
RESULTS="$DIR/results.tsv"

# The fio job matching each workload.
fio_args() {
    case "$1" in
        randwrite | randwrite-fresh) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
        seqwrite) echo "--rw=write --bs=1M --iodepth=4" ;;
        writeflush) echo "--rw=randwrite --bs=4k --iodepth=1 --fdatasync=1" ;;
        *) echo "unknown workload $1" >&2; exit 1 ;;
    esac
}

run_raw() {
    # shellcheck disable=SC2046
    fio --name=raw --filename="$RAW" --size="$RAW_BYTES" --ioengine=io_uring --direct=1 \
        --time_based=1 --runtime="$RUNTIME" --norandommap=1 --randrepeat=0 \
        --output-format=json $(fio_args "$1") |
        jq -c '.jobs[0] | (if .["job options"].rw | test("read") then .read else .write end)
               | {iops: (.iops | floor), mib_s: ((.bw_bytes / 1048576) * 10 | round / 10)}'
}

run_ours() {
    local engine=${2:-$ENGINE}
    local w=$1 extra=()
    case "$w" in
        randwrite-fresh) w=randwrite; extra=(--fresh --store-bytes "$FRESH_STORE_BYTES" --path "$FRESH") ;;
        *) extra=(--path "$STORE") ;;
    esac
    "$engine" run --workload "$w" --runtime-s "$RUNTIME" --volume-bytes "$RAW_BYTES" "${extra[@]}"
}

echo "== machine: $(nproc) cores, $(uname -r); files in $DIR ($(df -h --output=source,fstype "$DIR" | tail -1 | tr -s ' '))"
echo "== start: $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== preparing: fio file $RAW_BYTES written in full; store $STORE_BYTES with a $RAW_BYTES volume filled and overwritten at random once; fresh store file $FRESH_STORE_BYTES written in full"
fio --name=prefill --filename="$RAW" --size="$RAW_BYTES" --rw=write --bs=1M --iodepth=8 \
    --ioengine=io_uring --direct=1 --output-format=json >/dev/null
"$ENGINE" prepare --path "$STORE" --store-bytes "$STORE_BYTES" --volume-bytes "$RAW_BYTES" --overwrite-passes 1
# Preallocates the fresh store's file (a fresh run only formats it).
"$ENGINE" run --fresh --path "$FRESH" --store-bytes "$FRESH_STORE_BYTES" --volume-bytes "$RAW_BYTES" \
    --workload randwrite --runtime-s 1 >/dev/null

run_base() {
    local base
    if base=$(run_ours "$2" "$ENGINE_BASE"); then
        printf '%s\t%s\tbase\t%s\t%s\t\n' "$1" "$2" "$(jq -r .iops <<<"$base")" "$(jq -r .mib_s <<<"$base")" | tee -a "$RESULTS"
    else
        printf '%s\t%s\tbase\t0\t0\tFAILED\n' "$1" "$2" | tee -a "$RESULTS"
    fi
}

printf 'round\tworkload\tengine\tiops\tmib_s\tdetail\n' >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for w in $WORKLOADS; do
        # With a base build, the two alternate which goes first (a run right after raw fio's may
        # find the device still busy with its writes).
        if [ -n "$ENGINE_BASE" ] && [ $((round % 2)) = 0 ]; then run_base "$round" "$w"; fi
        if ours=$(run_ours "$w"); then
            iops=$(jq -r .iops <<<"$ours")
            mib=$(jq -r .mib_s <<<"$ours")
            detail=$(jq -r '"wa=\(.wa) gc_copied=\(.gc_blocks_copied) blocks/batch=\(.blocks_per_batch) syncs=\(.syncs) ckpts=\(.checkpoints) nudges=\(.nudges)"' <<<"$ours")
        else
            iops=0 mib=0 detail="FAILED (see stderr)"
        fi
        printf '%s\t%s\tours\t%s\t%s\t%s\n' "$round" "$w" "$iops" "$mib" "$detail" | tee -a "$RESULTS"
        if [ -n "$ENGINE_BASE" ] && [ $((round % 2)) = 1 ]; then run_base "$round" "$w"; fi
        raw=$(run_raw "$w")
        printf '%s\t%s\traw\t%s\t%s\t\n' "$round" "$w" "$(jq -r .iops <<<"$raw")" "$(jq -r .mib_s <<<"$raw")" | tee -a "$RESULTS"
    done
done

echo
echo "== end: $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== MiB/s per round; ratio = ours / raw in the same round; median of the ratios"
awk -F'\t' -v workloads="$WORKLOADS" '
    function median(s,    a, n, i, j, t) {
        n = split(s, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NR > 1 { v[$2, $1, $3] = $5; iops[$2, $1, $3] = $4; if ($1 > rounds) rounds = $1 }
    END {
        target["randwrite"] = ">= 2.0"; target["randwrite-fresh"] = ">= 2.0"; target["randread"] = ">= 0.8"
        target["seqwrite"] = ">= 0.9"; target["writeflush"] = "-"
        printf "%-16s %-24s %-24s %-20s %8s %8s %8s %8s\n", "workload", "ours MiB/s", "raw MiB/s", "ratios", "ours", "raw", "median", "target"
        printf "%-16s %-24s %-24s %-20s %8s %8s %8s %8s\n", "", "", "", "", "IOPS", "IOPS", "ratio", ""
        nw = split(workloads, ws, " ")
        for (k = 1; k <= nw; k++) {
            w = ws[k]; o = ""; r = ""; q = ""; oi = ""; ri = ""
            for (i = 1; i <= rounds; i++) {
                o = o sprintf("%.0f ", v[w, i, "ours"]); r = r sprintf("%.0f ", v[w, i, "raw"])
                oi = oi iops[w, i, "ours"] " "; ri = ri iops[w, i, "raw"] " "
                q = q sprintf("%.2f ", v[w, i, "raw"] > 0 ? v[w, i, "ours"] / v[w, i, "raw"] : 0)
            }
            printf "%-16s %-24s %-24s %-20s %8.0f %8.0f %8.2f %8s\n", w, o, r, q, median(oi), median(ri), median(q), target[w]
        }
        if (v[ws[1], 1, "base"] == "") exit
        printf "\n%-16s %-24s %-20s %8s %8s\n", "workload", "base MiB/s", "ours/base", "median", "base/raw"
        for (k = 1; k <= nw; k++) {
            w = ws[k]; b = ""; q = ""; qb = ""
            for (i = 1; i <= rounds; i++) {
                b = b sprintf("%.0f ", v[w, i, "base"])
                q = q sprintf("%.2f ", v[w, i, "base"] > 0 ? v[w, i, "ours"] / v[w, i, "base"] : 0)
                qb = qb sprintf("%.2f ", v[w, i, "raw"] > 0 ? v[w, i, "base"] / v[w, i, "raw"] : 0)
            }
            printf "%-16s %-24s %-20s %8.2f %8.2f\n", w, b, q, median(q), median(qb)
        }
    }' "$RESULTS"
