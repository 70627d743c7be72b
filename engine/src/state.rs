//! The volume table, the per-volume indexes and per-segment live counts, and the one function that
//! applies a record to them. The live engine and crash recovery both apply records through
//! [`State::apply_data`] and [`State::apply_meta`], so replay repeats exactly the decisions the live
//! engine made, in the same LSN order.

use std::collections::BTreeMap;

use crate::format::{Entry, EntryKind, MetaOp, StagedOp};
use crate::index::{pack, phys_of, VolumeIndex};
use crate::types::{VolumeId, BLOCK_BYTES};

/// Most volumes one store holds. Every checkpoint carries the whole volume table and each volume has
/// its own index root; beyond a few thousand volumes, a deployment should use more stores.
pub const VOLUMES_MAX: usize = 4096;

/// `last_tag` value of a [`MetaOp::SetRepl`] that leaves the volume's last tag as it is (a primary
/// updating its trim floor while its own writes keep moving the tag).
pub const KEEP_LAST_TAG: u64 = u64::MAX;

/// Most blocks a volume stages for an uncommitted resync (4 GiB of data, about 40 MiB of memory).
/// A larger resync overflows: what is staged is applied at once and the rest goes straight to the
/// index, so the volume is inconsistent until the commit (as DRBD's resync target always is).
pub const STAGED_BLOCKS_MAX: usize = 1 << 20;
/// Most disjoint trimmed ranges a volume stages; past this, the resync overflows likewise. Bounded
/// so that checkpoint slots can be sized for the worst case (64 replicated volumes × 128 × 16 B).
pub const STAGED_TRIMS_MAX: usize = 128;

/// What an uncommitted resync wrote to a volume: kept aside from the index, so that the volume's
/// committed image (what recovery rebuilds, what a promotion serves) stays the consistent image it
/// had before the resync, until the resync's commit applies all of it at once.
#[derive(Debug, Default, Clone)]
pub struct Staged {
    /// LBA → packed location of each staged block (the newest staged write of it).
    pub writes: BTreeMap<u64, u64>,
    /// Ranges `[first, end)` the resync trimmed, sorted and disjoint. A write staged after a trim
    /// of its LBA is in `writes` and wins; one staged before it was removed by the trim.
    pub trims: Vec<(u64, u64)>,
    /// The resync outgrew the limits above and is being applied directly: the volume is
    /// inconsistent until the commit.
    pub overflowed: bool,
}

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.trims.is_empty()
    }

    /// The staged state of an LBA: `Some(packed)` (0 = trimmed), or None when the resync did not
    /// touch it.
    pub fn get(&self, lba: u64) -> Option<u64> {
        if let Some(p) = self.writes.get(&lba) {
            return Some(*p);
        }
        let i = self.trims.partition_point(|&(_, end)| end <= lba);
        self.trims.get(i).filter(|&&(first, _)| first <= lba).map(|_| 0)
    }

    fn add_trim(&mut self, first: u64, end: u64) {
        let mut first = first;
        let mut end = end;
        self.trims.retain(|&(f, e)| {
            if e < first || f > end {
                true
            } else {
                first = first.min(f);
                end = end.max(e);
                false
            }
        });
        let at = self.trims.partition_point(|&(f, _)| f < first);
        self.trims.insert(at, (first, end));
    }
}
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub index: VolumeIndex,
    /// Replication: tag of the newest applied write (see [`MetaOp::SetRepl`]).
    pub last_tag: u64,
    /// Replication: trim entries with a tag above this pin their segments. `u64::MAX` (the default)
    /// retains nothing, as an unreplicated volume needs.
    pub trim_floor: u64,
    /// Replication: the replicator's opaque per-volume state.
    pub attr: Vec<u8>,
    /// Replication: an uncommitted resync's blocks.
    pub staged: Staged,
}

impl Volume {
    pub fn new(id: VolumeId, name: String, size_bytes: u64) -> Volume {
        Volume {
            id,
            name,
            size_bytes,
            index: VolumeIndex::new(),
            last_tag: 0,
            trim_floor: u64::MAX,
            attr: Vec::new(),
            staged: Staged::default(),
        }
    }

    /// The newest state of an LBA, staged or committed: the packed location, 0 for a hole.
    pub fn effective(&self, lba: u64) -> u64 {
        self.staged.get(lba).unwrap_or_else(|| self.index.get(lba))
    }

    /// Calls `f(lba, packed)` for every mapped LBA in `[first, end)` as [`Volume::effective`] sees
    /// it, in no particular order.
    pub fn for_each_effective(&self, first: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        if self.staged.is_empty() {
            return self.index.for_each_in(first, end, f);
        }
        self.index.for_each_in(first, end, |lba, e| {
            if self.staged.get(lba).is_none() {
                f(lba, e);
            }
        });
        for (&lba, &p) in self.staged.writes.range(first..end) {
            f(lba, p);
        }
    }

    pub fn n_blocks(&self) -> u64 {
        self.size_bytes / BLOCK_BYTES as u64
    }
}

