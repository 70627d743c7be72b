//! Cluster mode's placement: which nodes hold the replicas of a new volume, and which node takes a new
//! replica when one is lost. Pure functions of a snapshot of node loads, so that `volume create`, re-protection and the
//! simulation can call them with no I/O, and deterministic, so that a simulation seed replays the same
//! placements.
//!
//! # Rules
//!
//! - **Eligible**: a node is eligible for a replica when it is alive and has room: `committed + size <=
//!   capacity`. Volumes are thin, but placement promises every volume its full size on every replica
//!   node and never overcommits: a node that runs out of space mid-write fails writes to a volume it has
//!   acknowledged, and that is worse than refusing the volume up front. A node with no capacity takes
//!   nothing, not even an empty volume (its fill fraction is undefined).
//! - **Zones**: no two replicas of a volume share a node or a labelled zone. A node without a zone label
//!   is a zone of its own: it clashes with no other node's zone. So a cluster without labels spreads over
//!   nodes, a cluster partly labelled (being migrated, or with a single odd node) still places, and two
//!   replicas never share a labelled zone. The risk this leaves, two unlabelled nodes that are in fact in
//!   one zone, is fixed by labelling them.
//! - **Balance**: the primary goes to the eligible node with the fewest primaries, so that primaries (who
//!   serve the I/O) spread evenly; ties go to the lowest fill, then to the name. Each secondary goes to
//!   the eligible node, clashing with none chosen so far, with the lowest fill; ties go to the fewest
//!   replicas, then to the name. The *fill* of a node is `(committed + size) / capacity`, the fraction
//!   the node would have committed with the new volume (not before it: with capacities that differ,
//!   "before" would send a large volume to a small empty node rather than to a large, half-full one that
//!   it fills less). Fractions are compared by cross-multiplying in `u128`, exactly.
//! - **Re-protection** (`replace`) takes the eligible, non-clashing node with the fewest bytes being
//!   copied to it (`incoming`), then by the secondary order. Copies take hours at scale, and the node
//!   that receives the most decides when every volume has two copies again: ordered by fill alone, an
//!   empty node that had just returned took the new replicas placed over several seconds, two to three
//!   times its share of the bytes, and re-protection of a lost zone took 8,943 s instead of 3,336 s
//!   (the control-plane simulation at 1,000 nodes, seed 1).
//! - **All or nothing**: a refusal names the first reason that applies, in the order of [`PlaceError`];
//!   a partial placement is never returned.
//!
//! Names identify nodes and must be unique. Ties end in the name, so the result does not depend on the
//! order of `nodes`.
//!
//! # Cost
//!
//! `place`: one pass over the nodes per replica (at most [`REPLICAS_MAX`]), no sorting and no allocation
//! besides the result: O(n) per call; about 15 µs for 2 replicas over 1,000 nodes in a release build
//! (ten times that unoptimised). The reason for a refusal is worked out only after the greedy pass fails.
//! `replace` (rare: once per lost replica) also sorts `exclude`, O(n + e log e).
//!
//! # Completeness and balance
//!
//! *Completeness*: "clashes" is an equivalence on nodes (same labelled zone; an unlabelled node only
//! with itself), so a valid placement of `r` replicas exists iff the eligible nodes span at least `r`
//! classes. Each greedy pick takes one node from a class not used yet, and a class with an eligible node
//! always remains while fewer than that many are picked: `place` succeeds whenever a valid placement
//! exists, whatever the primary and secondary orders are.
//!
//! *Primaries*: while every node is eligible, the primary goes to a node with the fewest primaries, so
//! the primaries of any two nodes differ by at most 1, whatever the sizes and zones.
//!
//! *Committed bytes*, for `n` nodes of equal capacity with room for everything, no zone labels, starting
//! empty, and volumes all of one size `s` with `r` replicas: the replicas of any two nodes differ by at
//! most 1, so committed bytes differ by at most `s`. Proof: number the nodes `0..n` in name order. With
//! equal loads, equal capacity and a common size, fill orders like replicas, so secondaries go by
//! (replicas, name). Claim: volume `t` lands exactly on the cyclic block `B_t = [rt, rt + r) mod n`,
//! which is the `r` lowest nodes by (replicas, name); as consecutive blocks tile the ring, this keeps
//! replicas level to within 1 and levels them every `n` volumes (a *round*, in which each node also
//! gets one primary). The block's secondaries are automatic once the primary is in `B_t`. The primary
//! is the (replicas, name)-first node without a primary this round; (replicas, name) order is the
//! cyclic order from `rt mod n`, so it is the first such node scanning forward from `rt mod n`. That is
//! linear probing: within a round, volume `k` hashes to `rk mod n`, which is a multiple of `g =
//! gcd(r, n)`, each multiple taken by exactly `g` volumes; by induction the `g` volumes hashing to `jg`
//! fill `[jg, jg + g)` and probe no further, so the primary is within `g <= r` steps: in `B_t`.
//!
//! With sizes that differ there is no such bound on bytes: the primary is chosen by count, so a
//! sequence that makes the big volumes the ones whose primary is the fullest node drifts without limit
//! (`committed_drifts_when_big_volumes_follow_the_primary_rule` below). In practice the room check
//! then moves primaries off the full node; balancing primaries by count is the price.

