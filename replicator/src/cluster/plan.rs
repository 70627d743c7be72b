//! The control plane's decisions as pure functions of the cluster's state, shared by the nodes
//! (`member.rs`, `Cluster::replace_replica`) and the control-plane simulation, so that what the
//! simulation checks at 1,000 nodes is what the nodes run.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::placement::{self, NodeLoad, PlaceError};
use super::{Snapshot, VolumeSpec};

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
}
