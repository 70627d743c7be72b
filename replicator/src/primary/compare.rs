//! Pure helpers of resync, full sync and verify: splitting ranges into windows, and deciding per
//! block what a checksum comparison calls for.

use syncblock_engine::{BlockRun, ByteRange, BLOCK_BYTES_U64};

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
}