use std::cmp::Ordering;
use std::fmt;

/// Most replicas a volume may have. Cluster mode uses 2; more than a handful is a configuration
/// mistake, and the bound keeps the chosen set in a fixed array and each pick's clash check short.
pub const REPLICAS_MAX: usize = 8;

/// What placement knows about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub name: String,
    pub zone: Option<String>,
    pub alive: bool,
    /// The node's store capacity for volume data, bytes.
    pub capacity: u64,
    /// Sum of the sizes of the volumes (thin) that have a replica on this node, bytes: what is promised.
    pub committed: u64,
    /// Volumes whose primary is this node.
    pub primaries: u32,
    /// Volumes with any replica (primary or secondary) on this node.
    pub replicas: u32,
    /// Bytes being copied to this node: the sizes of the volumes whose secondary it is while their
    /// grant is solo (the primary acknowledges alone until its peer has caught up). Re-protection
    /// balances this, since the node receiving the most sets when every volume has two copies again.
    pub incoming: u64,
}

/// Why no placement was made. The variants are in the order they are checked: the first that applies
/// is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlaceError {
    /// `replicas` is not in `1..=REPLICAS_MAX` (for `replace`: the volume would have more).
    BadReplicas { replicas: usize },
    /// Fewer live nodes than replicas.
    TooFewNodes { alive: usize, replicas: usize },
    /// Zone labels are in use and the live nodes span fewer zones than replicas.
    TooFewZones { zones: usize, replicas: usize },
    /// The volume is larger than the whole capacity of every live node.
    TooLarge { size: u64, capacity_max: u64 },
    /// The nodes and zones are there, but only `fit` replicas find live nodes with room in distinct
    /// zones. `free_max` is the most uncommitted space on a live node (among those `replace` may use).
    NoRoom { size: u64, replicas: usize, fit: usize, free_max: u64 },
    /// `replace`: every live node holds a replica of the volume, is excluded, or shares a zone with a
    /// replica.
    NoSpare { alive: usize, ruled_out: usize },
}

impl fmt::Display for PlaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlaceError::BadReplicas { replicas } => {
                write!(f, "cannot place {replicas} replicas: a volume has 1 to {REPLICAS_MAX} replicas")
            }
            PlaceError::TooFewNodes { alive, replicas } => write!(
                f,
                "cannot place {replicas} replicas on distinct nodes: only {alive} node(s) are alive; likely cause: \
                 nodes down or not joined yet; bring nodes back, add nodes, or ask for fewer replicas"
            ),
            PlaceError::TooFewZones { zones, replicas } => write!(
                f,
                "cannot place {replicas} replicas in distinct zones: the live nodes span only {zones} zone(s) (a \
                 node without a zone label counts as a zone of its own); likely cause: a zone is down or nodes are \
                 labelled into too few zones; bring a zone back, add nodes in another zone, or ask for fewer replicas"
            ),
            PlaceError::TooLarge { size, capacity_max } => write!(
                f,
                "a volume of {} is larger than any live node's whole capacity (the largest is {}); create a \
                 smaller volume or add a larger node",
                Bytes(size),
                Bytes(capacity_max)
            ),
            PlaceError::NoRoom { size, replicas, fit, free_max } => write!(
                f,
                "no room for {replicas} replica(s) of a volume of {}: only {fit} fit on live nodes with that much \
                 uncommitted space in distinct zones, and the most uncommitted space on a live node is {}; \
                 likely cause: the cluster is full (thin volumes are promised their full size); delete volumes \
                 or add capacity",
                Bytes(size),
                Bytes(free_max)
            ),
            PlaceError::NoSpare { alive, ruled_out } => write!(
                f,
                "no node can take a new replica: {alive} node(s) are alive and {ruled_out} of them hold a replica \
                 of the volume, are excluded, or share a zone with a replica; bring a node back or add one in \
                 another zone"
            ),
        }
    }
}

impl std::error::Error for PlaceError {}

/// Chooses `replicas` nodes for a new volume of `size` bytes; the first is the primary.
///
/// All or none: refuses with the first reason that applies (see [`PlaceError`]) rather than place fewer.
pub fn place(nodes: &[NodeLoad], size: u64, replicas: usize) -> Result<Vec<String>, PlaceError> {
    if replicas == 0 || replicas > REPLICAS_MAX {
        return Err(PlaceError::BadReplicas { replicas });
    }
    let mut chosen = [0usize; REPLICAS_MAX];
    for k in 0..replicas {
        let picked = &chosen[..k];
        let best = nodes
            .iter()
            .enumerate()
            .filter(|&(idx, node)| has_room(node, size) && !picked.iter().any(|&i| clash(nodes, i, idx)))
            .min_by(|&(_, a), &(_, b)| if k == 0 { primary_order(a, b, size) } else { secondary_order(a, b, size) });
        match best {
            Some((idx, _)) => chosen[k] = idx,
            None => return Err(refusal(nodes, size, replicas, k)),
        }
    }
    Ok(chosen[..replicas].iter().map(|&idx| nodes[idx].name.clone()).collect())
}

