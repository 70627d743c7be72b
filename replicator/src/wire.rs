//! The replication wire protocol: framed, versioned, every frame checksummed.
//!
//! A frame is a 16-byte header followed by its body. All integers are little-endian.
//!
//! ```text
//! 0  magic    u32  "SBRP"
//! 4  version  u16  PROTOCOL_VERSION
//! 6  kind     u8
//! 7  zero     u8
//! 8  body_len u32  <= BODY_BYTES_MAX
//! 12 crc      u32  CRC32 of header bytes 0..12 followed by the body
//! ```
//!
//! `docs/replication.md` describes each frame and the rules of the conversation. Decoding never
//! panics: anything malformed is a [`WireError`] and the connection is dropped.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use syncblock_engine::{BlockRun, Epoch, Lba};

pub const MAGIC: u32 = u32::from_le_bytes(*b"SBRP");
/// Bumped on any incompatible change; peers must speak the same version. 2: block checksum frames
/// (`CrcRequest`, `CrcReply`) for checksum-skipping full sync and online verify. 3: each epoch
/// history entry carries its `origin`. 4: typed refusals (`Refuse` carries a [`Refusal`] code), the
/// pair id in `Hello` and the witness requests, the lease in `WitnessGrant`. 5: `WitnessHandover`
/// (a planned switchover).
pub const PROTOCOL_VERSION: u16 = 5;
pub const HEADER_BYTES: usize = 16;
/// Largest frame body: one write of the engine's largest I/O (32 MiB) plus its fields. Anything
/// larger is refused before a byte of it is buffered.
pub const BODY_BYTES_MAX: usize = (32 << 20) + 64;
/// Most changed runs a secondary reports in its hello. 1 Mi runs is 16 MiB on the wire; a replica
/// that diverged in more places than that gets a full resync instead.
pub const HELLO_RUNS_MAX: usize = 1 << 20;
/// Most blocks one `CrcReply` carries: the engine's limit for one checksum request (256 MiB of
/// volume; a 264 KiB frame at most).
pub const CRC_BLOCKS_MAX: usize = syncblock_engine::CRC_BLOCKS_MAX as usize;
/// Write payloads at least this large leave the link writer without being copied into its
/// buffer ([`Frame::encode_split`]): a 1 MiB copy per frame was a tenth of a sequential writer's
/// time on a primary running both nodes on one thread.
pub const SPLIT_PAYLOAD_MIN: usize = 64 << 10;
/// Longest epoch history carried (and stored): each failover adds one entry.
pub const HISTORY_MAX: usize = 16;
/// Longest volume or node name.
pub const NAME_BYTES_MAX: usize = 64;

/// Where one epoch's history starts: tags from `start_tag` on (until the next entry's start) were
/// assigned by the primary of `epoch`.
///
/// `origin` is a random number drawn when the primary took the epoch. With a witness, epochs are
/// unique; without one, two nodes can each take the same epoch number on their own (one restarted,
/// the other promoted by hand while it was away), and their writes under the same (epoch, tag)
/// differ. Histories match only where epoch and origin both match, so such writes are never taken
/// for shared ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: Epoch,
    pub start_tag: u64,
    pub origin: u64,
}

impl EpochStart {
    /// Whether both entries are the same start of the same epoch.
    pub fn same_epoch(&self, other: &EpochStart) -> bool {
        self.epoch == other.epoch && self.origin == other.origin
    }
}

/// A fresh, nonzero `origin` (zero marks entries recorded before origins existed).
pub fn new_origin() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Why a peer or the witness said no. Every decision is taken on this code, never on the message
/// that comes with it (that is for the operator's log). On the wire: a u16 code and one u64
/// argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A malformed, unexpected or unknown request.
    Protocol,
    /// Epoch `epoch` of this pair belongs to another node. The only refusal that deposes a
    /// primary, and only when `epoch` is newer than its own: that proves a successor exists.
    Deposed { epoch: Epoch },
    /// Both sides are primary in the same epoch `epoch` (taken without a witness); an operator
    /// decides with `syncblock demote`.
    SplitBrain { epoch: Epoch },
    /// The refuser is stepping down (it learned of a newer epoch from this request): retry.
    SteppingDown,
    /// The requester has seen only an epoch older than `epoch`, the pair's current one.
    Behind { epoch: Epoch },
    /// The witness heard from the current primary recently; it may be asked again in
    /// `retry_after_ms`.
    PrimaryAlive { retry_after_ms: u64 },
    /// The primary acknowledged writes alone, which the candidate lacks (needs `--force`).
    SoloPrimary,
    /// A forced promotion must wait `retry_after_ms` until the solo primary's lease has run out.
    LeaseLive { retry_after_ms: u64 },
    /// The candidate holds a half-applied resync.
    Inconsistent,
    /// The witness knows no primary of this pair.
    NotRegistered,
    /// The witness cannot record decisions (its disk failed): nothing is decided, nobody deposed.
    WitnessStorage,
    /// The secondary replicates another volume.
    WrongVolume,
    /// The store belongs to another pair (the pair id fixed at its first sync differs).
    WrongPair,
    /// The volume's size differs between the nodes.
    SizeMismatch,
    /// Too many connections are handshaking at once: retry.
    Busy,
    /// The pair has never been in sync, so its primary may not acknowledge alone.
    NeverSynced,
}

