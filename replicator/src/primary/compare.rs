//! Pure helpers of resync, full sync and verify: splitting ranges into windows, deciding per
//! block what a checksum comparison calls for, and putting the blocks to ship in the order they lie
//! in the log.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use syncblock_engine::{BlockPlace, BlockRun, ByteRange, Lba, BLOCK_BYTES, BLOCK_BYTES_U64};

use crate::wire::Frame;

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

/// The frames that ship blocks read in log order (`lbas`, and each one's data or `None` for a block
/// found unmapped): a write per run of consecutive mapped blocks, a trim per run of unmapped ones.
pub(super) fn block_frames(tag: u64, lbas: &[u64], blocks: Vec<Option<Bytes>>) -> Vec<Frame> {
    let mut out = Vec::new();
    // The run being gathered: its first block, its length, and its data (none for unmapped).
    let (mut first, mut n, mut data): (u64, u64, Vec<Bytes>) = (0, 0, Vec::new());
    for (&lba, block) in lbas.iter().zip(blocks) {
        let continues = n > 0 && lba == first + n && block.is_some() != data.is_empty();
        if !continues {
            push_run(tag, first, n, std::mem::take(&mut data), &mut out);
            (first, n) = (lba, 0);
        }
        n += 1;
        data.extend(block);
    }
    push_run(tag, first, n, data, &mut out);
    out
}

fn push_run(tag: u64, first: u64, n: u64, data: Vec<Bytes>, out: &mut Vec<Frame>) {
    let (offset, len) = (first * BLOCK_BYTES_U64, n * BLOCK_BYTES_U64);
    match data.len() {
        _ if n == 0 => {}
        0 => out.push(Frame::Trim { tag, offset, len }),
        1 => out.push(Frame::Write { tag, offset, fua: false, data: data.into_iter().next().expect("one block") }),
        _ => {
            let mut joined = BytesMut::with_capacity(data.len() * BLOCK_BYTES);
            data.iter().for_each(|d| joined.extend_from_slice(d));
            out.push(Frame::Write { tag, offset, fua: false, data: joined.freeze() });
        }
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
    fn blocks_read_in_log_order_become_a_frame_per_run() {
        let b = |x: u8| Some(Bytes::from(vec![x; BLOCK_BYTES]));
        let lbas = [7, 8, 9, 3, 4, 5, 6, 20];
        let frames = block_frames(5, &lbas, vec![b(1), b(2), None, None, None, b(3), b(4), b(5)]);
        let mut joined = vec![1u8; BLOCK_BYTES];
        joined.extend(vec![2u8; BLOCK_BYTES]);
        let mut joined2 = vec![3u8; BLOCK_BYTES];
        joined2.extend(vec![4u8; BLOCK_BYTES]);
        let write = |lba: u64, data: Vec<u8>| Frame::Write {
            tag: 5,
            offset: lba * BLOCK_BYTES_U64,
            fua: false,
            data: data.into(),
        };
        let trim = |lba: u64, n: u64| Frame::Trim { tag: 5, offset: lba * BLOCK_BYTES_U64, len: n * BLOCK_BYTES_U64 };
        assert_eq!(
            frames,
            [write(7, joined), trim(9, 1), trim(3, 2), write(5, joined2), write(20, vec![5u8; BLOCK_BYTES])]
        );
        assert_eq!(block_frames(5, &[], vec![]), []);
    }
}