/// Chooses a node for a new replica of a volume of `size` bytes whose surviving replicas are on
/// `keep` (re-protection after a node is lost): not a node in `keep` or `exclude`, not in a zone any
/// node in `keep` is in.
///
/// The new replica goes to the node with the fewest bytes being copied to it, then by the secondary
/// order (see the module doc, "Re-protection"). A name in `keep` that is not in
/// `nodes` rules out only that name (its zone is unknown); a dead node in `keep` still rules out its zone.
pub fn replace(nodes: &[NodeLoad], size: u64, keep: &[&str], exclude: &[&str]) -> Result<String, PlaceError> {
    // `keep` is bounded by this, so the per-node `keep` scans below stay short; `exclude` is not, so it
    // is sorted once (replace is rare: one call per lost replica).
    if keep.len() >= REPLICAS_MAX {
        return Err(PlaceError::BadReplicas { replicas: keep.len() + 1 });
    }
    let mut excluded = exclude.to_vec();
    excluded.sort_unstable();
    let kept_zones: Vec<&str> = nodes
        .iter()
        .filter(|node| keep.contains(&node.name.as_str()))
        .filter_map(|node| node.zone.as_deref())
        .collect();
    let ruled_out = |node: &NodeLoad| {
        keep.contains(&node.name.as_str())
            || excluded.binary_search(&node.name.as_str()).is_ok()
            || node.zone.as_deref().is_some_and(|zone| kept_zones.contains(&zone))
    };
    let best = nodes
        .iter()
        .filter(|node| has_room(node, size) && !ruled_out(node))
        .min_by(|a, b| a.incoming.cmp(&b.incoming).then_with(|| secondary_order(a, b, size)));
    if let Some(node) = best {
        return Ok(node.name.clone());
    }
    let n_alive = nodes.iter().filter(|node| node.alive).count();
    let n_ruled_out = nodes.iter().filter(|node| node.alive && ruled_out(node)).count();
    if n_ruled_out == n_alive {
        return Err(PlaceError::NoSpare { alive: n_alive, ruled_out: n_ruled_out });
    }
    let capacity_max = nodes.iter().filter(|node| node.alive).map(|node| node.capacity).max().unwrap_or(0);
    if size > capacity_max {
        return Err(PlaceError::TooLarge { size, capacity_max });
    }
    let free_max = nodes.iter().filter(|node| node.alive && !ruled_out(node)).map(free).max().unwrap_or(0);
    Err(PlaceError::NoRoom { size, replicas: 1, fit: 0, free_max })
}

/// Eligible for a replica of a volume of `size` bytes: alive, with capacity, and room for the whole size.
/// Every comparison in `fill_order` relies on this: capacity > 0 and `committed + size` does not overflow.
fn has_room(node: &NodeLoad, size: u64) -> bool {
    node.alive && node.capacity > 0 && node.committed.checked_add(size).is_some_and(|after| after <= node.capacity)
}

/// Nodes `a` and `b` may not both hold replicas of one volume: the same node, or two nodes in one
/// labelled zone. An equivalence, which is what makes the greedy complete.
fn clash(nodes: &[NodeLoad], a: usize, b: usize) -> bool {
    // Indices, not names (unique too): this runs for every node on every pick.
    a == b || (nodes[a].zone.is_some() && nodes[a].zone == nodes[b].zone)
}

/// Orders eligible nodes by fill, `(committed + size) / capacity`, exactly: both sides are at most
/// `u64::MAX * u64::MAX < u128::MAX` because `has_room` bounds `committed + size` by `capacity`.
fn fill_order(a: &NodeLoad, b: &NodeLoad, size: u64) -> Ordering {
    let after = |node: &NodeLoad| u128::from(node.committed) + u128::from(size);
    (after(a) * u128::from(b.capacity)).cmp(&(after(b) * u128::from(a.capacity)))
}

fn primary_order(a: &NodeLoad, b: &NodeLoad, size: u64) -> Ordering {
    a.primaries.cmp(&b.primaries).then_with(|| fill_order(a, b, size)).then_with(|| a.name.cmp(&b.name))
}

fn secondary_order(a: &NodeLoad, b: &NodeLoad, size: u64) -> Ordering {
    fill_order(a, b, size).then(a.replicas.cmp(&b.replicas)).then_with(|| a.name.cmp(&b.name))
}

fn free(node: &NodeLoad) -> u64 {
    node.capacity.saturating_sub(node.committed)
}

