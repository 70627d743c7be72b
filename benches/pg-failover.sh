#!/usr/bin/env bash
# PostgreSQL through the loss of its host, for many rounds (CI runs 3 in `cargo test`): runs
# nbd-server/tests/postgres.rs with PG_ROUNDS set and adds up its per-round lines. Each round kills
# the primary's "host" (syncblock serve, PostgreSQL, nbdfuse) under 6 committing clients, recovers
# ext4 and PostgreSQL on the survivor, checks every committed transaction, and resyncs the old
# primary (see the test's file doc). Needs root and what .ci/run installs.
#
#   benches/pg-failover.sh               20 rounds (about 6 s each, plus the build)
# Env: ROUNDS (default 20), PG_SEED (repeat a run's random choices), LOG (the test's output, default
# /var/tmp/pg-failover.log), PROFILE (release or dev, default release: the measured recovery time
# includes the syncblock binary's own work).
#
# Prints: rounds, committed transactions checked (every committed one, after the last failover),
# lost (must be 0), never sent but present (must be 0), torn (must be 0), and the recovery time (the
# host's death to the first commit on the survivor) and the promotion time, median/min/max.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-20}; LOG=${LOG:-/var/tmp/pg-failover.log}; PROFILE=${PROFILE:-release}
flags=(); [ "$PROFILE" = release ] && flags=(--release)
PG_ROUNDS=$ROUNDS cargo test "${flags[@]}" -p syncblock-nbd --test postgres -- --nocapture >"$LOG" 2>&1
status=$?
if grep -q 'skipping the PostgreSQL failover test' "$LOG"; then
  grep 'skipping the PostgreSQL failover test' "$LOG"; exit 1
fi
grep -E '^postgres failover test: seed' "$LOG"
awk '/^pg-failover round:/ { line = ""; for (i = 3; i <= NF; i++) if ($i ~ /^(round|killed|committed_round|checked|lost|never_sent_present|torn|promoted_ms|recovery_ms)=/) line = line " " $i; print line }' "$LOG"
awk '
  function field(name,   i, kv) { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == name) return kv[2] } return "" }
  function stats(a, n, label,   i, j, t) {
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    if (n == 0) { printf "%s: no rounds\n", label; return }
    printf "%s ms: median %d  min %d  max %d\n", label, (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2), a[1], a[n]
  }
  /^pg-failover round:/ {
    n++; checked = field("checked"); lost += field("lost"); never += field("never_sent_present");
    torn += field("torn"); uncertain = field("uncertain_present"); rec[n] = field("recovery_ms"); pro[n] = field("promoted_ms")
  }
  END {
    printf "rounds %d\ncommitted transactions checked %d (after the last round; each round checks all so far)\n", n, checked
    printf "lost %d (must be 0)\nnever sent but present %d (must be 0)\ntorn %d (must be 0)\n", lost, never, torn
    printf "sent and present, COMMIT never answered (allowed: the host died first) %d\n", uncertain
    stats(rec, n, "recovery (host death -> first new commit)"); stats(pro, n, "promotion (host death -> survivor primary)")
  }' "$LOG"
if [ $status -ne 0 ]; then
  echo "FAILED: the test exited with $status; see $LOG"
  grep -m1 -A12 'panicked' "$LOG"
  exit $status
fi
echo "ok (full output: $LOG)"