/// Public description of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    /// Bytes currently mapped (written and not trimmed).
    pub mapped_bytes: u64,
    /// Replication state; see [`MetaOp::SetRepl`].
    pub last_tag: u64,
    pub trim_floor: u64,
    pub attr: Vec<u8>,
    /// Blocks an uncommitted resync has staged.
    pub staged_blocks: u64,
    /// An uncommitted resync outgrew staging: the volume is inconsistent until it commits.
    pub resync_overflowed: bool,
}

pub struct State {
    pub volumes: BTreeMap<VolumeId, Volume>,
    pub next_volume_id: u32,
    /// Live data blocks per segment.
    pub live: Vec<u32>,
    pub segment_blocks: u32,
}

impl State {
    pub fn new(n_segments: u32, segment_blocks: u32) -> State {
        State { volumes: BTreeMap::new(), next_volume_id: 1, live: vec![0; n_segments as usize], segment_blocks }
    }

    pub fn segment_of(&self, phys: u32) -> usize {
        (phys / self.segment_blocks) as usize
    }

    pub fn volume_info(&self, v: &Volume) -> VolumeInfo {
        VolumeInfo {
            id: v.id,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            mapped_bytes: v.index.n_mapped() * BLOCK_BYTES as u64,
            last_tag: v.last_tag,
            trim_floor: v.trim_floor,
            attr: v.attr.clone(),
            staged_blocks: v.staged.writes.len() as u64,
            resync_overflowed: v.staged.overflowed,
        }
    }

    /// Applies the entries of a data record whose first data block is at `first_data_phys`.
    /// `on_dead(segment)` is called for every segment that lost a live block.
    pub fn apply_data(
        &mut self,
        entries: &[Entry],
        crcs: &[u32],
        first_data_phys: u32,
        mut on_dead: impl FnMut(usize),
    ) {
        let segment_blocks = self.segment_blocks;
        let seg = |phys: u32| (phys / segment_blocks) as usize;
        let mut d = 0usize;
        for e in entries {
            if e.kind != EntryKind::Copy && e.tag != 0 && !e.resync {
                if let Some(vol) = self.volumes.get_mut(&e.volume) {
                    vol.last_tag = vol.last_tag.max(e.tag);
                }
            }
            match e.kind {
                EntryKind::Write | EntryKind::Copy => {
                    let vol = self.volumes.get_mut(&e.volume);
                    let Some(vol) = vol else {
                        d += e.n_blocks as usize;
                        continue;
                    };
                    let n_blocks = vol.n_blocks();
                    // Resync writes are staged while the resync stays within bounds; a copy
                    // flagged resync moves a staged block.
                    let staged = e.resync && (e.kind == EntryKind::Copy || !vol.staged.overflowed);
                    for i in 0..e.n_blocks as u64 {
                        let phys = first_data_phys + d as u32;
                        let crc = crcs[d];
                        d += 1;
                        let lba = e.lba.0 + i;
                        if lba >= n_blocks {
                            continue;
                        }
                        let old = if staged {
                            if e.kind == EntryKind::Copy
                                && vol.staged.writes.get(&lba).and_then(|p| phys_of(*p)) != Some(e.old_phys + i as u32)
                            {
                                continue;
                            }
                            vol.staged.writes.insert(lba, pack(phys, crc)).unwrap_or(0)
                        } else {
                            if e.kind == EntryKind::Copy {
                                // The cleaner's copy counts only if the block still lives where it
                                // was copied from; otherwise a newer write or trim superseded it.
                                if phys_of(vol.index.get(lba)) != Some(e.old_phys + i as u32) {
                                    continue;
                                }
                            }
                            vol.index.set(lba, pack(phys, crc))
                        };
                        self.live[seg(phys)] += 1;
                        if let Some(old_phys) = phys_of(old) {
                            self.live[seg(old_phys)] -= 1;
                            on_dead(seg(old_phys));
                        }
                    }
                    if staged && vol.staged.writes.len() > STAGED_BLOCKS_MAX {
                        overflow(vol, &mut self.live, segment_blocks, &mut on_dead);
                    }
                }
                EntryKind::Trim => {
                    let Some(vol) = self.volumes.get_mut(&e.volume) else { continue };
                    let end = (e.lba.0 + e.n_blocks as u64).min(vol.n_blocks());
                    let live = &mut self.live;
                    if e.resync && !vol.staged.overflowed {
                        if e.lba.0 >= end {
                            continue;
                        }
                        let dropped: Vec<u64> = vol.staged.writes.range(e.lba.0..end).map(|(l, _)| *l).collect();
                        for lba in dropped {
                            let p = vol.staged.writes.remove(&lba).expect("listed");
                            if let Some(old_phys) = phys_of(p) {
                                live[seg(old_phys)] -= 1;
                                on_dead(seg(old_phys));
                            }
                        }
                        vol.staged.add_trim(e.lba.0, end);
                        if vol.staged.trims.len() > STAGED_TRIMS_MAX {
                            overflow(vol, live, segment_blocks, &mut on_dead);
                        }
                        continue;
                    }
                    vol.index.unmap_range(e.lba.0, end, |_, old| {
                        if let Some(old_phys) = phys_of(old) {
                            live[seg(old_phys)] -= 1;
                            on_dead(seg(old_phys));
                        }
                    });
                }
            }
        }
        debug_assert_eq!(d, crcs.len());
    }