impl Refusal {
    fn code(&self) -> (u16, u64) {
        match *self {
            Refusal::Protocol => (0, 0),
            Refusal::Deposed { epoch } => (1, epoch.0),
            Refusal::SplitBrain { epoch } => (2, epoch.0),
            Refusal::SteppingDown => (3, 0),
            Refusal::Behind { epoch } => (4, epoch.0),
            Refusal::PrimaryAlive { retry_after_ms } => (5, retry_after_ms),
            Refusal::SoloPrimary => (6, 0),
            Refusal::LeaseLive { retry_after_ms } => (7, retry_after_ms),
            Refusal::Inconsistent => (8, 0),
            Refusal::NotRegistered => (9, 0),
            Refusal::WitnessStorage => (10, 0),
            Refusal::WrongVolume => (11, 0),
            Refusal::WrongPair => (12, 0),
            Refusal::SizeMismatch => (13, 0),
            Refusal::Busy => (14, 0),
            Refusal::NeverSynced => (15, 0),
        }
    }

    fn from_code(code: u16, arg: u64) -> Option<Refusal> {
        Some(match code {
            0 => Refusal::Protocol,
            1 => Refusal::Deposed { epoch: Epoch(arg) },
            2 => Refusal::SplitBrain { epoch: Epoch(arg) },
            3 => Refusal::SteppingDown,
            4 => Refusal::Behind { epoch: Epoch(arg) },
            5 => Refusal::PrimaryAlive { retry_after_ms: arg },
            6 => Refusal::SoloPrimary,
            7 => Refusal::LeaseLive { retry_after_ms: arg },
            8 => Refusal::Inconsistent,
            9 => Refusal::NotRegistered,
            10 => Refusal::WitnessStorage,
            11 => Refusal::WrongVolume,
            12 => Refusal::WrongPair,
            13 => Refusal::SizeMismatch,
            14 => Refusal::Busy,
            15 => Refusal::NeverSynced,
            _ => return None,
        })
    }

