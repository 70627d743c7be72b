//! Pure helpers of resync, full sync and verify: splitting ranges into windows, and deciding per
//! block what a checksum comparison calls for.

use syncblock_engine::BLOCK_BYTES_U64;

/// Splits LBA runs into byte windows of at most `window_bytes`.
pub(super) fn windows(runs: &[(u64, u64)], window_bytes: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(lba, n) in runs {
        let (mut at, end) = (lba * BLOCK_BYTES_U64, (lba + n) * BLOCK_BYTES_U64);
        while at < end {
            let len = (end - at).min(window_bytes);
            out.push((at, len));
            at += len;
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

/// Runs of equal [`Fix`] over a window starting at byte `at`: (offset, len, fix).
pub(super) fn fix_runs(at: u64, mine: &[Option<u32>], theirs: &[Option<u32>]) -> Vec<(u64, u64, Fix)> {
    let mut out: Vec<(u64, u64, Fix)> = Vec::new();
    for (k, (m, t)) in mine.iter().zip(theirs).enumerate() {
        let f = fix(*m, *t);
        match out.last_mut() {
            Some(last) if last.2 == f => last.1 += BLOCK_BYTES_U64,
            _ => out.push((at + k as u64 * BLOCK_BYTES_U64, BLOCK_BYTES_U64, f)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_runs_group_blocks_by_what_they_need() {
        let mine = [Some(1), Some(2), None, None, Some(5), Some(6)];
        let theirs = [Some(1), Some(9), Some(3), None, None, Some(6)];
        assert_eq!(
            fix_runs(BLOCK_BYTES_U64, &mine, &theirs),
            [
                (BLOCK_BYTES_U64, BLOCK_BYTES_U64, Fix::Same),
                (2 * BLOCK_BYTES_U64, BLOCK_BYTES_U64, Fix::Ship),
                (3 * BLOCK_BYTES_U64, BLOCK_BYTES_U64, Fix::Trim),
                (4 * BLOCK_BYTES_U64, BLOCK_BYTES_U64, Fix::Same),
                (5 * BLOCK_BYTES_U64, BLOCK_BYTES_U64, Fix::Ship),
                (6 * BLOCK_BYTES_U64, BLOCK_BYTES_U64, Fix::Same)
            ]
        );
        assert_eq!(
            windows(&[(0, 3), (10, 1)], 2 * BLOCK_BYTES_U64),
            [(0, 2 * BLOCK_BYTES_U64), (2 * BLOCK_BYTES_U64, BLOCK_BYTES_U64), (10 * BLOCK_BYTES_U64, BLOCK_BYTES_U64)]
        );
    }
}