/// Why `place` found only `fit` of `replicas` nodes: the first reason in `PlaceError`'s order. Off the
/// hot path, so it rescans the nodes.
fn refusal(nodes: &[NodeLoad], size: u64, replicas: usize, fit: usize) -> PlaceError {
    let alive = || nodes.iter().filter(|node| node.alive);
    let n_alive = alive().count();
    if n_alive < replicas {
        return PlaceError::TooFewNodes { alive: n_alive, replicas };
    }
    // One live node per zone, up to `replicas`: below that, the count is exact.
    let mut zones = [0usize; REPLICAS_MAX];
    let mut n_zones = 0;
    for (idx, _) in nodes.iter().enumerate().filter(|(_, node)| node.alive) {
        if n_zones < replicas && !zones[..n_zones].iter().any(|&i| clash(nodes, i, idx)) {
            zones[n_zones] = idx;
            n_zones += 1;
        }
    }
    if n_zones < replicas {
        // Without labels every node is its own zone, and there are enough nodes.
        debug_assert!(alive().any(|node| node.zone.is_some()));
        return PlaceError::TooFewZones { zones: n_zones, replicas };
    }
    let capacity_max = alive().map(|node| node.capacity).max().unwrap_or(0);
    if size > capacity_max {
        return PlaceError::TooLarge { size, capacity_max };
    }
    PlaceError::NoRoom { size, replicas, fit, free_max: alive().map(free).max().unwrap_or(0) }
}

