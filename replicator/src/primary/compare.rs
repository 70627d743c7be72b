//! Pure helpers of resync, full sync and verify: splitting ranges into windows, deciding per
//! block what a checksum comparison calls for, and putting the blocks to ship in the order they lie
//! in the log.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use syncblock_engine::{BlockPlace, BlockRun, ByteRange, Lba, BLOCK_BYTES, BLOCK_BYTES_U64};

use crate::wire::{Frame, WRITE_BLOCKS_MAX};

/// Splits runs of blocks into byte windows of at most `window_bytes`.
pub(super) fn windows(runs: &[BlockRun], window_bytes: u64) -> Vec<ByteRange> {
    let mut out = Vec::new();
    for run in runs {
        let ByteRange { offset: mut at, .. } = run.bytes();
        let end = run.bytes().end();
        while at < end {
            let len = (end - at).min(window_bytes);
            out.push(ByteRange { offset: at, len });
            at += len;
        }
    }
    out
}

/// Consecutive blocks from byte `at`, one kind each, grouped into runs of equal kind: the bytes
/// of each run and its kind.
pub(super) fn runs_of<T: Copy + PartialEq>(at: u64, kinds: impl IntoIterator<Item = T>) -> Vec<(ByteRange, T)> {
    let mut out: Vec<(ByteRange, T)> = Vec::new();
    for (block_idx, kind) in kinds.into_iter().enumerate() {
        match out.last_mut() {
            Some((range, last)) if *last == kind => range.len += BLOCK_BYTES_U64,
            _ => out.push((ByteRange { offset: at + block_idx as u64 * BLOCK_BYTES_U64, len: BLOCK_BYTES_U64 }, kind)),
        }
    }
    out
}

/// What a block comparison calls for: the peer's copy matches (or both are holes); the primary's
/// block must be shipped; or the peer holds a block the primary does not have (a trim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fix {
    Same,
    Ship,
    Trim,
}

pub(super) fn fix(mine: Option<u32>, theirs: Option<u32>) -> Fix {
    match (mine, theirs) {
        (Some(a), Some(b)) if a == b => Fix::Same,
        (None, None) => Fix::Same,
        (Some(_), _) => Fix::Ship,
        (None, Some(_)) => Fix::Trim,
    }
}

/// Runs of equal [`Fix`] over a window starting at byte `at`.
pub(super) fn fix_runs(at: u64, mine: &[Option<u32>], theirs: &[Option<u32>]) -> Vec<(ByteRange, Fix)> {
    runs_of(at, mine.iter().zip(theirs).map(|(m, t)| fix(*m, *t)))
}

/// Takes up to `max_blocks` blocks of `todo` (sorted, disjoint, block-aligned ranges), from its
/// front; a range only partly taken leaves its rest at the front.
pub(super) fn take_blocks(todo: &mut VecDeque<ByteRange>, max_blocks: u64) -> Vec<BlockRun> {
    let mut out = Vec::new();
    let mut left = max_blocks;
    while left > 0 {
        let Some(r) = todo.front_mut() else { break };
        let n = (r.len / BLOCK_BYTES_U64).min(left);
        out.push(BlockRun { lba: Lba(r.offset / BLOCK_BYTES_U64), n_blocks: n });
        left -= n;
        r.offset += n * BLOCK_BYTES_U64;
        r.len -= n * BLOCK_BYTES_U64;
        if r.len == 0 {
            todo.pop_front();
        }
    }
    out
}

/// Blocks of `todo`, total.
pub(super) fn blocks_in(todo: &VecDeque<ByteRange>) -> u64 {
    todo.iter().map(|r| r.len / BLOCK_BYTES_U64).sum()
}

/// Splits `runs` by where their blocks lie (`places`: the mapped ones, in LBA order, as
/// [`syncblock_engine::Store::block_places`] answers): the unmapped stretches, as byte ranges in
/// LBA order, and the mapped blocks in the order they lie in the log.
pub(super) fn log_order(runs: &[BlockRun], mut places: Vec<BlockPlace>) -> (Vec<ByteRange>, Vec<u64>) {
    let mut holes = Vec::new();
    let mut next = places.iter().map(|p| p.lba).peekable();
    for run in runs {
        let (mut at, end) = (run.lba.0, run.end().0);
        while at < end {
            // Places outside the runs cannot come from the engine; skipped all the same.
            while next.next_if(|&lba| lba < at).is_some() {}
            let stop = next.peek().copied().filter(|&lba| lba < end).unwrap_or(end);
            if stop > at {
                holes.push(BlockRun { lba: Lba(at), n_blocks: stop - at }.bytes());
            }
            at = stop + 1;
            if stop < end {
                next.next();
            }
        }
    }
    places.sort_unstable();
    (holes, places.into_iter().map(|p| p.lba).collect())
}

