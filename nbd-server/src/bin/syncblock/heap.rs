//! Giving freed heap memory back to the system, in every mode that serves (`serve`, `pair`,
//! `node`).

use std::time::Duration;

/// How often a process checks how much freed memory glibc's heap keeps (see [`trim_heap`]).
const HEAP_TRIM_EVERY: Duration = Duration::from_secs(5);
/// Freed heap memory a process keeps before it gives it back: 16 MiB, a few hundred I/O buffers
/// ready for reuse; beyond that, the trim's cost (a pass over the free lists, a few
/// milliseconds on a blocking thread every few seconds at most) buys memory back.
const HEAP_FREE_KEPT_MAX: usize = 16 << 20;

/// Gives freed heap memory back to the system when glibc keeps more than `HEAP_FREE_KEPT_MAX`
/// of it; runs until the runtime stops. Large buffers (1 MiB NBD requests, resync reads and
/// writes) come from the heap once glibc has raised its mmap threshold, and a burst leaves the
/// heap large for good:
/// - a cluster node re-protecting 20 volumes at once went from 60 MiB of RSS to 318–381 MiB and
///   stayed there once the copies were done (27 MiB 12 s later with the trim; with the threshold
///   fixed instead, the peak was 100–125 MiB and the RSS fell back to 29 MiB, but every large
///   buffer then cost a mapping and its page faults);
/// - `syncblock pair` went from 21 MiB to 124 MiB after 2 GiB of 1 MiB writes at depth 8, and
///   stayed there; with the trim it is at 30 MiB 6 s after the writes.
pub async fn trim_heap() {
    let mut tick = tokio::time::interval(HEAP_TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: mallinfo2 only reads glibc's allocator statistics.
            let free = unsafe { libc::mallinfo2() }.fordblks;
            if free > HEAP_FREE_KEPT_MAX {
                // SAFETY: malloc_trim only releases free memory; live allocations are untouched.
                unsafe { libc::malloc_trim(0) };
            }
        })
        .await;
    }
}
