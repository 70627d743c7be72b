//! The LBA index: per volume, a three-level radix table from LBA to the block's current location.
//!
//! Each mapped block costs one `u64` packing its physical location and the CRC32 of its data, so a
//! read can verify the block end to end without touching the record header. Interior nodes exist only
//! for written ranges: an unwritten terabyte costs one small root vector. Dense regions cost
//! 8 bytes per written 4 KiB block plus 1/512 of that for interior nodes.

/// Bits of LBA resolved by a leaf and by a mid node.
const LEAF_BITS: u32 = 9;
const MID_BITS: u32 = 9;
const FANOUT: usize = 1 << LEAF_BITS;
const _: () = assert!(LEAF_BITS == MID_BITS);

/// A packed index entry: physical block + 1 in the low 32 bits (0 = unmapped), data CRC in the high
/// 32 bits.
pub type Packed = u64;

pub fn pack(phys_block: u32, crc: u32) -> Packed {
    debug_assert!(phys_block < u32::MAX);
    ((crc as u64) << 32) | (phys_block as u64 + 1)
}

/// Physical block of a mapped entry, or None.
pub fn phys_of(p: Packed) -> Option<u32> {
    let loc = p as u32;
    (loc != 0).then(|| loc - 1)
}

pub fn crc_of(p: Packed) -> u32 {
    (p >> 32) as u32
}

struct Leaf {
    entries: [Packed; FANOUT],
    n_mapped: u32,
}

struct Mid {
    leaves: Vec<Option<Box<Leaf>>>,
    n_leaves: u32,
}

/// The index of one volume.
#[derive(Default)]
pub struct VolumeIndex {
    root: Vec<Option<Box<Mid>>>,
    n_mapped: u64,
}

fn split(lba: u64) -> (usize, usize, usize) {
    let leaf = (lba as usize) & (FANOUT - 1);
    let mid = ((lba >> LEAF_BITS) as usize) & (FANOUT - 1);
    let root = (lba >> (LEAF_BITS + MID_BITS)) as usize;
    (root, mid, leaf)
}

/// Blocks covered by one mid node.
const MID_SPAN: u64 = 1 << (LEAF_BITS + MID_BITS);
const LEAF_SPAN: u64 = 1 << LEAF_BITS;

impl VolumeIndex {
    pub fn new() -> VolumeIndex {
        VolumeIndex::default()
    }

    pub fn get(&self, lba: u64) -> Packed {
        let (r, m, l) = split(lba);
        match self.root.get(r) {
            Some(Some(mid)) => match &mid.leaves[m] {
                Some(leaf) => leaf.entries[l],
                None => 0,
            },
            _ => 0,
        }
    }

    /// Sets the entry for `lba` (0 unmaps) and returns the previous one.
    pub fn set(&mut self, lba: u64, value: Packed) -> Packed {
        let (r, m, l) = split(lba);
        if value == 0 {
            let Some(Some(mid)) = self.root.get_mut(r) else { return 0 };
            let Some(leaf) = &mut mid.leaves[m] else { return 0 };
            let old = std::mem::replace(&mut leaf.entries[l], 0);
            if old != 0 {
                leaf.n_mapped -= 1;
                self.n_mapped -= 1;
                if leaf.n_mapped == 0 {
                    mid.leaves[m] = None;
                    mid.n_leaves -= 1;
                    if mid.n_leaves == 0 {
                        self.root[r] = None;
                        if self.n_mapped == 0 {
                            self.root = Vec::new();
                        }
                    }
                }
            }
            return old;
        }
        if self.root.len() <= r {
            self.root.resize_with(r + 1, || None);
        }
        let mid = self.root[r]
            .get_or_insert_with(|| Box::new(Mid { leaves: (0..FANOUT).map(|_| None).collect(), n_leaves: 0 }));
        if mid.leaves[m].is_none() {
            mid.leaves[m] = Some(Box::new(Leaf { entries: [0; FANOUT], n_mapped: 0 }));
            mid.n_leaves += 1;
        }
        let leaf = mid.leaves[m].as_mut().expect("just inserted");
        let old = std::mem::replace(&mut leaf.entries[l], value);
        if old == 0 {
            leaf.n_mapped += 1;
            self.n_mapped += 1;
        }
        old
    }