/// A byte count for an operator: exact, and past a KiB also in the largest binary unit it fills, to a
/// tenth rounded down ("3758096384 bytes (3.5 GiB)").
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        write!(f, "{} bytes", self.0)?;
        let Some(exp) = (1..=UNITS.len()).rev().find(|&exp| self.0 >> (10 * exp) > 0) else {
            return Ok(());
        };
        let tenths = (u128::from(self.0) * 10) >> (10 * exp);
        write!(f, " ({}.{} {})", tenths / 10, tenths % 10, UNITS[exp - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, zone: Option<&str>, capacity: u64) -> NodeLoad {
        NodeLoad {
            name: name.to_string(),
            zone: zone.map(str::to_string),
            alive: true,
            capacity,
            committed: 0,
            primaries: 0,
            replicas: 0,
            incoming: 0,
        }
    }

    fn with(mut node: NodeLoad, change: impl FnOnce(&mut NodeLoad)) -> NodeLoad {
        change(&mut node);
        node
    }

    /// Records a placement in the loads, as the cluster's bookkeeping would.
    fn commit(nodes: &mut [NodeLoad], chosen: &[String], size: u64) {
        for (k, name) in chosen.iter().enumerate() {
            let node = nodes.iter_mut().find(|node| node.name == *name).expect("placed on a known node");
            node.committed += size;
            node.replicas += 1;
            node.primaries += u32::from(k == 0);
        }
    }

    fn check(nodes: &[NodeLoad], size: u64, replicas: usize, expect: Result<&[&str], PlaceError>) {
        let expect = expect.map(|names| names.iter().map(|name| name.to_string()).collect());
        assert_eq!(place(nodes, size, replicas), expect);
    }

    #[test]
    fn refuses_zero_and_too_many_replicas() {
        let nodes: Vec<_> = (0..10).map(|i| node(&format!("n{i}"), None, GIB)).collect();
        check(&nodes, 1, 0, Err(PlaceError::BadReplicas { replicas: 0 }));
        check(&nodes, 1, REPLICAS_MAX + 1, Err(PlaceError::BadReplicas { replicas: REPLICAS_MAX + 1 }));
        assert_eq!(place(&nodes, 1, REPLICAS_MAX).map(|v| v.len()), Ok(REPLICAS_MAX));
    }

    #[test]
    fn refuses_more_replicas_than_live_nodes() {
        let nodes = [node("a", None, GIB), with(node("b", None, GIB), |n| n.alive = false)];
        check(&nodes, 1, 2, Err(PlaceError::TooFewNodes { alive: 1, replicas: 2 }));
        check(&[], 1, 1, Err(PlaceError::TooFewNodes { alive: 0, replicas: 1 }));
    }

    #[test]
    fn refuses_when_live_nodes_span_too_few_zones() {
        let nodes = [
            node("a", Some("z1"), GIB),
            node("b", Some("z1"), GIB),
            with(node("c", Some("z2"), GIB), |n| n.alive = false),
        ];
        check(&nodes, 1, 2, Err(PlaceError::TooFewZones { zones: 1, replicas: 2 }));
    }

    #[test]
    fn refuses_a_volume_larger_than_any_node() {
        let nodes = [node("a", None, 100), node("b", None, 90), with(node("c", None, 1000), |n| n.alive = false)];
        check(&nodes, 101, 1, Err(PlaceError::TooLarge { size: 101, capacity_max: 100 }));
        check(&nodes, 100, 1, Ok(&["a"]));
    }

    #[test]
    fn never_overcommits() {
        let nodes =
            [with(node("a", None, 100), |n| n.committed = 60), with(node("b", None, 100), |n| n.committed = 70)];
        check(&nodes, 30, 2, Ok(&["a", "b"]));
        check(&nodes, 31, 2, Err(PlaceError::NoRoom { size: 31, replicas: 2, fit: 1, free_max: 40 }));
        check(&nodes, 41, 1, Err(PlaceError::NoRoom { size: 41, replicas: 1, fit: 0, free_max: 40 }));
    }

    #[test]
    fn refuses_when_the_zones_with_room_are_too_few() {
        // Two zones, but z2's only node is full.
        let nodes = [
            node("a", Some("z1"), 100),
            node("b", Some("z1"), 100),
            with(node("c", Some("z2"), 100), |n| n.committed = 100),
        ];
        check(&nodes, 10, 2, Err(PlaceError::NoRoom { size: 10, replicas: 2, fit: 1, free_max: 100 }));
    }

    #[test]
    fn a_node_without_capacity_takes_nothing() {
        check(&[node("a", None, 0)], 0, 1, Err(PlaceError::NoRoom { size: 0, replicas: 1, fit: 0, free_max: 0 }));
    }

    #[test]
    fn spreads_replicas_across_zones() {
        let nodes = [
            node("a1", Some("a"), GIB),
            node("a2", Some("a"), GIB),
            node("b1", Some("b"), GIB),
            node("b2", Some("b"), GIB),
            node("c1", Some("c"), GIB),
        ];
        check(&nodes, 1, 3, Ok(&["a1", "b1", "c1"]));
        // a1 is half full and a2 has a primary already: the primary goes to b1 (fewest primaries, then
        // fill, then name), the secondary to a2 (as empty as c1, and first by name).
        let mut nodes = nodes.to_vec();
        nodes[0].committed = GIB / 2;
        nodes[1].primaries = 1;
        check(&nodes, 1, 2, Ok(&["b1", "a2"]));
        check(&nodes, 1, 4, Err(PlaceError::TooFewZones { zones: 3, replicas: 4 }));
    }

    #[test]
    fn unlabelled_nodes_are_zones_of_their_own() {
        let nodes =
            [node("a", Some("z1"), GIB), node("b", Some("z1"), GIB), node("c", None, GIB), node("d", None, GIB)];
        check(&nodes, 1, 2, Ok(&["a", "c"]));
        check(&nodes, 1, 3, Ok(&["a", "c", "d"]));
        check(&nodes, 1, 4, Err(PlaceError::TooFewZones { zones: 3, replicas: 4 }));
    }

    #[test]
    fn fill_counts_the_new_volume() {
        // Before the volume, small is the emptier (40% against 50%); with it, big (55% against 90%).
        let nodes = [
            with(node("big", None, 1000), |n| n.committed = 500),
            with(node("small", None, 100), |n| n.committed = 40),
        ];
        check(&nodes, 50, 1, Ok(&["big"]));
    }

    #[test]
    fn secondary_ties_go_to_fewest_replicas_then_name() {
        let nodes = [
            with(node("p", None, 100), |n| n.primaries = 0),
            with(node("x", None, 100), |n| (n.primaries, n.replicas) = (1, 3)),
            with(node("y", None, 100), |n| (n.primaries, n.replicas) = (1, 2)),
            with(node("z", None, 100), |n| (n.primaries, n.replicas) = (1, 2)),
        ];
        check(&nodes, 1, 3, Ok(&["p", "y", "z"]));
    }

    #[test]
    fn replace_sends_the_copy_to_the_node_receiving_the_least_then_the_emptiest() {
        let nodes = vec![
            node("keep", None, 100),
            // Empty, but already receiving two copies.
            with(node("empty", None, 100), |n| n.incoming = 20),
            with(node("half", None, 100), |n| n.committed = 50),
            with(node("third", None, 100), |n| (n.committed, n.incoming) = (33, 10)),
        ];
        assert_eq!(replace(&nodes, 10, &["keep"], &[]), Ok("half".to_string()));
        // Receiving alike: the lowest fill.
        let level: Vec<NodeLoad> = nodes.iter().cloned().map(|n| NodeLoad { incoming: 0, ..n }).collect();
        assert_eq!(replace(&level, 10, &["keep"], &[]), Ok("empty".to_string()));
        // New volumes do not look at copies in flight.
        assert_eq!(place(&nodes, 10, 2), Ok(vec!["empty".to_string(), "keep".to_string()]));
    }

    #[test]
    fn replace_avoids_the_survivors_and_their_zones() {
        let nodes = [
            node("a1", Some("a"), 100),
            node("a2", Some("a"), 100),
            with(node("b1", Some("b"), 100), |n| n.alive = false),
            with(node("b2", Some("b"), 100), |n| n.committed = 50),
            with(node("c1", Some("c"), 100), |n| n.committed = 60),
            with(node("u", None, 100), |n| n.committed = 70),
        ];
        assert_eq!(replace(&nodes, 10, &["a1"], &[]), Ok("b2".to_string()));
        assert_eq!(replace(&nodes, 10, &["a1"], &["b2"]), Ok("c1".to_string()));
        assert_eq!(replace(&nodes, 10, &["a1", "c1"], &["b2"]), Ok("u".to_string()));
        assert_eq!(
            replace(&nodes, 10, &["a1", "c1", "u"], &["b2"]),
            Err(PlaceError::NoSpare { alive: 5, ruled_out: 5 })
        );
        assert_eq!(
            replace(&nodes, 51, &["a1"], &[]),
            Err(PlaceError::NoRoom { size: 51, replicas: 1, fit: 0, free_max: 50 })
        );
        assert_eq!(replace(&nodes, 101, &["a1"], &[]), Err(PlaceError::TooLarge { size: 101, capacity_max: 100 }));
        // A dead survivor still rules out its zone (b2 would be the emptiest).
        assert_eq!(replace(&nodes, 10, &["b1"], &["a1", "a2"]), Ok("c1".to_string()));
        // A survivor the cluster no longer lists rules out only its name.
        assert_eq!(replace(&nodes, 10, &["gone"], &[]), Ok("a1".to_string()));
        let keep = ["a1"; REPLICAS_MAX];
        assert_eq!(replace(&nodes, 10, &keep, &[]), Err(PlaceError::BadReplicas { replicas: REPLICAS_MAX + 1 }));
    }

    #[test]
    fn messages_name_the_numbers() {
        let cases = [
            (PlaceError::BadReplicas { replicas: 9 }, "cannot place 9 replicas: a volume has 1 to 8 replicas"),
            (PlaceError::TooFewNodes { alive: 1, replicas: 2 }, "only 1 node(s) are alive"),
            (PlaceError::TooFewZones { zones: 1, replicas: 2 }, "span only 1 zone(s)"),
            (
                PlaceError::TooLarge { size: 3 * GIB + GIB / 2, capacity_max: 2 * GIB },
                "volume of 3758096384 bytes (3.5 GiB) is larger than any live node's whole capacity (the largest \
                 is 2147483648 bytes (2.0 GiB))",
            ),
            (
                PlaceError::NoRoom { size: 1000, replicas: 2, fit: 1, free_max: 999 },
                "no room for 2 replica(s) of a volume of 1000 bytes: only 1 fit",
            ),
            (PlaceError::NoSpare { alive: 3, ruled_out: 3 }, "3 node(s) are alive and 3 of them"),
        ];
        for (error, part) in cases {
            let message = error.to_string();
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
        assert_eq!(Bytes(1023).to_string(), "1023 bytes");
        assert_eq!(Bytes(1024).to_string(), "1024 bytes (1.0 KiB)");
        assert_eq!(Bytes(u64::MAX).to_string(), "18446744073709551615 bytes (15.9 EiB)");
    }

    /// The limit of the balance argument in the module doc: make the big volumes exactly those whose
    /// primary would be the fullest node, and that node's lead grows with every round.
    #[test]
    fn committed_drifts_when_big_volumes_follow_the_primary_rule() {
        let (big, small) = (100, 1);
        let mut nodes: Vec<_> = ["a", "b", "c"].iter().map(|name| node(name, None, u64::MAX)).collect();
        for _ in 0..300 {
            let probe = place(&nodes, big, 2).expect("room");
            let fullest = nodes.iter().map(|n| n.committed).max().expect("nodes");
            let primary = nodes.iter().find(|n| n.name == probe[0]).expect("known");
            let size = if primary.committed == fullest { big } else { small };
            let chosen = place(&nodes, size, 2).expect("room");
            commit(&mut nodes, &chosen, size);
        }
        let committed = || nodes.iter().map(|n| n.committed);
        let primaries = || nodes.iter().map(|n| n.primaries);
        assert!(committed().max().unwrap() - committed().min().unwrap() > 10 * big);
        assert!(primaries().max().unwrap() - primaries().min().unwrap() <= 1);
    }

    // --- Properties, against a model written independently of the code above: brute force over
    // subsets, and fills as floats (exact enough for the small numbers used here).

    fn model_room(node: &NodeLoad, size: u64) -> bool {
        node.alive && node.capacity > 0 && node.committed + size <= node.capacity
    }

    fn model_fill(node: &NodeLoad, size: u64) -> f64 {
        (node.committed + size) as f64 / node.capacity as f64
    }

    /// Node names in `set` are pairwise in distinct nodes and zones (unlabelled: a zone of its own).
    fn model_spread(set: &[&NodeLoad]) -> bool {
        set.iter()
            .enumerate()
            .all(|(i, a)| set[..i].iter().all(|b| a.name != b.name && (a.zone.is_none() || a.zone != b.zone)))
    }

    /// The most replicas that fit: the largest spread subset of nodes with room, by brute force.
    fn model_fit(nodes: &[NodeLoad], size: u64) -> usize {
        (0u32..1 << nodes.len())
            .map(|mask| (0..nodes.len()).filter(|i| mask & (1 << i) != 0).map(|i| &nodes[i]).collect::<Vec<_>>())
            .filter(|set| set.iter().all(|node| model_room(node, size)) && model_spread(set))
            .map(|set| set.len())
            .max()
            .unwrap_or(0)
    }

    fn model_zones(nodes: &[NodeLoad]) -> usize {
        let alive: Vec<_> = nodes.iter().filter(|n| n.alive).collect();
        let mut labels: Vec<_> = alive.iter().filter_map(|n| n.zone.as_deref()).collect();
        labels.sort_unstable();
        labels.dedup();
        labels.len() + alive.iter().filter(|n| n.zone.is_none()).count()
    }

    fn arb_nodes(max: usize) -> impl Strategy<Value = Vec<NodeLoad>> {
        // Copies in flight: mostly none, so that the secondary order decides as often as not.
        let incoming = prop_oneof![2 => Just(0u64), 1 => 0u64..=3];
        let one = (
            proptest::option::of(0u8..3),
            proptest::bool::weighted(0.85),
            0u64..=100,
            0u64..=110,
            0u32..4,
            0u32..6,
            incoming,
        );
        // Mostly at least half of `max`: fewer is mostly refused for too few nodes.
        let len = prop_oneof![1 => 0..=max, 3 => max / 2..=max];
        (len.prop_flat_map(move |len| proptest::collection::vec(one.clone(), len)), any::<bool>())
            .prop_map(|(nodes, zoned)| {
                nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (zone, alive, capacity, committed_pct, primaries, replicas, incoming))| NodeLoad {
                        name: format!("n{i}"),
                        zone: zone.filter(|_| zoned).map(|z| format!("z{z}")),
                        alive,
                        capacity,
                        // Mostly with room: nodes far over capacity test nothing more.
                        committed: capacity * committed_pct / 100,
                        primaries,
                        replicas,
                        incoming,
                    })
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
    }

    /// Mostly sizes that fit somewhere, sometimes larger than any node (capacities are at most 100).
    fn arb_size() -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0u64..=40, 1 => 0u64..=110]
    }

    /// Mostly counts that 6 nodes can hold, sometimes 0 or more than `REPLICAS_MAX`.
    fn arb_replicas() -> impl Strategy<Value = usize> {
        prop_oneof![8 => 1usize..=4, 1 => 5usize..=6, 1 => Just(0), 1 => REPLICAS_MAX..=REPLICAS_MAX + 1]
    }

    /// Names among n0..n5 (those `arb_nodes(6)` gives), each with probability 1/5, and sometimes `other`.
    fn arb_names(other: &'static str) -> impl Strategy<Value = Vec<&'static str>> {
        let names = ["n0", "n1", "n2", "n3", "n4", "n5", other];
        proptest::collection::vec(proptest::bool::weighted(0.2), names.len())
            .prop_map(move |picks| names.iter().zip(picks).filter(|(_, pick)| *pick).map(|(name, _)| *name).collect())
    }

    fn find<'a>(nodes: &'a [NodeLoad], name: &str) -> &'a NodeLoad {
        nodes.iter().find(|node| node.name == name).expect("a known node")
    }

    proptest! {
        // Cheap cases: many of them, so that close fills and rare refusals come up.
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn place_matches_brute_force(nodes in arb_nodes(6), size in arb_size(), replicas in arb_replicas()) {
            let fit = model_fit(&nodes, size);
            match place(&nodes, size, replicas) {
                Ok(chosen) => {
                    let set: Vec<_> = chosen.iter().map(|name| find(&nodes, name)).collect();
                    prop_assert_eq!(set.len(), replicas);
                    prop_assert!(set.iter().all(|node| model_room(node, size)));
                    prop_assert!(model_spread(&set));
                    // Each pick is the first, in its order, of the nodes it could have been.
                    let eligible = || nodes.iter().filter(|node| model_room(node, size));
                    let primary = |n: &NodeLoad| (n.primaries, model_fill(n, size), n.name.clone());
                    prop_assert!(eligible().all(|n| primary(set[0]) <= primary(n)));
                    let secondary = |n: &NodeLoad| (model_fill(n, size), n.replicas, n.name.clone());
                    for k in 1..replicas {
                        let mut open = eligible().filter(|n| model_spread(&[&set[..k], &[*n]].concat()));
                        prop_assert!(open.all(|n| secondary(set[k]) <= secondary(n)));
                    }
                }
                Err(error) => {
                    let alive = nodes.iter().filter(|n| n.alive).count();
                    let capacity_max = nodes.iter().filter(|n| n.alive).map(|n| n.capacity).max().unwrap_or(0);
                    let free_max = nodes.iter().filter(|n| n.alive).map(free).max().unwrap_or(0);
                    let expect = if replicas == 0 || replicas > REPLICAS_MAX {
                        PlaceError::BadReplicas { replicas }
                    } else if alive < replicas {
                        PlaceError::TooFewNodes { alive, replicas }
                    } else if model_zones(&nodes) < replicas {
                        PlaceError::TooFewZones { zones: model_zones(&nodes), replicas }
                    } else if size > capacity_max {
                        PlaceError::TooLarge { size, capacity_max }
                    } else {
                        PlaceError::NoRoom { size, replicas, fit, free_max }
                    };
                    prop_assert_eq!(error, expect);
                    // Never refused while a valid placement exists.
                    prop_assert!(replicas == 0 || replicas > REPLICAS_MAX || fit < replicas);
                }
            }
        }

        #[test]
        fn placement_ignores_the_order_of_nodes(
            (nodes, shuffled) in arb_nodes(12).prop_flat_map(|nodes| (Just(nodes.clone()), Just(nodes).prop_shuffle())),
            size in arb_size(),
            replicas in 1usize..=4,
        ) {
            prop_assert_eq!(place(&nodes, size, replicas), place(&nodes, size, replicas));
            prop_assert_eq!(place(&nodes, size, replicas), place(&shuffled, size, replicas));
            let keep: Vec<&str> = nodes.iter().take(1).map(|n| n.name.as_str()).collect();
            prop_assert_eq!(replace(&nodes, size, &keep, &[]), replace(&shuffled, size, &keep, &[]));
        }

        #[test]
        fn replace_matches_brute_force(
            nodes in arb_nodes(6),
            size in arb_size(),
            keep in arb_names("gone"),
            exclude in arb_names("x"),
        ) {
            let kept: Vec<&NodeLoad> = nodes.iter().filter(|n| keep.contains(&n.name.as_str())).collect();
            let spare = |n: &NodeLoad| {
                !keep.contains(&n.name.as_str())
                    && !exclude.contains(&n.name.as_str())
                    && kept.iter().all(|k| model_spread(&[k, n]))
            };
            match replace(&nodes, size, &keep, &exclude) {
                Ok(name) => {
                    let chosen = find(&nodes, &name);
                    prop_assert!(model_room(chosen, size) && spare(chosen));
                    let order = |n: &NodeLoad| (n.incoming, model_fill(n, size), n.replicas, n.name.clone());
                    let mut open = nodes.iter().filter(|n| model_room(n, size) && spare(n));
                    prop_assert!(open.all(|n| order(chosen) <= order(n)));
                }
                Err(error) => {
                    prop_assert!(!nodes.iter().any(|n| model_room(n, size) && spare(n)));
                    let alive = nodes.iter().filter(|n| n.alive).count();
                    let spares = nodes.iter().filter(|n| n.alive && spare(n));
                    let capacity_max = nodes.iter().filter(|n| n.alive).map(|n| n.capacity).max().unwrap_or(0);
                    let expect = if spares.clone().count() == 0 {
                        PlaceError::NoSpare { alive, ruled_out: alive }
                    } else if size > capacity_max {
                        PlaceError::TooLarge { size, capacity_max }
                    } else {
                        PlaceError::NoRoom { size, replicas: 1, fit: 0, free_max: spares.map(free).max().unwrap_or(0) }
                    };
                    prop_assert_eq!(error, expect);
                }
            }
        }

        /// The bound proved in the module doc: equal nodes, volumes of one size, from empty.
        #[test]
        fn equal_volumes_on_equal_nodes_stay_level(
            (n_nodes, replicas) in (1usize..=16).prop_flat_map(|n| (Just(n), 1..=n.min(REPLICAS_MAX))),
            names in proptest::collection::hash_set("[a-z]{1,4}", 16),
            size in 1u64..=u64::from(u32::MAX),
            n_volumes in 0usize..=200,
        ) {
            let mut nodes: Vec<_> = names.iter().take(n_nodes).map(|name| node(name, None, u64::MAX)).collect();
            for _ in 0..n_volumes {
                let chosen = place(&nodes, size, replicas).expect("room");
                commit(&mut nodes, &chosen, size);
                let spread = |get: fn(&NodeLoad) -> u64| {
                    nodes.iter().map(get).max().unwrap() - nodes.iter().map(get).min().unwrap()
                };
                prop_assert!(spread(|n| n.primaries.into()) <= 1);
                prop_assert!(spread(|n| n.replicas.into()) <= 1);
                prop_assert!(spread(|n| n.committed) <= size);
            }
        }

        /// Primaries stay level whatever the sizes (the bytes need not: see the drift test).
        #[test]
        fn primaries_stay_level_with_any_sizes(
            (n_nodes, replicas) in (1usize..=16).prop_flat_map(|n| (Just(n), 1..=n.min(REPLICAS_MAX))),
            sizes in proptest::collection::vec(0u64..=GIB, 0..200),
        ) {
            let mut nodes: Vec<_> = (0..n_nodes).map(|i| node(&format!("n{i}"), None, u64::MAX)).collect();
            for size in sizes {
                let chosen = place(&nodes, size, replicas).expect("room");
                commit(&mut nodes, &chosen, size);
                let primaries = || nodes.iter().map(|n| n.primaries);
                prop_assert!(primaries().max().unwrap() - primaries().min().unwrap() <= 1);
            }
        }
    }
}