    /// Arguments that carry no meaning for a variant are zero, so that one refusal has one
    /// encoding (what is decoded encodes to the same bytes).
    fn canonical(code: u16, arg: u64) -> bool {
        matches!(code, 1 | 2 | 4 | 5 | 7) || arg == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Primary → secondary, first frame: who I am and what history I have. `pair` is the pair's
    /// id, drawn by its first primary and fixed on the secondary at its first sync.
    Hello {
        pair: u64,
        epoch: Epoch,
        last_tag: u64,
        size_bytes: u64,
        volume: String,
        node: String,
        history: Vec<EpochStart>,
    },
    /// Secondary → primary: accepted. `common_tag` is the last tag both histories share; `runs` are
    /// the LBA runs the secondary changed after it (writes the primary must overwrite).
    HelloOk {
        last_tag: u64,
        common_tag: u64,
        runs: Vec<BlockRun>,
    },
    /// Either way (and from the witness): refused or failed, why, and a message for the log.
    Refuse {
        why: Refusal,
        reason: String,
    },
    Write {
        tag: u64,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    /// Primary → secondary, in a resync only: whole blocks at scattered LBAs, `data` holding them
    /// in the order of `lbas` (one engine read of the resync, in the order the blocks lie in the
    /// primary's log). At least one and at most [`WRITE_BLOCKS_MAX`] blocks.
    WriteBlocks {
        tag: u64,
        lbas: Vec<u64>,
        data: Bytes,
    },
    Trim {
        tag: u64,
        offset: u64,
        len: u64,
    },
    Zeroes {
        tag: u64,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    /// Make every earlier frame durable; answered by an `Ack` with `durable >= upto`.
    Flush {
        upto: u64,
    },
    /// Secondary → primary, cumulative: every tag up to `applied` is in its log; up to `durable`
    /// is on stable storage.
    Ack {
        applied: u64,
        durable: u64,
    },
    /// Heartbeat. `floor` is the tag known durable on both nodes (the trim-retention floor).
    /// Answered in stream order, after everything before it applied; nonce 0 is a keepalive that
    /// confirms nothing (the primary sends it where a heartbeat cannot wait its turn).
    Ping {
        epoch: Epoch,
        nonce: u64,
        floor: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The frames that follow, until `ResyncCommit`, bring the secondary from `common_tag` to the
    /// primary's state; the secondary is inconsistent until the commit.
    ResyncBegin {
        common_tag: u64,
    },
    /// The secondary now holds the primary's history up to `tag`, with `history`.
    ResyncCommit {
        tag: u64,
        epoch: Epoch,
        history: Vec<EpochStart>,
    },
    /// Primary → secondary: answer with the CRC32 of each block of `[offset, offset + len)` as
    /// your image holds it after every frame sent before this one (block-aligned, at most
    /// `CRC_BLOCKS_MAX` blocks).
    CrcRequest {
        id: u64,
        offset: u64,
        len: u64,
    },
    /// Secondary → primary, the answer to `CrcRequest { id, .. }`: one entry per block from
    /// `offset`, `None` for an unmapped block.
    CrcReply {
        id: u64,
        offset: u64,
        crcs: Vec<Option<u32>>,
    },
    /// Primary → witness, every heartbeat: I am primary of `epoch`, and my peer is (or is not) in
    /// sync. An in-sync report clears the solo mark.
    WitnessReport {
        pair: u64,
        volume: String,
        node: String,
        epoch: Epoch,
        in_sync: bool,
    },
    /// Primary → witness: my peer is gone; may I acknowledge writes alone (the `degrade` policy)?
    WitnessSolo {
        pair: u64,
        volume: String,
        node: String,
        epoch: Epoch,
    },
    /// Secondary → witness: my primary is gone; may I take over? `force` skips the safety checks
    /// (an operator accepting data loss). `reclaim`: only if I still am the recorded primary (a
    /// primary restarting, which never takes over from another node).
    WitnessPromote {
        pair: u64,
        volume: String,
        node: String,
        epoch: Epoch,
        consistent: bool,
        force: bool,
        reclaim: bool,
    },
    /// Primary → witness: I have stopped acknowledging writes, and my peer `to` holds every one I
    /// acknowledged; make it the primary (a planned switchover).
    WitnessHandover {
        pair: u64,
        volume: String,
        node: String,
        epoch: Epoch,
        to: String,
    },
    /// Witness → node: the pair's record after the request was granted. The requester's lease
    /// (solo operation) runs `lease_ms` from when it sent the request.
    WitnessGrant {
        epoch: Epoch,
        primary: String,
        solo: bool,
        lease_ms: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("bad magic {0:#010x}: the peer is not a syncblock replication endpoint")]
    BadMagic(u32),
    #[error(
        "peer speaks replication protocol version {got}, this node speaks {PROTOCOL_VERSION}: upgrade one of them"
    )]
    Version { got: u16 },
    #[error("frame body of {0} bytes exceeds the {BODY_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    #[error("frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupted in transit")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

impl Frame {
    /// The pair, volume and asking node of a request to an authority (a witness or etcd); `None`
    /// for every other frame.
    pub fn authority_request(&self) -> Option<(u64, &str, &str)> {
        match self {
            Frame::WitnessReport { pair, volume, node, .. }
            | Frame::WitnessSolo { pair, volume, node, .. }
            | Frame::WitnessPromote { pair, volume, node, .. }
            | Frame::WitnessHandover { pair, volume, node, .. } => Some((*pair, volume, node)),
            _ => None,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::HelloOk { .. } => 2,
            Frame::Refuse { .. } => 3,
            Frame::Write { .. } => 4,
            Frame::Trim { .. } => 5,
            Frame::Zeroes { .. } => 6,
            Frame::Flush { .. } => 7,
            Frame::Ack { .. } => 8,
            Frame::Ping { .. } => 9,
            Frame::Pong { .. } => 10,
            Frame::ResyncBegin { .. } => 11,
            Frame::ResyncCommit { .. } => 12,
            Frame::WitnessReport { .. } => 13,
            Frame::WitnessSolo { .. } => 14,
            Frame::WitnessPromote { .. } => 15,
            Frame::WitnessGrant { .. } => 16,
            Frame::CrcRequest { .. } => 17,
            Frame::CrcReply { .. } => 18,
            Frame::WitnessHandover { .. } => 19,
            Frame::WriteBlocks { .. } => 20,
        }
    }

    /// Header plus body, ready to send.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends the whole frame, header and body, to `out`: several frames can go out in one write.
    pub fn encode_into(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_bytes(0, HEADER_BYTES);
        self.put_body(out);
        let (header, body) = out[start..].split_at_mut(HEADER_BYTES);
        self.seal(header, &[body]);
    }

    /// Fills in `header` for a body made of `parts`, in order: magic, version, kind, length and
    /// the CRC of the header's first 12 bytes and the body.
    fn seal(&self, header: &mut [u8], parts: &[&[u8]]) {
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(body_len <= BODY_BYTES_MAX);
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header[6] = self.kind();
        header[7] = 0;
        header[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&header[..12]);
        for p in parts {
            h.update(p);
        }
        header[12..16].copy_from_slice(&h.finalize().to_le_bytes());
    }

    /// A large `Write` or `WriteBlocks` frame as its head (header and fields) and its payload,
    /// uncopied, to be written one after the other: `head ++ payload` is exactly
    /// [`Frame::encode`]'s bytes. `None` for any other frame, and for payloads under
    /// [`SPLIT_PAYLOAD_MIN`] bytes (copying those into the link's buffer is cheaper than a second
    /// system call). The link's writer asks this of every frame it sends, so a frame it declines
    /// costs no allocation.
    pub fn encode_split(&self) -> Option<(BytesMut, Bytes)> {
        let (mut head, data) = match self {
            Frame::Write { tag, offset, fua, data } if data.len() >= SPLIT_PAYLOAD_MIN => {
                let mut head = BytesMut::zeroed(HEADER_BYTES);
                put_write_fields(&mut head, *tag, *offset, *fua);
                (head, data)
            }
            Frame::WriteBlocks { tag, lbas, data } if data.len() >= SPLIT_PAYLOAD_MIN => {
                let mut head = BytesMut::zeroed(HEADER_BYTES);
                put_blocks_fields(&mut head, *tag, lbas);
                (head, data)
            }
            _ => return None,
        };
        let (header, fields) = head.split_at_mut(HEADER_BYTES);
        self.seal(header, &[fields, data]);
        Some((head, data.clone()))
    }

    fn put_body(&self, body: &mut BytesMut) {
        match self {
            Frame::Hello { pair, epoch, last_tag, size_bytes, volume, node, history } => {
                body.put_u64_le(*pair);
                body.put_u64_le(epoch.0);
                body.put_u64_le(*last_tag);
                body.put_u64_le(*size_bytes);
                put_str(body, volume);
                put_str(body, node);
                put_history(body, history);
            }
            Frame::HelloOk { last_tag, common_tag, runs } => {
                body.put_u64_le(*last_tag);
                body.put_u64_le(*common_tag);
                body.put_u32_le(runs.len() as u32);
                for run in runs {
                    body.put_u64_le(run.lba.0);
                    body.put_u64_le(run.n_blocks);
                }
            }
            Frame::Refuse { why, reason } => {
                let (code, arg) = why.code();
                body.put_u16_le(code);
                body.put_u64_le(arg);
                body.put_slice(capped(reason).as_bytes());
            }
            Frame::Write { tag, offset, fua, data } => {
                put_write_fields(body, *tag, *offset, *fua);
                body.put_slice(data);
            }
            Frame::WriteBlocks { tag, lbas, data } => {
                put_blocks_fields(body, *tag, lbas);
                body.put_slice(data);
            }
            Frame::Trim { tag, offset, len } => {
                body.put_u64_le(*tag);
                body.put_u64_le(*offset);
                body.put_u64_le(*len);
            }
            Frame::Zeroes { tag, offset, len, may_trim, fua } => {
                body.put_u64_le(*tag);
                body.put_u64_le(*offset);
                body.put_u64_le(*len);
                body.put_u8(*may_trim as u8 | (*fua as u8) << 1);
            }
            Frame::Flush { upto } => body.put_u64_le(*upto),
            Frame::Ack { applied, durable } => {
                body.put_u64_le(*applied);
                body.put_u64_le(*durable);
            }
            Frame::Ping { epoch, nonce, floor } => {
                body.put_u64_le(epoch.0);
                body.put_u64_le(*nonce);
                body.put_u64_le(*floor);
            }
            Frame::Pong { nonce } => body.put_u64_le(*nonce),
            Frame::ResyncBegin { common_tag } => body.put_u64_le(*common_tag),
            Frame::ResyncCommit { tag, epoch, history } => {
                body.put_u64_le(*tag);
                body.put_u64_le(epoch.0);
                put_history(body, history);
            }
            Frame::WitnessReport { pair, volume, node, epoch, in_sync } => {
                body.put_u64_le(*pair);
                put_str(body, volume);
                put_str(body, node);
                body.put_u64_le(epoch.0);
                body.put_u8(*in_sync as u8);
            }
            Frame::WitnessSolo { pair, volume, node, epoch } => {
                body.put_u64_le(*pair);
                put_str(body, volume);
                put_str(body, node);
                body.put_u64_le(epoch.0);
            }
            Frame::WitnessPromote { pair, volume, node, epoch, consistent, force, reclaim } => {
                body.put_u64_le(*pair);
                put_str(body, volume);
                put_str(body, node);
                body.put_u64_le(epoch.0);
                body.put_u8(*consistent as u8 | (*force as u8) << 1 | (*reclaim as u8) << 2);
            }
            Frame::WitnessHandover { pair, volume, node, epoch, to } => {
                body.put_u64_le(*pair);
                put_str(body, volume);
                put_str(body, node);
                body.put_u64_le(epoch.0);
                put_str(body, to);
            }
            Frame::WitnessGrant { epoch, primary, solo, lease_ms } => {
                body.put_u64_le(epoch.0);
                put_str(body, primary);
                body.put_u8(*solo as u8);
                body.put_u32_le(*lease_ms);
            }
            Frame::CrcRequest { id, offset, len } => {
                body.put_u64_le(*id);
                body.put_u64_le(*offset);
                body.put_u64_le(*len);
            }
            Frame::CrcReply { id, offset, crcs } => {
                // A bitmap of mapped blocks (bit i of byte i / 8), then the CRCs of the mapped
                // ones: a hole costs one bit.
                let crcs = &crcs[..crcs.len().min(CRC_BLOCKS_MAX)];
                body.put_u64_le(*id);
                body.put_u64_le(*offset);
                body.put_u32_le(crcs.len() as u32);
                for chunk in crcs.chunks(8) {
                    body.put_u8(chunk.iter().enumerate().fold(0, |m, (i, c)| m | (c.is_some() as u8) << i));
                }
                for c in crcs.iter().flatten() {
                    body.put_u32_le(*c);
                }
            }
        }
    }
}

/// A decoded frame header: what to read next.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub kind: u8,
    pub body_len: usize,
    crc: u32,
    raw: [u8; 12],
}

impl Header {
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, WireError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4"));
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::Version { got: version });
        }
        let body_len = u32::from_le_bytes(b[8..12].try_into().expect("4")) as usize;
        if body_len > BODY_BYTES_MAX {
            return Err(WireError::TooLarge(body_len));
        }
        Ok(Header {
            kind: b[6],
            body_len,
            crc: u32::from_le_bytes(b[12..16].try_into().expect("4")),
            raw: b[..12].try_into().expect("12"),
        })
    }

    /// Checks the body against the header's CRC and decodes the frame.
    pub fn decode_body(&self, body: Bytes) -> Result<Frame, WireError> {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.raw);
        h.update(&body);
        let computed = h.finalize();
        if computed != self.crc {
            return Err(WireError::Checksum { stored: self.crc, computed });
        }
        decode_body(self.kind, body)
    }
}

