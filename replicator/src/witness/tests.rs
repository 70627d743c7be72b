//! The witness's rules ([`super::Decider`]), its node list ([`super::Allow`]) and its state
//! file, tested without a network; one test serves a witness over TCP.

use super::*;

const PAIR: u64 = 0xab;

fn report(node: &str, epoch: u64, in_sync: bool) -> Frame {
    Frame::WitnessReport { pair: PAIR, volume: "v".into(), node: node.into(), epoch: Epoch(epoch), in_sync }
}
fn promote(node: &str, epoch: u64, force: bool) -> Frame {
    Frame::WitnessPromote {
        pair: PAIR,
        volume: "v".into(),
        node: node.into(),
        epoch: Epoch(epoch),
        consistent: true,
        force,
        reclaim: false,
    }
}
fn solo(node: &str, epoch: u64) -> Frame {
    Frame::WitnessSolo { pair: PAIR, volume: "v".into(), node: node.into(), epoch: Epoch(epoch) }
}
fn why(d: Decision) -> Refusal {
    d.unwrap_err().0
}

#[test]
fn a_node_named_with_its_partner_acts_only_in_their_pair() {
    let allow = Allow::parse(&["a,b", "c, d", "ops"]).unwrap();
    let t0 = Instant::now();
    let mut d = Decider::new(WitnessState::default(), Duration::from_secs(1), t0);
    // Any listed node may register a pair the witness does not know yet.
    assert_eq!(allow.refuses(&report("a", 1, true), &d.state), None);
    d.decide(&report("a", 1, true), t0).0.unwrap();
    // a's partner may ask to take it over; c and d, of another pair, may not, forced or not.
    assert_eq!(allow.refuses(&promote("b", 1, false), &d.state), None);
    for n in ["c", "d"] {
        let why = allow.refuses(&promote(n, 1, true), &d.state).expect("another pair's node was let in");
        assert!(why.contains("may act only in its own pair (--allow c,d)") && why.contains("\"a\""), "{why}");
        assert!(allow.refuses(&report(n, 1, true), &d.state).is_some());
        assert!(allow.refuses(&solo(n, 1), &d.state).is_some());
    }
    // A node named alone acts in any pair; a node not named, in none.
    assert_eq!(allow.refuses(&promote("ops", 1, true), &d.state), None);
    let why = allow.refuses(&report("e", 1, true), &d.state).unwrap();
    assert!(why.contains("not on this witness's list of nodes (--allow a,b --allow c,d --allow ops)"), "{why}");
    // A first-format record (keyed by volume) counts as the pair it would be bound to.
    let mut old = WitnessState::default();
    let rec = Record { volume: "v".into(), epoch: Epoch(4), primary: "a".into(), solo: false, synced: true };
    old.unbound.insert("v".into(), rec);
    assert!(allow.refuses(&report("c", 4, true), &old).is_some());
    assert_eq!(allow.refuses(&report("a", 4, true), &old), None);
    // No list: everyone the credentials prove.
    assert_eq!(Allow::default().refuses(&promote("e", 1, true), &d.state), None);
    for bad in ["", "a,", "a,a", "a,b,c", ",b"] {
        assert!(Allow::parse(&[bad]).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn a_live_primary_keeps_its_role_and_a_dead_one_is_replaced_once() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    // A 2 s lease: a 3 s takeover window.
    let mut d = Decider::new(WitnessState::default(), 2 * s, t0);
    assert_eq!(d.decide(&report("a", 1, true), t0).0.unwrap().primary, "a");
    assert_eq!(why(d.decide(&promote("b", 1, false), t0 + s).0), Refusal::PrimaryAlive { retry_after_ms: 2000 });
    let granted = d.decide(&promote("b", 1, false), t0 + 3 * s).0.unwrap();
    assert_eq!((granted.epoch, granted.primary.as_str()), (Epoch(2), "b"));
    // A reclaim (a primary restarting) by a node that is no longer primary is a deposition,
    // never a takeover.
    let reclaim = Frame::WitnessPromote {
        pair: PAIR,
        volume: "v".into(),
        node: "a".into(),
        epoch: Epoch(1),
        consistent: true,
        force: false,
        reclaim: true,
    };
    assert_eq!(why(d.decide(&reclaim, t0 + 3 * s).0), Refusal::Deposed { epoch: Epoch(2) });
    // The deposed primary learns it at its next report, and cannot go solo.
    assert_eq!(why(d.decide(&report("a", 1, true), t0 + 3 * s).0), Refusal::Deposed { epoch: Epoch(2) });
    assert_eq!(why(d.decide(&solo("a", 1), t0 + 3 * s).0), Refusal::Deposed { epoch: Epoch(2) });
    // Nor be promoted back: b serves alone (promoted solo) until a has resynced, and then
    // only once b is silent.
    assert!(d.decide(&report("b", 2, false), t0 + 4 * s).0.is_ok());
    assert_eq!(why(d.decide(&promote("a", 2, false), t0 + 5 * s).0), Refusal::SoloPrimary);
    assert!(d.decide(&report("b", 2, true), t0 + 6 * s).0.is_ok());
    assert!(matches!(why(d.decide(&promote("a", 2, false), t0 + 7 * s).0), Refusal::PrimaryAlive { .. }));
    assert_eq!(d.decide(&promote("a", 2, false), t0 + 9 * s).0.unwrap().epoch, Epoch(3));
}

#[test]
fn a_pair_that_was_never_in_sync_may_not_acknowledge_alone() {
    let t0 = Instant::now();
    let mut d = Decider::new(WitnessState::default(), Duration::from_secs(1), t0);
    let (first, changed) = d.decide(&report("a", 1, false), t0);
    assert!(changed && !first.unwrap().synced);
    assert_eq!(why(d.decide(&solo("a", 1), t0).0), Refusal::NeverSynced);
    // Once both copies existed, recorded durably, the primary may continue alone.
    let (r, changed) = d.decide(&report("a", 1, true), t0);
    assert!(changed && r.unwrap().synced);
    assert!(!d.decide(&report("a", 1, true), t0).1, "nothing new to record");
    assert!(d.decide(&solo("a", 1), t0).0.unwrap().solo);
    assert!(decode_state(&encode_state(&d.state)).unwrap().pairs[&PAIR].synced);
    // A version-2 file's pairs predate the rule: they count as synced.
    let body = format!("{STATE_HEADER_V2}\n00000000000000ab 3 1 v a\n");
    let v2 = format!("{body}end 1 {:08x}\n", crc32fast::hash(body.as_bytes()));
    let r = &decode_state(&v2).unwrap().pairs[&PAIR];
    assert!(r.synced && r.solo && r.epoch == Epoch(3), "{r:?}");
    // Flags a version-2 file cannot hold are refused there.
    let body = format!("{STATE_HEADER_V2}\n00000000000000ab 3 3 v a\n");
    assert!(decode_state(&format!("{body}end 1 {:08x}\n", crc32fast::hash(body.as_bytes()))).is_err());
}

#[test]
fn a_secondary_is_never_promoted_over_a_primary_that_went_solo() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut d = Decider::new(WitnessState::default(), 2 * s, t0);
    d.decide(&report("a", 1, true), t0).0.unwrap();
    assert!(d.decide(&solo("a", 1), t0 + s).0.unwrap().solo);
    assert_eq!(why(d.decide(&promote("b", 1, false), t0 + 10 * s).0), Refusal::SoloPrimary);
    // Once a reports its peer in sync again, b may take over when a dies.
    d.decide(&report("a", 1, true), t0 + 11 * s).0.unwrap();
    assert!(d.decide(&promote("b", 1, false), t0 + 14 * s).0.is_ok());
}

#[test]
fn force_overrides_solo_and_liveness_but_not_inconsistency_nor_a_running_solo_lease() {
    let t0 = Instant::now();
    let mut d = Decider::new(WitnessState::default(), Duration::from_secs(2), t0);
    d.decide(&report("a", 1, true), t0).0.unwrap();
    d.decide(&solo("a", 1), t0).0.unwrap();
    // Not while the solo primary's lease may still run (1.5 leases after it was seen).
    let r = why(d.decide(&promote("b", 1, true), t0 + Duration::from_secs(2)).0);
    assert_eq!(r, Refusal::LeaseLive { retry_after_ms: 1000 });
    let t0 = t0 + Duration::from_secs(4);
    let inconsistent = Frame::WitnessPromote {
        pair: PAIR,
        volume: "v".into(),
        node: "b".into(),
        epoch: Epoch(1),
        consistent: false,
        force: true,
        reclaim: false,
    };
    assert_eq!(why(d.decide(&inconsistent, t0).0), Refusal::Inconsistent);
    assert_eq!(d.decide(&promote("b", 1, true), t0).0.unwrap().epoch, Epoch(2));
}

#[test]
fn two_pairs_with_the_same_volume_name_keep_separate_records() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut d = Decider::new(WitnessState::default(), s, t0);
    let as_pair = |pair: u64, f: Frame| match f {
        Frame::WitnessReport { volume, node, epoch, in_sync, .. } => {
            Frame::WitnessReport { pair, volume, node, epoch, in_sync }
        }
        Frame::WitnessPromote { volume, node, epoch, consistent, force, reclaim, .. } => {
            Frame::WitnessPromote { pair, volume, node, epoch, consistent, force, reclaim }
        }
        other => other,
    };
    // Two pairs, both volume "v", both with nodes called a and b, at different epochs.
    d.decide(&as_pair(1, report("a", 1, true)), t0).0.unwrap();
    d.decide(&as_pair(2, report("a", 5, true)), t0).0.unwrap();
    assert_eq!(d.state.pairs.len(), 2);
    // Pair 2's primary keeps reporting; pair 1's dies: only pair 1 fails over.
    let t1 = t0 + 2 * s;
    d.decide(&as_pair(2, report("a", 5, true)), t1).0.unwrap();
    assert_eq!(d.decide(&as_pair(1, promote("b", 1, false)), t1).0.unwrap().epoch, Epoch(2));
    assert!(matches!(why(d.decide(&as_pair(2, promote("b", 5, false)), t1).0), Refusal::PrimaryAlive { .. }));
    assert_eq!(d.decide(&as_pair(2, report("a", 5, true)), t1).0.unwrap().epoch, Epoch(5));
    // No pair id: never registered.
    assert_eq!(why(d.decide(&as_pair(0, report("a", 1, true)), t1).0), Refusal::NotRegistered);
}

