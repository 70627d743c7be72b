//! The control plane's decisions as pure functions of the cluster's state, shared by the nodes
//! (`member.rs`, `Cluster::replace_replica`) and the control-plane simulation, so that what the
//! simulation checks at 1,000 nodes is what the nodes run.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::placement::{self, NodeLoad, PlaceError};
use super::{Snapshot, VolumeSpec, VolumeView};

/// The volumes `me` must re-protect now: those whose granted primary it is and whose other
/// replica's node has been dead (by `dead_since`, this node's observation) for `grace` or more, or
/// is dead and was removed by an operator (`removed/NAME`). Returns (volume, lost node).
pub fn overdue(
    snap: &Snapshot,
    me: &str,
    dead_since: &BTreeMap<String, Instant>,
    now: Instant,
    grace: Duration,
) -> Vec<(String, String)> {
    snap.volumes
        .values()
        .filter(|v| snap.grants.get(&v.name).is_some_and(|g| g.pair == v.id && g.primary == me))
        .filter_map(|v| {
            let lost = v.replicas.iter().find(|r| *r != me)?;
            if snap.removed.contains(lost) && !snap.alive.contains_key(lost) {
                return Some((v.name.clone(), lost.clone()));
            }
            let since = dead_since.get(lost)?;
            (now.saturating_duration_since(*since) >= grace).then(|| (v.name.clone(), lost.clone()))
        })
        .collect()
}

/// The volume's record after moving its replica off `lost`: `keep` first (the surviving primary),
/// any other survivors, then the node placement chooses among `loads`. `None` if `lost` holds no
/// replica of it any more.
pub fn replacement(
    loads: &[NodeLoad],
    spec: &VolumeSpec,
    lost: &str,
    keep: &str,
) -> Result<Option<VolumeSpec>, PlaceError> {
    if !spec.replicas.iter().any(|r| r == lost) {
        return Ok(None);
    }
    let new = placement::replace(loads, spec.size, &[keep], &[lost])?;
    let mut moved = spec.clone();
    moved.replicas = std::iter::once(keep.to_string())
        .chain(spec.replicas.iter().filter(|r| *r != keep && *r != lost).cloned())
        .chain(std::iter::once(new))
        .collect();
    Ok(Some(moved))
}

/// A planned switchover: `volume`'s primary role from node `from` to node `to` (its secondary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub volume: String,
    pub from: String,
    pub to: String,
}

/// The switchovers that empty `node` of primaries (`syncblock node drain`): one per volume it is
/// the primary of and that is in sync with a live secondary; the others are returned apart, with
/// their state, since handing them over could lose writes (they stay where they are).
pub fn drain(snap: &Snapshot, node: &str) -> (Vec<Move>, Vec<(String, String)>) {
    let (mut moves, mut stuck) = (Vec::new(), Vec::new());
    for v in snap.volume_views().into_iter().filter(|v| v.primary == node) {
        match switchover(snap, &v) {
            Ok(m) => moves.push(m),
            Err(why) => stuck.push((v.name, why)),
        }
    }
    (moves, stuck)
}

/// The switchover of volume `v` to its secondary (`syncblock volume switchover`, and each of a
/// drain's), or why it would be refused: only to a live secondary of a volume in sync.
pub fn switchover(snap: &Snapshot, v: &VolumeView) -> Result<Move, String> {
    match &v.secondary {
        Some(s) if v.state == "in-sync" && snap.alive.contains_key(s) => {
            Ok(Move { volume: v.name.clone(), from: v.primary.clone(), to: s.clone() })
        }
        Some(s) if !snap.alive.contains_key(s) => Err(format!("its secondary {s} is down")),
        _ => Err(format!("not in sync ({})", v.state)),
    }
}