/// Decodes a whole frame from `b` (header and body); for tests and fuzzing.
pub fn decode_frame(b: &[u8]) -> Result<Frame, WireError> {
    if b.len() < HEADER_BYTES {
        return Err(WireError::Malformed("short header"));
    }
    let h = Header::decode(b[..HEADER_BYTES].try_into().expect("16"))?;
    if b.len() != HEADER_BYTES + h.body_len {
        return Err(WireError::Malformed("length"));
    }
    h.decode_body(Bytes::copy_from_slice(&b[HEADER_BYTES..]))
}

/// Longest refusal reason carried: enough for any message, small enough to log.
pub const REASON_BYTES_MAX: usize = 4096;

/// `s` cut to at most [`REASON_BYTES_MAX`], at a character boundary (so that what is decoded
/// encodes to the same bytes).
fn capped(s: &str) -> &str {
    let mut end = s.len().min(REASON_BYTES_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Blocks one `WriteBlocks` frame carries at most: one resync read (1 MiB), so a frame is one
/// engine request on the secondary and its body stays far below `BODY_BYTES_MAX`.
pub const WRITE_BLOCKS_MAX: usize = 256;

/// A `WriteBlocks` body's fields before its data: tag, block count, the LBAs.
fn put_blocks_fields(b: &mut BytesMut, tag: u64, lbas: &[u64]) {
    b.put_u64_le(tag);
    b.put_u32_le(lbas.len() as u32);
    for lba in lbas {
        b.put_u64_le(*lba);
    }
}

fn put_write_fields(b: &mut BytesMut, tag: u64, offset: u64, fua: bool) {
    b.put_u64_le(tag);
    b.put_u64_le(offset);
    b.put_u8(fua as u8);
}

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(NAME_BYTES_MAX)];
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

fn put_history(b: &mut BytesMut, h: &[EpochStart]) {
    let h = &h[h.len().saturating_sub(HISTORY_MAX)..];
    b.put_u16_le(h.len() as u16);
    for e in h {
        b.put_u64_le(e.epoch.0);
        b.put_u64_le(e.start_tag);
        b.put_u64_le(e.origin);
    }
}

struct Reader {
    b: Bytes,
    what: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.b.remaining() < n {
            Err(WireError::Malformed(self.what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed(self.what)),
        }
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.b.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.b.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.b.get_u64_le())
    }
    fn epoch(&mut self) -> Result<Epoch, WireError> {
        self.u64().map(Epoch)
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > NAME_BYTES_MAX {
            return Err(WireError::Malformed(self.what));
        }
        self.need(n)?;
        let s = self.b.split_to(n);
        String::from_utf8(s.to_vec()).map_err(|_| WireError::Malformed(self.what))
    }
    fn history(&mut self) -> Result<Vec<EpochStart>, WireError> {
        let n = self.u16()? as usize;
        if n > HISTORY_MAX {
            return Err(WireError::Malformed(self.what));
        }
        let mut h = Vec::with_capacity(n);
        for _ in 0..n {
            h.push(EpochStart { epoch: self.epoch()?, start_tag: self.u64()?, origin: self.u64()? });
        }
        Ok(h)
    }
    fn end(self) -> Result<(), WireError> {
        if self.b.has_remaining() {
            Err(WireError::Malformed(self.what))
        } else {
            Ok(())
        }
    }
}