/// The frames that ship one resync read of blocks in log order (`lbas`, and each one's data or
/// `None` for a block found unmapped by then): the blocks read as one `WriteBlocks`, in the order
/// read, and a trim per run of consecutive unmapped ones. One frame for up to a read's 256 blocks,
/// where a frame per block had the new replica decode and queue each on its own.
pub(super) fn block_frames(tag: u64, lbas: &[u64], blocks: Vec<Option<Bytes>>) -> Vec<Frame> {
    let mut trims = Vec::new();
    // Sized for every block at once: grown block by block, a 1 MiB read was copied again at each
    // doubling of the buffer.
    let mapped_n = blocks.iter().filter(|b| b.is_some()).count();
    let (mut mapped, mut data) = (Vec::with_capacity(mapped_n), BytesMut::with_capacity(mapped_n * BLOCK_BYTES));
    // The run of unmapped blocks being gathered: its first block and its length.
    let (mut first, mut n) = (0u64, 0u64);
    for (&lba, block) in lbas.iter().zip(blocks) {
        match block {
            Some(b) => {
                mapped.push(lba);
                data.extend_from_slice(&b);
            }
            None if n > 0 && lba == first + n => n += 1,
            None => {
                push_trim(tag, first, n, &mut trims);
                (first, n) = (lba, 1);
            }
        }
    }
    push_trim(tag, first, n, &mut trims);
    // A resync read is at most one frame's blocks (`RESYNC_READ_BYTES`); more go in several.
    let data = data.freeze();
    let mut out: Vec<Frame> = mapped
        .chunks(WRITE_BLOCKS_MAX)
        .enumerate()
        .map(|(k, lbas)| {
            let at = k * WRITE_BLOCKS_MAX * BLOCK_BYTES;
            Frame::WriteBlocks { tag, lbas: lbas.to_vec(), data: data.slice(at..at + lbas.len() * BLOCK_BYTES) }
        })
        .collect();
    out.extend(trims);
    out
}

fn push_trim(tag: u64, first: u64, n: u64, out: &mut Vec<Frame>) {
    if n > 0 {
        out.push(Frame::Trim { tag, offset: first * BLOCK_BYTES_U64, len: n * BLOCK_BYTES_U64 });
    }
}

#[cfg(test)]
mod tests {
    use syncblock_engine::Lba;

    use super::*;

    /// `n_blocks` blocks from block `block_idx`, as bytes.
    fn blocks(block_idx: u64, n_blocks: u64) -> ByteRange {
        BlockRun { lba: Lba(block_idx), n_blocks }.bytes()
    }

    #[test]
    fn fix_runs_group_blocks_by_what_they_need() {
        let mine = [Some(1), Some(2), None, None, Some(5), Some(6)];
        let theirs = [Some(1), Some(9), Some(3), None, None, Some(6)];
        assert_eq!(
            fix_runs(BLOCK_BYTES_U64, &mine, &theirs),
            [
                (blocks(1, 1), Fix::Same),
                (blocks(2, 1), Fix::Ship),
                (blocks(3, 1), Fix::Trim),
                (blocks(4, 1), Fix::Same),
                (blocks(5, 1), Fix::Ship),
                (blocks(6, 1), Fix::Same)
            ]
        );
        let runs = [BlockRun { lba: Lba(0), n_blocks: 3 }, BlockRun { lba: Lba(10), n_blocks: 1 }];
        assert_eq!(windows(&runs, 2 * BLOCK_BYTES_U64), [blocks(0, 2), blocks(2, 1), blocks(10, 1)]);
    }

    #[test]
    fn blocks_are_taken_from_the_front_and_split_where_the_bound_falls() {
        let mut todo: VecDeque<ByteRange> = [blocks(2, 3), blocks(10, 4)].into();
        assert_eq!(blocks_in(&todo), 7);
        let run = |lba, n_blocks| BlockRun { lba: Lba(lba), n_blocks };
        assert_eq!(take_blocks(&mut todo, 5), [run(2, 3), run(10, 2)]);
        assert_eq!(todo, [blocks(12, 2)]);
        assert_eq!(take_blocks(&mut todo, 5), [run(12, 2)]);
        assert!(todo.is_empty());
        assert_eq!(take_blocks(&mut todo, 5), []);
    }

    #[test]
    fn log_order_splits_holes_from_mapped_blocks_sorted_by_place() {
        let runs = [BlockRun { lba: Lba(0), n_blocks: 6 }, BlockRun { lba: Lba(8), n_blocks: 3 }];
        let place = |lba, place| BlockPlace { place, lba };
        // Blocks 1, 2, 5 and 9 mapped; 2 not yet in the log (place 0).
        let places = vec![place(1, 40), place(2, 0), place(5, 7), place(9, 12)];
        let (holes, order) = log_order(&runs, places);
        assert_eq!(holes, [blocks(0, 1), blocks(3, 2), blocks(8, 1), blocks(10, 1)]);
        assert_eq!(order, [2, 5, 9, 1]);
        let (holes, order) = log_order(&runs, vec![]);
        assert_eq!(holes, [blocks(0, 6), blocks(8, 3)]);
        assert!(order.is_empty());
    }

    #[test]
    fn blocks_read_in_log_order_become_one_frame_and_a_trim_per_unmapped_run() {
        let b = |x: u8| Some(Bytes::from(vec![x; BLOCK_BYTES]));
        let lbas = [7, 8, 9, 3, 4, 5, 6, 20];
        let frames = block_frames(5, &lbas, vec![b(1), b(2), None, None, None, b(3), b(4), b(5)]);
        let data: Vec<u8> = [1u8, 2, 3, 4, 5].iter().flat_map(|x| vec![*x; BLOCK_BYTES]).collect();
        let trim = |lba: u64, n: u64| Frame::Trim { tag: 5, offset: lba * BLOCK_BYTES_U64, len: n * BLOCK_BYTES_U64 };
        let blocks = Frame::WriteBlocks { tag: 5, lbas: vec![7, 8, 5, 6, 20], data: data.into() };
        assert_eq!(frames, [blocks, trim(9, 1), trim(3, 2)]);
        assert_eq!(block_frames(5, &[], vec![]), []);
        // More blocks than one frame takes go in several, in order.
        let many: Vec<u64> = (0..300).collect();
        let frames = block_frames(1, &many, many.iter().map(|k| b(*k as u8)).collect());
        let sizes: Vec<usize> =
            frames.iter().map(|f| if let Frame::WriteBlocks { lbas, .. } = f { lbas.len() } else { 0 }).collect();
        assert_eq!(sizes, [WRITE_BLOCKS_MAX, 300 - WRITE_BLOCKS_MAX]);
    }
}
