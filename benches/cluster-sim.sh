#!/usr/bin/env bash
# The control-plane simulation (replicator/tests/cluster_sim.rs) at the issue's scale, in release:
# 1,000 nodes in 3 zones holding 100,000 volumes of 8-64 GiB; FAULTS_S seconds of random faults
# (crashes, power cuts, zone outages, nodes cut off from etcd or from each other, forced promotions);
# then a whole zone fails for good. Each seed prints its report: etcd writes/s in the failover
# storm, time until every volume has two in-sync copies again at BANDWIDTH_MIB per receiving node.
# Then CI_SEEDS seeds at CI's scale (50 nodes, 2,000 volumes). Exits 1 if any seed breaks an
# invariant; its message names the seed (replay: CLUSTER_SIM_SEED=N, CLUSTER_SIM_TRACE=VOLUME).
#
#   benches/cluster-sim.sh     SEEDS (default 3) full-scale seeds (about 3 min each), then CI_SEEDS
# Env: SEEDS, FIRST_SEED (default 1), FAULTS_S (default 120), BANDWIDTH_MIB (default 1024),
#      CI_SEEDS (default 200), FAULTS_PER_MIN (default 120 at full scale, 60 at CI's),
#      FIXES=0 (model the code before the three fixes the simulation found: re-protection marks
#      the record solo, only a node the volume lists is promoted, a connected volume is not moved).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-3}; FIRST_SEED=${FIRST_SEED:-1}; FAULTS_S=${FAULTS_S:-120}
BANDWIDTH_MIB=${BANDWIDTH_MIB:-1024}; CI_SEEDS=${CI_SEEDS:-200}
export CLUSTER_SIM_FIXES=${FIXES:-1}
if [ -n "${FAULTS_PER_MIN:-}" ]; then export CLUSTER_SIM_FAULTS_PER_MIN=$FAULTS_PER_MIN; fi
sim() { cargo test --release -q -p syncblock-replicator --test cluster_sim "$@"; }

sim --no-run
failed=()
for seed in $(seq "$FIRST_SEED" $((FIRST_SEED + SEEDS - 1))); do
  if ! CLUSTER_SIM_FULL=1 CLUSTER_SIM_SEED=$seed CLUSTER_SIM_FAULTS_S=$FAULTS_S \
    CLUSTER_SIM_BANDWIDTH_MIB=$BANDWIDTH_MIB sim a_zone_failure_at_scale -- --nocapture 2>&1 |
    grep -E '^(cluster-sim|  |thread|seed)'; then
    failed+=("full-scale seed $seed")
  fi
done
echo "CI scale, $CI_SEEDS seeds:"
if ! CLUSTER_SIM_SEEDS=$CI_SEEDS sim random_faults_and_a_zone_failure_keep_every_invariant 2>&1 |
  grep -E '^(thread|seed|test result)'; then
  failed+=("CI scale")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