fn decode_body(kind: u8, body: Bytes) -> Result<Frame, WireError> {
    let what = match kind {
        1 => "hello",
        2 => "hello-ok",
        3 => "refuse",
        4 => "write",
        5 => "trim",
        6 => "zeroes",
        7 => "flush",
        8 => "ack",
        9 => "ping",
        10 => "pong",
        11 => "resync-begin",
        12 => "resync-commit",
        13 => "witness-report",
        14 => "witness-solo",
        15 => "witness-promote",
        16 => "witness-grant",
        17 => "crc-request",
        18 => "crc-reply",
        19 => "witness-handover",
        20 => "write-blocks",
        k => return Err(WireError::UnknownKind(k)),
    };
    let mut r = Reader { b: body, what };
    let frame = match kind {
        1 => Frame::Hello {
            pair: r.u64()?,
            epoch: r.epoch()?,
            last_tag: r.u64()?,
            size_bytes: r.u64()?,
            volume: r.str()?,
            node: r.str()?,
            history: r.history()?,
        },
        2 => {
            let last_tag = r.u64()?;
            let common_tag = r.u64()?;
            let n = r.u32()? as usize;
            if n > HELLO_RUNS_MAX {
                return Err(WireError::Malformed(what));
            }
            r.need(n * 16)?;
            let runs = (0..n).map(|_| BlockRun { lba: Lba(r.b.get_u64_le()), n_blocks: r.b.get_u64_le() }).collect();
            Frame::HelloOk { last_tag, common_tag, runs }
        }
        3 => {
            let (code, arg) = (r.u16()?, r.u64()?);
            let why = Refusal::from_code(code, arg)
                .filter(|_| Refusal::canonical(code, arg))
                .ok_or(WireError::Malformed(what))?;
            let reason = capped(&String::from_utf8_lossy(&r.b)).to_string();
            r.b.advance(r.b.remaining());
            Frame::Refuse { why, reason }
        }
        4 => {
            let tag = r.u64()?;
            let offset = r.u64()?;
            let fua = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed(what)),
            };
            let data = r.b.split_off(0);
            Frame::Write { tag, offset, fua, data }
        }
        5 => Frame::Trim { tag: r.u64()?, offset: r.u64()?, len: r.u64()? },
        6 => {
            let (tag, offset, len) = (r.u64()?, r.u64()?, r.u64()?);
            let flags = r.u8()?;
            if flags & !3 != 0 {
                return Err(WireError::Malformed(what));
            }
            Frame::Zeroes { tag, offset, len, may_trim: flags & 1 != 0, fua: flags & 2 != 0 }
        }
        7 => Frame::Flush { upto: r.u64()? },
        8 => Frame::Ack { applied: r.u64()?, durable: r.u64()? },
        9 => Frame::Ping { epoch: r.epoch()?, nonce: r.u64()?, floor: r.u64()? },
        10 => Frame::Pong { nonce: r.u64()? },
        11 => Frame::ResyncBegin { common_tag: r.u64()? },
        12 => Frame::ResyncCommit { tag: r.u64()?, epoch: r.epoch()?, history: r.history()? },
        13 => Frame::WitnessReport {
            pair: r.u64()?,
            volume: r.str()?,
            node: r.str()?,
            epoch: r.epoch()?,
            in_sync: r.bool()?,
        },
        14 => Frame::WitnessSolo { pair: r.u64()?, volume: r.str()?, node: r.str()?, epoch: r.epoch()? },
        15 => {
            let (pair, volume, node, epoch) = (r.u64()?, r.str()?, r.str()?, r.epoch()?);
            let flags = r.u8()?;
            if flags & !7 != 0 {
                return Err(WireError::Malformed(what));
            }
            let (consistent, force, reclaim) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
            Frame::WitnessPromote { pair, volume, node, epoch, consistent, force, reclaim }
        }
        16 => Frame::WitnessGrant { epoch: r.epoch()?, primary: r.str()?, solo: r.bool()?, lease_ms: r.u32()? },
        17 => Frame::CrcRequest { id: r.u64()?, offset: r.u64()?, len: r.u64()? },
        20 => {
            let tag = r.u64()?;
            let n = r.u32()? as usize;
            if n == 0 || n > WRITE_BLOCKS_MAX {
                return Err(WireError::Malformed(what));
            }
            r.need(n * 8)?;
            let lbas: Vec<u64> = (0..n).map(|_| r.b.get_u64_le()).collect();
            if r.b.remaining() != n * syncblock_engine::BLOCK_BYTES {
                return Err(WireError::Malformed(what));
            }
            let data = r.b.split_off(0);
            Frame::WriteBlocks { tag, lbas, data }
        }
        19 => {
            Frame::WitnessHandover { pair: r.u64()?, volume: r.str()?, node: r.str()?, epoch: r.epoch()?, to: r.str()? }
        }
        18 => {
            let (id, offset) = (r.u64()?, r.u64()?);
            let n = r.u32()? as usize;
            if n > CRC_BLOCKS_MAX {
                return Err(WireError::Malformed(what));
            }
            let map_bytes = n.div_ceil(8);
            r.need(map_bytes)?;
            let map = r.b.split_to(map_bytes);
            // Bits past the last block must be clear: one encoding per reply.
            if n % 8 != 0 && map[map_bytes - 1] >> (n % 8) != 0 {
                return Err(WireError::Malformed(what));
            }
            let n_mapped = map.iter().map(|b| b.count_ones() as usize).sum::<usize>();
            r.need(n_mapped * 4)?;
            let crcs = (0..n).map(|i| (map[i / 8] >> (i % 8) & 1 == 1).then(|| r.b.get_u32_le())).collect();
            Frame::CrcReply { id, offset, crcs }
        }
        _ => unreachable!("kind checked above"),
    };
    r.end()?;
    Ok(frame)
}

#[cfg(test)]
mod tests;
