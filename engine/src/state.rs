//! The volume table, the per-volume indexes and per-segment live counts, and the one function that
//! applies a record to them. The live engine and crash recovery both apply records through
//! [`State::apply_data`] and [`State::apply_meta`], so replay repeats exactly the decisions the live
//! engine made, in the same LSN order.

use std::collections::BTreeMap;

use crate::format::{Entry, EntryKind, MetaOp};
use crate::index::{pack, phys_of, VolumeIndex};
use crate::types::{VolumeId, BLOCK_BYTES};

/// Most volumes one store holds. Every checkpoint carries the whole volume table and each volume has
/// its own index root; beyond a few thousand volumes, a deployment should use more stores.
pub const MAX_VOLUMES: usize = 4096;

/// `last_tag` value of a [`MetaOp::SetRepl`] that leaves the volume's last tag as it is (a primary
/// updating its trim floor while its own writes keep moving the tag).
pub const KEEP_LAST_TAG: u64 = u64::MAX;

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
}

impl Volume {
    pub fn new(id: VolumeId, name: String, size_bytes: u64) -> Volume {
        Volume { id, name, size_bytes, index: VolumeIndex::new(), last_tag: 0, trim_floor: u64::MAX, attr: Vec::new() }
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
                    for i in 0..e.n_blocks as u64 {
                        let phys = first_data_phys + d as u32;
                        let crc = crcs[d];
                        d += 1;
                        let lba = e.lba.0 + i;
                        if lba >= n_blocks {
                            continue;
                        }
                        if e.kind == EntryKind::Copy {
                            // The cleaner's copy counts only if the block still lives where it was
                            // copied from; otherwise a newer write or trim superseded it.
                            if phys_of(vol.index.get(lba)) != Some(e.old_phys + i as u32) {
                                continue;
                            }
                        }
                        let old = vol.index.set(lba, pack(phys, crc));
                        self.live[seg(phys)] += 1;
                        if let Some(old_phys) = phys_of(old) {
                            self.live[seg(old_phys)] -= 1;
                            on_dead(seg(old_phys));
                        }
                    }
                }
                EntryKind::Trim => {
                    let Some(vol) = self.volumes.get_mut(&e.volume) else { continue };
                    let end = (e.lba.0 + e.n_blocks as u64).min(vol.n_blocks());
                    let live = &mut self.live;
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
                vol.size_bytes = *size_bytes;
            }
            MetaOp::SetRepl { volume, last_tag, trim_floor, attr } => {
                let Some(vol) = self.volumes.get_mut(volume) else { return };
                if *last_tag != KEEP_LAST_TAG {
                    vol.last_tag = *last_tag;
                }
                vol.trim_floor = *trim_floor;
                vol.attr = attr.clone();
            }
            MetaOp::Delete { volume } => {
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
