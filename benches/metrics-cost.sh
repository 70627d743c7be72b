#!/usr/bin/env bash
# What counting requests for /metrics costs: `syncblock serve` with --admin (metrics on) and without,
# interleaved, 4 KiB random writes at QD32 and write+fsync at QD1 through fio's nbd engine. Not CI.
# Results: docs/benchmarks-nbd.md ("What the metrics cost").
set -u
BIN="${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/syncblock}"
D=/var/tmp/mbench; rm -rf $D; mkdir -p $D
iops() { sed -n '/^{/,$p' | /usr/bin/python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'; }
$BIN serve --create --zero-fill --store $D/s.img --size 4GiB --volume vol:2GiB --listen 127.0.0.1:0 > $D/init.out 2>/dev/null &
for i in $(seq 300); do grep -q "nbd://" $D/init.out && break; sleep 0.1; done; kill %1; wait
for round in 1 2 3; do
  for mode in admin plain; do
    extra=""; [ $mode = admin ] && extra="--admin 127.0.0.1:0"
    $BIN serve --store $D/s.img --listen 127.0.0.1:0 $extra > $D/out 2>$D/err &
    pid=$!
    for i in $(seq 50); do grep -q 'nbd://.*/vol' $D/out && break; sleep 0.1; done
    uri=$(grep -o 'nbd://[0-9.:]*/vol' $D/out | head -1)
    q32=$(fio --name=t --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --iodepth=32 --size=1G --runtime=15 --time_based --output-format=json 2>/dev/null | iops)
    q1=$(fio --name=t --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --iodepth=1 --fsync=1 --size=1G --runtime=15 --time_based --output-format=json 2>/dev/null | iops)
    echo "round $round $mode qd32 $q32 qd1fsync $q1"
    kill $pid; wait $pid
  done
done
