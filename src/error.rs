//! The one error type of the block stack. Every error knows the errno a frontend should report.

use crate::geometry::BlockId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stored data is damaged or cannot be decoded (bad MD5, bad HMAC, bad encoding, wrong length).
    #[error("block {block}: {msg}")]
    Corrupt { block: BlockId, msg: String },
    /// The server refused our credentials (401).
    #[error("access denied: {0}")]
    Unauthorized(String),
    /// The server forbade the request (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A conditional request found other data (412).
    #[error("stale content: {0}")]
    Stale(String),
    /// The server redirected us (3xx): usually a wrong region or addressing style.
    #[error("redirected: {0} (you may need the \"--vhost\" and/or \"--region\" flags)")]
    Redirect(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// Could not connect or resolve the host.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The object does not exist (used only where absence is an error).
    #[error("not found: {0}")]
    NotFound(String),
    #[error("read-only disk")]
    ReadOnly,
    /// Another process holds the disk (mount token conflict).
    #[error("{0}")]
    Busy(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Any other HTTP or protocol failure.
    #[error("{0}")]
    Other(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn corrupt(block: BlockId, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            block,
            msg: msg.into(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a frontend reports for this error (matches C s3backer's mapping, spec 2.9).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Corrupt { .. } | Error::Other(_) => libc::EIO,
            Error::Unauthorized(_) => libc::EACCES,
            Error::Forbidden(_) => libc::EPERM,
            Error::Stale(_) => libc::ESTALE,
            Error::Redirect(_) => libc::ELOOP,
            Error::Timeout(_) => libc::ETIMEDOUT,
            Error::Connect(_) => libc::ENXIO,
            Error::NotFound(_) => libc::ENOENT,
            Error::ReadOnly => libc::EROFS,
            Error::Busy(_) => libc::EBUSY,
            Error::Invalid(_) => libc::EINVAL,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
