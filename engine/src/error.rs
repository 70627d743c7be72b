//! The engine's error type: one precise variant per way an operation can fail.

use std::io;

use crate::types::{Lsn, SegmentId, VolumeId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A write or sync failed earlier; the kernel may have dropped dirty pages, so nothing written
    /// since the last successful sync can be trusted. Only a reopen (which recovers from the log)
    /// is safe.
    #[error("store is stopped after an earlier I/O error ({cause}); close and reopen it to recover")]
    Poisoned { cause: String },
    #[error("no space left in the store: live data fills it; trim or delete data, or grow the device")]
    NoSpace,
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolumeId),
    #[error("volume named {0:?} does not exist")]
    NoSuchVolumeName(String),
    #[error("a volume named {0:?} already exists")]
    VolumeExists(String),
    #[error("invalid volume name {0:?}: use 1..=64 characters from [A-Za-z0-9._-]")]
    BadVolumeName(String),
    #[error("too many volumes (limit {limit})")]
    TooManyVolumes { limit: usize },
    #[error("range {offset}+{len} is outside volume {volume} of {size} bytes")]
    OutOfRange { volume: VolumeId, offset: u64, len: u64, size: u64 },
    #[error("request of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("checksum mismatch in durable data: segment {segment}, LSN {lsn_range}, device offset {offset}: {what}")]
    Corrupt { segment: SegmentId, lsn_range: String, offset: u64, what: String },
    #[error("store is corrupt: {0}")]
    CorruptStore(String),
    #[error("{path}: not a syncblock store ({why}); likely cause: a wrong --store path, or the store was never created (create one with `syncblock serve --create`)")]
    NotAStore { path: String, why: String },
    #[error("store format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("io_uring is unavailable: {cause}")]
    UringUnavailable { cause: String },
    #[error("I/O error on {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("the engine has shut down")]
    ShutDown,
    #[error("corrupt record at segment {segment}, LSN {lsn}: {what}")]
    CorruptRecord { segment: SegmentId, lsn: Lsn, what: String },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io { what: what.into(), source }
    }

    /// What kind of failure this is: the one classification that protocol layers map from (NBD
    /// errnos, the admin endpoint's HTTP statuses), so that they cannot disagree. Exhaustive here,
    /// where the variants are known; callers match on [`ErrorClass`], which is not
    /// `non_exhaustive`.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::BadVolumeName(_) | Error::InvalidArgument(_) | Error::TooLarge { .. } => ErrorClass::Invalid,
            Error::OutOfRange { .. } => ErrorClass::OutOfRange,
            Error::NoSuchVolume(_) | Error::NoSuchVolumeName(_) => ErrorClass::NotFound,
            Error::VolumeExists(_) => ErrorClass::Conflict,
            Error::NoSpace | Error::TooManyVolumes { .. } => ErrorClass::NoSpace,
            Error::ShutDown => ErrorClass::ShuttingDown,
            Error::Poisoned { .. }
            | Error::Corrupt { .. }
            | Error::CorruptStore(_)
            | Error::CorruptRecord { .. }
            | Error::Io { .. } => ErrorClass::Failed,
            Error::NotAStore { .. } | Error::UnsupportedVersion { .. } | Error::UringUnavailable { .. } => {
                ErrorClass::Unusable
            }
        }
    }
}

/// The kinds of failure every layer above the engine tells apart (see [`Error::class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is malformed or asks for the impossible (a bad name or size, too large).
    Invalid,
    /// The range lies outside the volume.
    OutOfRange,
    /// What the request names does not exist.
    NotFound,
    /// The request conflicts with the current state: a name taken, a role another node holds, a
    /// peer's or the witness's refusal.
    Conflict,
    /// Not allowed here: a read-only export, a replica that is not the primary.
    Forbidden,
    /// No room: the store is full, or holds as many volumes as it can.
    NoSpace,
    /// The service is stopping or stopped.
    ShuttingDown,
    /// The storage failed, or holds damaged data: nothing about the request was wrong.
    Failed,
    /// The store cannot be used as it is: not a store, an unsupported version, no io_uring.
    Unusable,
}