    pub fn n_mapped(&self) -> u64 {
        self.n_mapped
    }

    /// Calls `f(lba, entry)` for every mapped entry with `start <= lba < end`, in LBA order,
    /// skipping unwritten subtrees without visiting them.
    pub fn for_each_in(&self, start: u64, end: u64, mut f: impl FnMut(u64, Packed)) {
        let mut lba = start;
        while lba < end {
            let (r, m, l) = split(lba);
            let Some(Some(mid)) = self.root.get(r) else {
                if r >= self.root.len() {
                    return;
                }
                lba = (r as u64 + 1) * MID_SPAN;
                continue;
            };
            let Some(leaf) = &mid.leaves[m] else {
                lba = (lba / LEAF_SPAN + 1) * LEAF_SPAN;
                continue;
            };
            let leaf_base = lba - l as u64;
            let stop = ((end - leaf_base).min(LEAF_SPAN)) as usize;
            for (i, e) in leaf.entries[l..stop].iter().enumerate() {
                if *e != 0 {
                    f(leaf_base + (l + i) as u64, *e);
                }
            }
            lba = leaf_base + LEAF_SPAN;
        }
    }

    /// Unmaps every entry in `[start, end)`, calling `f(lba, old)` for each one that was mapped.
    pub fn unmap_range(&mut self, start: u64, end: u64, mut f: impl FnMut(u64, Packed)) {
        let mut mapped = Vec::new();
        self.for_each_in(start, end, |lba, e| mapped.push((lba, e)));
        for (lba, e) in mapped {
            self.set(lba, 0);
            f(lba, e);
        }
    }

    /// Heap bytes held by the index (for the RAM-per-block figure).
    pub fn heap_bytes(&self) -> usize {
        let mut bytes = self.root.capacity() * std::mem::size_of::<Option<Box<Mid>>>();
        for mid in self.root.iter().flatten() {
            bytes += std::mem::size_of::<Mid>() + mid.leaves.capacity() * std::mem::size_of::<Option<Box<Leaf>>>();
            bytes += mid.n_leaves as usize * std::mem::size_of::<Leaf>();
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn unwritten_volume_costs_nothing_and_dense_costs_about_eight_bytes_per_block() {
        let mut idx = VolumeIndex::new();
        assert_eq!(idx.heap_bytes(), 0);
        let n = 1u64 << 20; // 4 GiB of written blocks
        for lba in 0..n {
            idx.set(lba, pack(lba as u32, 7));
        }
        let per_block = idx.heap_bytes() as f64 / n as f64;
        assert!(per_block <= 8.1, "index costs {per_block} bytes per block");
        idx.unmap_range(0, n, |_, _| {});
        assert_eq!(idx.n_mapped(), 0);
        assert_eq!(idx.heap_bytes(), 0, "empty subtrees are freed");
    }

    proptest! {
        #[test]
        fn index_matches_btreemap(ops in proptest::collection::vec((0u64..3_000_000, 0u32..4, 1u64..5000), 1..200)) {
            let mut idx = VolumeIndex::new();
            let mut model = BTreeMap::new();
            for (i, (lba, op, n)) in ops.into_iter().enumerate() {
                match op {
                    0 | 1 => {
                        let v = pack(i as u32, op);
                        prop_assert_eq!(idx.set(lba, v), model.insert(lba, v).unwrap_or(0));
                    }
                    2 => {
                        let mut seen = Vec::new();
                        idx.unmap_range(lba, lba + n, |l, e| seen.push((l, e)));
                        let expect: Vec<_> = model.range(lba..lba + n).map(|(k, v)| (*k, *v)).collect();
                        for (k, _) in &expect { model.remove(k); }
                        prop_assert_eq!(seen, expect);
                    }
                    _ => {
                        let mut seen = Vec::new();
                        idx.for_each_in(lba, lba + n, |l, e| seen.push((l, e)));
                        let expect: Vec<_> = model.range(lba..lba + n).map(|(k, v)| (*k, *v)).collect();
                        prop_assert_eq!(seen, expect);
                    }
                }
                prop_assert_eq!(idx.n_mapped(), model.len() as u64);
            }
            for (k, v) in &model {
                prop_assert_eq!(idx.get(*k), *v);
            }
        }
    }
}
