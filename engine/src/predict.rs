//! [`CommitLoop`]: guessing that a flush will follow what is being written.

/// Flushes in a row, each after at most one write, after which the next write is expected to be
/// flushed too. Two: one flush after one write happens in any workload; the pattern repeated is
/// what a database's commit loop does.
const STREAK_MIN: u8 = 2;

/// Recognises a client that writes once and flushes, over and over (a database committing record
/// by record), so that such a write can be made durable as it is written (a FUA log write in the
/// engine, a FUA frame to a replica) and the flush that follows finds nothing left to do. A wrong
/// guess costs one write the latency of a sync; any other pattern resets the streak at its next
/// flush.
///
/// The unit of "a write" is the caller's: the engine counts log batches, the replicator client
/// writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitLoop {
    /// Writes since the last flush.
    since_flush: u32,
    /// Flushes in a row that each followed at most one write, up to [`STREAK_MIN`].
    streak: u8,
}

impl CommitLoop {
    pub fn note_write(&mut self) {
        self.since_flush = self.since_flush.saturating_add(1);
    }

    /// A flush (or a FUA write, which ends a commit the same way).
    pub fn note_flush(&mut self) {
        self.streak = if self.since_flush <= 1 { (self.streak + 1).min(STREAK_MIN) } else { 0 };
        self.since_flush = 0;
    }

    /// Whether a flush is expected to follow what was written since the last one.
    pub fn flush_expected(&self) -> bool {
        self.streak >= STREAK_MIN && self.since_flush <= 1
    }

    /// The most flushes in a row that still change anything: noting more is a no-op.
    pub const fn streak_max() -> u64 {
        STREAK_MIN as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_single_write_commits_make_a_loop_and_two_writes_break_it() {
        let mut p = CommitLoop::default();
        for _ in 0..2 {
            p.note_write();
            assert!(!p.flush_expected());
            p.note_flush();
        }
        p.note_write();
        assert!(p.flush_expected());
        p.note_write();
        assert!(!p.flush_expected(), "a second write before the flush is not a commit loop");
        p.note_flush();
        p.note_write();
        assert!(!p.flush_expected(), "the streak restarts after a flush that followed two writes");
    }
}