/// The switchovers that spread primaries evenly over the live nodes (`syncblock node balance`),
/// after failovers left them on the survivors: while a node holds at least two primaries more
/// than some secondary of one of its in-sync volumes, that volume moves there (to the secondary
/// with the fewest primaries). Each move lowers the spread, so there are at most as many moves as
/// volumes. Primaries can only move to a volume's own secondary: a node holding few replicas
/// ends with few primaries.
pub fn balance(snap: &Snapshot) -> Vec<Move> {
    let views = snap.volume_views();
    let mut count: BTreeMap<&str, usize> = snap.alive.keys().map(|n| (n.as_str(), 0)).collect();
    for v in &views {
        if let Some(c) = count.get_mut(v.primary.as_str()) {
            *c += 1;
        }
    }
    let mut movable: Vec<&super::VolumeView> = views
        .iter()
        .filter(|v| v.state == "in-sync" && v.secondary.as_ref().is_some_and(|s| count.contains_key(s.as_str())))
        .collect();
    let mut moves = Vec::new();
    loop {
        // The best move: from the busiest primary to the idlest secondary that gains by it.
        let best = movable
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let s = v.secondary.as_deref().expect("filtered");
                let (from, to) = (count[v.primary.as_str()], count[s]);
                (from >= to + 2).then_some((from - to, std::cmp::Reverse(to), i))
            })
            .max_by_key(|(gain, idle, i)| (*gain, *idle, std::cmp::Reverse(*i)));
        let Some((_, _, i)) = best else { break };
        let v = movable.swap_remove(i);
        let s = v.secondary.as_deref().expect("filtered");
        *count.get_mut(v.primary.as_str()).expect("counted") -= 1;
        *count.get_mut(s).expect("counted") += 1;
        moves.push(Move { volume: v.name.clone(), from: v.primary.clone(), to: s.to_string() });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{GrantDoc, MemberInfo};

    fn snap() -> Snapshot {
        let mut s = Snapshot::default();
        for (n, z) in [("a", "z1"), ("b", "z2"), ("c", "z1"), ("d", "z3")] {
            s.members.insert(
                n.into(),
                MemberInfo {
                    name: n.into(),
                    zone: Some(z.into()),
                    nbd: String::new(),
                    tls: false,
                    repl: "127.0.0.1:1".parse().unwrap(),
                    admin: None,
                    capacity: 1 << 30,
                },
            );
            s.alive.insert(n.into(), 1);
        }
        let v = VolumeSpec { name: "v".into(), size: 1 << 20, replicas: vec!["a".into(), "b".into()], id: 7 };
        s.grants.insert("v".into(), GrantDoc { pair: 7, epoch: 2, primary: "a".into(), solo: true, synced: true });
        s.volumes.insert("v".into(), v);
        s
    }

    #[test]
    fn a_volume_being_copied_counts_as_incoming_on_its_secondary_only() {
        let mut s = snap();
        let load = |s: &Snapshot, n: &str| s.loads().into_iter().find(|l| l.name == n).unwrap();
        // `v` is solo with primary a: b is receiving its copy.
        assert_eq!((load(&s, "a").incoming, load(&s, "b").incoming), (0, 1 << 20));
        s.grants.get_mut("v").unwrap().solo = false;
        assert_eq!(load(&s, "b").incoming, 0);
        // A grant of an older pair of the same name says nothing about this one.
        let g = s.grants.get_mut("v").unwrap();
        (g.solo, g.pair) = (true, 6);
        assert_eq!(load(&s, "b").incoming, 0);
    }

    #[test]
    fn only_the_granted_primary_re_protects_and_only_after_the_grace_period() {
        let mut s = snap();
        s.alive.remove("b");
        let t0 = Instant::now();
        let dead = BTreeMap::from([("b".to_string(), t0)]);
        let grace = Duration::from_secs(10);
        assert!(overdue(&s, "a", &dead, t0 + Duration::from_secs(9), grace).is_empty());
        assert_eq!(overdue(&s, "a", &dead, t0 + grace, grace), vec![("v".to_string(), "b".to_string())]);
        // Not the secondary, and not a primary whose grant is of another incarnation.
        assert!(overdue(&s, "b", &dead, t0 + grace, grace).is_empty());
        s.grants.get_mut("v").unwrap().pair = 8;
        assert!(overdue(&s, "a", &dead, t0 + grace, grace).is_empty());
    }

    #[test]
    fn a_removed_dead_node_is_replaced_at_once_and_a_live_one_never() {
        let mut s = snap();
        s.alive.remove("b");
        s.members.remove("b");
        s.removed.insert("b".into());
        let t0 = Instant::now();
        let grace = Duration::from_secs(600);
        // Not even seen dying by this node (no dead_since entry): removed is enough.
        assert_eq!(overdue(&s, "a", &BTreeMap::new(), t0, grace), vec![("v".to_string(), "b".to_string())]);
        // Registered again (alive), it keeps its replica until the grace period says otherwise.
        s.alive.insert("b".into(), 2);
        assert!(overdue(&s, "a", &BTreeMap::new(), t0, grace).is_empty());
        // The new replica never goes to the removed node.
        s.alive.remove("b");
        let moved = replacement(&s.loads(), &s.volumes["v"], "b", "a").unwrap().unwrap();
        assert_eq!(moved.replicas, vec!["a".to_string(), "d".to_string()]);
    }

    #[test]
    fn the_new_replica_is_on_a_live_node_outside_the_survivors_zone() {
        let mut s = snap();
        s.alive.remove("b");
        let moved = replacement(&s.loads(), &s.volumes["v"], "b", "a").unwrap().unwrap();
        // c shares a's zone; d is the only live node elsewhere.
        assert_eq!(moved.replicas, vec!["a".to_string(), "d".to_string()]);
        assert_eq!(replacement(&s.loads(), &moved, "b", "a").unwrap(), None);
    }

    /// [`snap`]'s nodes, without its volume.
    fn nodes_only() -> Snapshot {
        let mut s = snap();
        s.volumes.clear();
        s.grants.clear();
        s
    }

    /// `n` volumes `v0..` between `p` and `s`, in sync, with `p` primary.
    fn pairs(s: &mut Snapshot, from: usize, n: usize, p: &str, sec: &str) {
        for k in from..from + n {
            let name = format!("v{k}");
            let id = 100 + k as u64;
            let spec = VolumeSpec { name: name.clone(), size: 1 << 20, replicas: vec![p.into(), sec.into()], id };
            s.volumes.insert(name.clone(), spec);
            let grant = GrantDoc { pair: id, epoch: 3, primary: p.into(), solo: false, synced: true };
            s.grants.insert(name, grant);
        }
    }

    /// `s` with `moves` made.
    fn moved(s: &Snapshot, moves: &[Move]) -> Snapshot {
        let mut s = s.clone();
        for m in moves {
            s.grants.get_mut(&m.volume).unwrap().primary = m.to.clone();
        }
        s
    }

    fn primaries(s: &Snapshot, moves: &[Move]) -> BTreeMap<String, usize> {
        let mut count = BTreeMap::new();
        for v in moved(s, moves).volume_views() {
            *count.entry(v.primary).or_insert(0) += 1;
        }
        count
    }

    #[test]
    fn balancing_evens_out_primaries_over_live_secondaries_only() {
        let mut s = nodes_only();
        // After failovers: a holds all 12 primaries; its secondaries are b (6) and c (6).
        pairs(&mut s, 0, 6, "a", "b");
        pairs(&mut s, 6, 6, "a", "c");
        let moves = balance(&s);
        assert_eq!(moves.len(), 8, "{moves:?}");
        assert_eq!(primaries(&s, &moves), BTreeMap::from([("a".into(), 4), ("b".into(), 4), ("c".into(), 4)]));
        assert!(moves.iter().all(|m| m.from == "a" && s.volumes[&m.volume].replicas.contains(&m.to)));
        assert!(balance(&moved(&s, &moves)).is_empty(), "balanced twice");
        // Not to a dead node, and not a volume that is not in sync.
        s.alive.remove("c");
        s.grants.get_mut("v0").unwrap().solo = true;
        let moves = balance(&s);
        assert!(moves.iter().all(|m| m.to == "b" && m.volume != "v0"), "{moves:?}");
        assert_eq!(moves.len(), 5, "every in-sync volume with b moves (a keeps 7 against b's 5): {moves:?}");
    }

    #[test]
    fn draining_moves_every_in_sync_primary_and_names_the_rest() {
        let mut s = nodes_only();
        pairs(&mut s, 0, 3, "a", "b");
        pairs(&mut s, 3, 2, "b", "a");
        pairs(&mut s, 5, 1, "a", "c");
        s.grants.get_mut("v1").unwrap().solo = true;
        s.alive.remove("c");
        let (moves, stuck) = drain(&s, "a");
        let moved: Vec<&str> = moves.iter().map(|m| m.volume.as_str()).collect();
        assert_eq!(moved, ["v0", "v2"]);
        assert!(moves.iter().all(|m| m.from == "a" && m.to == "b"));
        assert_eq!(
            stuck,
            vec![
                ("v1".to_string(), "not in sync (degraded)".to_string()),
                ("v5".to_string(), "its secondary c is down".to_string()),
            ]
        );
        assert_eq!(drain(&s, "d"), (vec![], vec![]));
    }
}