#[test]
fn records_survive_a_restart_and_a_restarted_witness_waits_before_promoting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("witness.state");
    let mut state = WitnessState::default();
    state
        .pairs
        .insert(PAIR, Record { volume: "v".into(), epoch: Epoch(3), primary: "a".into(), solo: false, synced: true });
    state.pairs.insert(
        7,
        Record { volume: "my vol%".into(), epoch: Epoch(1), primary: "n\u{e9}".into(), solo: true, synced: false },
    );
    save(&path, &state).unwrap();
    assert_eq!(load(&path).unwrap(), state);
    let t0 = Instant::now();
    let mut d = Decider::new(load(&path).unwrap(), Duration::from_secs(2), t0);
    assert!(d.decide(&promote("b", 3, false), t0 + Duration::from_secs(1)).0.is_err());
    assert_eq!(d.decide(&promote("b", 3, false), t0 + Duration::from_secs(4)).0.unwrap().epoch, Epoch(4));
}

#[test]
fn a_torn_or_corrupt_state_file_is_detected_never_reset() {
    let mut state = WitnessState::default();
    state
        .pairs
        .insert(PAIR, Record { volume: "v".into(), epoch: Epoch(3), primary: "a".into(), solo: false, synced: true });
    let text = encode_state(&state);
    assert_eq!(decode_state(&text).unwrap(), state);
    // Every cut short of the whole file, and every single changed byte, is refused.
    for cut in 0..text.len() {
        assert!(decode_state(&text[..cut]).is_err(), "cut at {cut}: {:?}", &text[..cut]);
    }
    for at in 0..text.len() {
        let mut b = text.clone().into_bytes();
        b[at] = if b[at] == b'7' { b'8' } else { b'7' };
        if let Ok(t) = String::from_utf8(b) {
            assert!(decode_state(&t).is_err(), "byte {at} changed: {t:?}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("witness.state");
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(e.contains("torn or corrupt") && e.contains("promote --force"), "{e}");
}

#[test]
fn a_first_format_record_is_claimed_by_the_first_pair_that_names_its_volume() {
    let state = decode_state("v 3 a false\nw 1 b true\n").unwrap();
    assert_eq!(state.unbound.len(), 2);
    let t0 = Instant::now();
    let mut d = Decider::new(state, Duration::from_secs(1), t0);
    // A report from a at epoch 3 binds v's record to the pair and is granted.
    let (r, changed) = d.decide(&report("a", 3, true), t0);
    assert_eq!((r.unwrap().epoch, changed), (Epoch(3), true));
    assert_eq!(d.state.pairs[&PAIR].volume, "v");
    assert!(!d.state.unbound.contains_key("v") && d.state.unbound.contains_key("w"));
    assert!(decode_state("v x a false\n").is_err());
}

#[test]
fn a_witness_that_cannot_save_refuses_with_a_storage_refusal_that_deposes_nobody() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // The state file's directory does not exist: every save fails.
        let path = dir.path().join("missing").join("witness.state");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(run(crate::net::tcp_listener(l), path, Duration::from_secs(1), Allow::default()));
        let net = crate::net::tcp();
        let e =
            ask(net.as_ref(), &Link::default(), addr, &report("a", 1, true), Duration::from_secs(5)).await.unwrap_err();
        match e {
            ReplError::Refused { why, reason } => {
                assert_eq!(why, Refusal::WitnessStorage, "{reason}");
            }
            other => panic!("{other}"),
        }
        task.abort();
    });
}