    /// Drops an uncommitted resync's staged blocks (after a crash, or when a new resync starts).
    pub fn discard_staged(&mut self, volume: VolumeId, mut on_dead: impl FnMut(usize)) {
        let segment_blocks = self.segment_blocks;
        let Some(vol) = self.volumes.get_mut(&volume) else { return };
        for (_, p) in std::mem::take(&mut vol.staged.writes) {
            if let Some(phys) = phys_of(p) {
                let s = (phys / segment_blocks) as usize;
                self.live[s] -= 1;
                on_dead(s);
            }
        }
        vol.staged.trims.clear();
    }

    /// Applies a volume-table change. Unmapped blocks are reported through `on_dead`.
    pub fn apply_meta(&mut self, op: &MetaOp, mut on_dead: impl FnMut(usize)) {
        let segment_blocks = self.segment_blocks;
        match op {
            MetaOp::Create { volume, size_bytes, name } => {
                self.volumes.insert(*volume, Volume::new(*volume, name.clone(), *size_bytes));
                self.next_volume_id = self.next_volume_id.max(volume.0 + 1);
            }
            MetaOp::Resize { volume, size_bytes } => {
                let Some(vol) = self.volumes.get_mut(volume) else { return };
                let new_blocks = size_bytes / BLOCK_BYTES as u64;
                let live = &mut self.live;
                vol.index.unmap_range(new_blocks, u64::MAX, |_, old| {
                    if let Some(p) = phys_of(old) {
                        let s = (p / segment_blocks) as usize;
                        live[s] -= 1;
                        on_dead(s);
                    }
                });
                let beyond: Vec<u64> = vol.staged.writes.range(new_blocks..).map(|(l, _)| *l).collect();
                for lba in beyond {
                    if let Some(p) = vol.staged.writes.remove(&lba).and_then(phys_of) {
                        let s = (p / segment_blocks) as usize;
                        live[s] -= 1;
                        on_dead(s);
                    }
                }
                vol.size_bytes = *size_bytes;
            }
            MetaOp::SetRepl { volume, last_tag, trim_floor, attr, staged } => {
                match staged {
                    StagedOp::Keep => {}
                    StagedOp::Commit => {
                        if let Some(vol) = self.volumes.get_mut(volume) {
                            merge_staged(vol, &mut self.live, segment_blocks, &mut on_dead);
                            vol.staged.overflowed = false;
                        }
                    }
                    StagedOp::Discard => self.discard_staged(*volume, &mut on_dead),
                }
                let Some(vol) = self.volumes.get_mut(volume) else { return };
                if *last_tag != KEEP_LAST_TAG {
                    vol.last_tag = *last_tag;
                }
                vol.trim_floor = *trim_floor;
                vol.attr = attr.clone();
            }
            MetaOp::Delete { volume } => {
                self.discard_staged(*volume, &mut on_dead);
                let Some(mut vol) = self.volumes.remove(volume) else { return };
                let live = &mut self.live;
                vol.index.unmap_range(0, u64::MAX, |_, old| {
                    if let Some(p) = phys_of(old) {
                        let s = (p / segment_blocks) as usize;
                        live[s] -= 1;
                        on_dead(s);
                    }
                });
            }
        }
    }
}

/// Applies a volume's staged resync to its index: trims first, then the writes staged after them.
fn merge_staged(vol: &mut Volume, live: &mut [u32], segment_blocks: u32, on_dead: &mut impl FnMut(usize)) {
    let seg = |phys: u32| (phys / segment_blocks) as usize;
    let n_blocks = vol.n_blocks();
    for (first, end) in std::mem::take(&mut vol.staged.trims) {
        vol.index.unmap_range(first, end.min(n_blocks), |_, old| {
            if let Some(p) = phys_of(old) {
                live[seg(p)] -= 1;
                on_dead(seg(p));
            }
        });
    }
    for (lba, p) in std::mem::take(&mut vol.staged.writes) {
        // The staged block already counts as live in its segment.
        let old = vol.index.set(lba, p);
        if let Some(old_phys) = phys_of(old) {
            live[seg(old_phys)] -= 1;
            on_dead(seg(old_phys));
        }
    }
}

/// A resync outgrew staging: apply what is staged and let the rest go straight to the index.
fn overflow(vol: &mut Volume, live: &mut [u32], segment_blocks: u32, on_dead: &mut impl FnMut(usize)) {
    tracing::warn!(
        "volume {}: resync larger than {STAGED_BLOCKS_MAX} blocks or {STAGED_TRIMS_MAX} trimmed ranges; \
         applying it directly: the replica is inconsistent until the resync commits",
        vol.name
    );
    merge_staged(vol, live, segment_blocks, on_dead);
    vol.staged.overflowed = true;
}
