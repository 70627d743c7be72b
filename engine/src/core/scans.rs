//! Changed-block scans, for replication resync: which blocks of a volume were written (or
//! trimmed) after an LSN or a replication tag. Segments that may hold such blocks are read one at
//! a time and their records walked; a block counts if its entry is newer and still live.

use super::*;

/// Scans queued, the first one in progress.
#[derive(Default)]
pub(super) struct Scans {
    pub(super) queue: VecDeque<Scan>,
    /// A segment read of the first scan is in flight.
    pub(super) busy: bool,
}

pub(super) struct Scan {
    pub(super) volume: VolumeId,
    pub(super) since: Since,
    pub(super) segs: Vec<u32>,
    /// Changed blocks, merged into runs when the scan ends.
    pub(super) found: Vec<ChangedRun>,
    pub(super) reply: Reply<Vec<ChangedRun>>,
}

impl Core {
    /// Queues a scan of the segments that may hold blocks of `volume` changed since `since`.
    pub(super) fn start_scan(&mut self, volume: VolumeId, since: Since, reply: Reply<Vec<ChangedRun>>) {
        let segs = (0..self.sb.n_segments)
            .filter(|s| {
                let st = &self.segments.table[*s as usize];
                let live = self.state.live[*s as usize] > 0;
                st.used_blocks > 0
                    && st.status != SegStatus::Free
                    && match since {
                        Since::Lsn(lsn) => live && st.max_data_lsn > lsn.0,
                        Since::Tag(_) => live || !st.trim_tags.is_empty(),
                    }
            })
            .collect();
        self.scans.queue.push_back(Scan { volume, since, segs, found: Vec::new(), reply });
    }

    /// Reads the next segment of the scan at the head of the queue, one at a time, or answers the
    /// scan once it has read them all.
    pub(super) fn step_scans(&mut self) -> bool {
        if self.scans.busy {
            return false;
        }
        let Some(scan) = self.scans.queue.front_mut() else { return false };
        match scan.segs.pop() {
            Some(seg) => {
                let n = self.segments.table[seg as usize].used_blocks as usize;
                self.segments.table[seg as usize].readers += 1;
                let offset = self.seg_offset_bytes(seg, 0);
                self.scans.busy = true;
                self.submit(Token::ScanRead { seg }, IoKind::Read { offset, buf: AlignedBuf::zeroed(n) });
            }
            None => {
                let mut scan = self.scans.queue.pop_front().expect("scan");
                scan.found.sort_unstable_by_key(|r| (r.lba, r.n_blocks));
                let mut runs: Vec<ChangedRun> = Vec::new();
                for ChangedRun { lba: Lba(first), n_blocks } in scan.found {
                    let end = first + n_blocks;
                    match runs.last_mut() {
                        Some(r) if r.lba.0 + r.n_blocks >= first => {
                            r.n_blocks = r.n_blocks.max(end - r.lba.0);
                        }
                        _ => runs.push(ChangedRun { lba: Lba(first), n_blocks: end - first }),
                    }
                }
                let _ = scan.reply.send(Ok(runs));
            }
        }
        true
    }

    /// A segment of the scan was read.
    pub(super) fn scan_read(&mut self, seg: u32, c: Completion) {
        self.release_reader(seg);
        self.scans.busy = false;
        match (c.result, c.buf) {
            (Ok(()), Some(buf)) => self.scan_segment(seg, &buf),
            (r, _) => {
                if let Some(scan) = self.scans.queue.pop_front() {
                    let _ = scan.reply.send(Err(Error::io(
                        format!("reading segment {seg}"),
                        r.err().unwrap_or_else(|| std::io::Error::other("no buffer")),
                    )));
                }
            }
        }
    }

    pub(super) fn scan_segment(&mut self, seg: u32, buf: &[u8]) {
        let Some(scan) = self.scans.queue.front() else { return };
        let (volume, since) = (scan.volume, scan.since);
        let Some(vol) = self.state.volumes.get(&volume) else { return };
        let n_blocks = vol.n_blocks();
        let mut found = Vec::new();
        // A segment still being written ends in blocks that are not records yet; what parsed
        // before them is all that can be live.
        let _ = walk_records(&self.sb, seg, buf, |rec, first_data_phys| {
            let mut d = 0u32;
            for e in &rec.entries {
                let phys0 = first_data_phys + d;
                if e.kind.has_data() {
                    d += e.n_blocks;
                }
                if e.volume != volume {
                    continue;
                }
                let newer = match since {
                    Since::Lsn(lsn) => e.kind.has_data() && e.data_lsn > lsn,
                    Since::Tag(tag) => e.tag > tag,
                };
                if !newer {
                    continue;
                }
                if e.kind == EntryKind::Trim {
                    let end = (e.lba.0 + e.n_blocks as u64).min(n_blocks);
                    if e.lba.0 < end {
                        found.push(ChangedRun { lba: e.lba, n_blocks: end - e.lba.0 });
                    }
                    continue;
                }
                for i in 0..e.n_blocks {
                    let lba = e.lba.0 + i as u64;
                    let live = lba < n_blocks
                        && (phys_of(vol.index.get(lba)) == Some(phys0 + i)
                            || vol.staged.writes.get(&lba).and_then(|p| phys_of(*p)) == Some(phys0 + i));
                    if live {
                        found.push(ChangedRun { lba: Lba(lba), n_blocks: 1 });
                    }
                }
            }
        });
        if let Some(scan) = self.scans.queue.front_mut() {
            scan.found.extend(found);
        }
    }
}
