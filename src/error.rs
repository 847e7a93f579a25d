//! The core's error type. The binding layer maps each variant to one Python
//! exception in a single place (`python/mod.rs`).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A constructor argument is out of range; `argument` is its Python name.
    #[error("{argument}: {message}")]
    InvalidArgument {
        argument: &'static str,
        message: String,
    },

    /// Every port of the range is leased or bound right now.
    #[error(
        "no free port in range {start}-{end}: {leased} leased by port managers, \
         {bound} in use by other programs"
    )]
    NoFreePort {
        start: u16,
        end: u16,
        leased: usize,
        bound: usize,
    },

    /// The manager was stopped; it hands out nothing any more.
    #[error("this DynamicPortManager was stopped (state file {0}); create a new one")]
    Stopped(PathBuf),

    /// The host-wide lease registry could not be read or written, so no port
    /// can be handed out safely.
    #[error("port lease registry {path}: {source}")]
    Registry {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Any other file-system failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(argument: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument,
            message: message.into(),
        }
    }

    pub fn registry(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Registry {
            path: path.into(),
            source,
        }
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The underlying `io::Error`, for mapping to `OSError` subclasses.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Registry { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