fn handover(node: &str, epoch: u64, to: &str) -> Frame {
    Frame::WitnessHandover { pair: PAIR, volume: "v".into(), node: node.into(), epoch: Epoch(epoch), to: to.into() }
}

/// A switchover: granted only to the recorded primary of the current epoch, of a pair in sync and
/// not solo; the peer becomes primary in the next epoch without solo, takes the role at its next
/// request, and the old primary is deposed. A node of another pair is never handed a role.
#[test]
fn a_handover_moves_the_role_only_from_the_primary_of_a_pair_in_sync() {
    let t0 = Instant::now();
    let mut d = Decider::new(WitnessState::default(), Duration::from_secs(1), t0);
    d.decide(&report("a", 1, false), t0).0.unwrap();
    assert_eq!(why(d.decide(&handover("a", 1, "b"), t0).0), Refusal::NeverSynced);
    d.decide(&report("a", 1, true), t0).0.unwrap();
    d.decide(&solo("a", 1), t0).0.unwrap();
    assert_eq!(why(d.decide(&handover("a", 1, "b"), t0).0), Refusal::SoloPrimary, "the peer may lack writes");
    d.decide(&report("a", 1, true), t0).0.unwrap();
    assert_eq!(why(d.decide(&handover("b", 1, "a"), t0).0), Refusal::Deposed { epoch: Epoch(1) });
    assert_eq!(why(d.decide(&handover("a", 0, "b"), t0).0), Refusal::Deposed { epoch: Epoch(1) });
    assert_eq!(why(d.decide(&handover("a", 1, "a"), t0).0), Refusal::Protocol);

    let (granted, changed) = d.decide(&handover("a", 1, "b"), t0);
    let granted = granted.unwrap();
    assert!(changed, "a handover is recorded before it is answered");
    assert_eq!((granted.epoch, granted.primary.as_str(), granted.solo), (Epoch(2), "b", false));
    // The old primary is deposed at its next report; the new one takes the role at once, however
    // recently the old one reported.
    assert_eq!(why(d.decide(&report("a", 1, true), t0).0), Refusal::Deposed { epoch: Epoch(2) });
    let taken = d.decide(&promote("b", 2, false), t0).0.unwrap();
    assert_eq!((taken.epoch, taken.primary.as_str()), (Epoch(3), "b"));
    // Unknown pairs have nothing to hand over.
    let stranger =
        Frame::WitnessHandover { pair: 7, volume: "w".into(), node: "a".into(), epoch: Epoch(1), to: "b".into() };
    assert_eq!(why(d.decide(&stranger, t0).0), Refusal::NotRegistered);
    // With a node list, only to a node of the primary's own pair.
    let allow = Allow::parse(&["a,b", "c,d"]).unwrap();
    assert_eq!(allow.refuses(&handover("b", 3, "a"), &d.state), None);
    let why = allow.refuses(&handover("b", 3, "c"), &d.state).expect("handed to another pair's node");
    assert!(why.contains("only to a node of its own pair"), "{why}");
}
