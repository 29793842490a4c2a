//! What a host serves for the layers above consensus, beside its Raft
//! groups: one trait per concern, implemented by the node daemon and
//! handed to [`crate::node::Node::start`] in a [`Services`]. The
//! coordinator dispatches the requests (off its Raft thread) and knows
//! nothing of what is behind them.
//!
//! | request | trait | served where |
//! |---|---|---|
//! | `Block` (redirected block I/O) | [`BlockService`] | a host with a direct path to the LUN |
//! | `File` (FileSystemRedirected file I/O) | [`FileService`] | the volume's coordinator |
//! | `Admin::Redirect` | [`RedirectService`] | the host asked |
//! | `Admin::SnapshotPhase` | [`SnapshotService`] | every host mounting the volume |
//! | `Admin::Fault` (SAN faults, crash) | [`FaultService`] | the host asked |
//! | `Admin::Probe` | [`ProbeService`] | the host asked |
//! | `Admin::Status` (volumes, VMs, load) | [`StatusService`] | the host asked |
//!
//! A host without a service answers its requests with `NoGroup` (it
//! serves no volume, say); network and clock faults are the coordinator's
//! own ([`crate::faults`]).

use crate::proto::{self, ErrorCode};
use std::sync::Arc;

/// Why a host service did not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    /// The kind of failure, for the caller.
    pub code: ErrorCode,
    /// What happened, with every cause (the error chain, rendered once:
    /// it crosses the network as text).
    pub message: String,
}

impl ServiceError {
    /// A failure of kind `code`, described by `err` and its causes.
    pub fn new(code: ErrorCode, err: &(dyn std::error::Error + 'static)) -> ServiceError {
        ServiceError {
            code,
            message: error_chain(err),
        }
    }

    /// A request this host cannot serve as asked (bad arguments, or not
    /// in a state to).
    pub fn invalid(err: &(dyn std::error::Error + 'static)) -> ServiceError {
        ServiceError::new(ErrorCode::Invalid, err)
    }

    /// A request that failed here and may work elsewhere or later.
    pub fn unavailable(err: &(dyn std::error::Error + 'static)) -> ServiceError {
        ServiceError::new(ErrorCode::Unavailable, err)
    }

    /// A failure described in words.
    pub fn text(code: ErrorCode, message: impl Into<String>) -> ServiceError {
        ServiceError {
            code,
            message: message.into(),
        }
    }

    /// As the wire carries it.
    pub fn to_proto(&self) -> proto::Error {
        proto::error(self.code, self.message.clone())
    }
}

/// An error and its causes on one line: `what: why: root cause`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        // A message that already ends with its cause's text (a wrapper
        // that formats its source) is not repeated.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Serves block I/O on the LUNs this host reaches directly, for hosts
/// whose own path is not in use.
pub trait BlockService: Send + Sync {
    /// Does one redirected request; a read returns its bytes, a write
    /// and a flush nothing.
    fn block(&self, op: &proto::BlockOp) -> Result<bytes::Bytes, ServiceError>;
}

/// Does the file I/O of FileSystemRedirected hosts, through this host's
/// own mount of the volume.
pub trait FileService: Send + Sync {
    /// Does one file operation.
    fn file(&self, op: &proto::FileOp) -> Result<proto::FileReply, ServiceError>;
}

/// Sends this host's I/O to a volume through a peer, or back over its
/// own path.
pub trait RedirectService: Send + Sync {
    /// Turns a redirection on or off.
    fn redirect(&self, req: &proto::RedirectReq) -> Result<(), ServiceError>;
}

/// Carries out this host's part of a volume snapshot.
pub trait SnapshotService: Send + Sync {
    /// Does one phase.
    fn phase(
        &self,
        req: &proto::SnapshotPhaseReq,
    ) -> Result<proto::SnapshotPhaseReply, ServiceError>;
}

/// Injects a failure drill's faults that are not the coordinator's own:
/// on this host's SAN paths, and its crash.
pub trait FaultService: Send + Sync {
    /// Injects (or, for `heal`, ends) a fault.
    fn fault(&self, req: &proto::FaultReq) -> Result<(), ServiceError>;
}

/// Answers `csvctl validate`'s probe: this host's facts and paths.
pub trait ProbeService: Send + Sync {
    /// This host's facts, its paths to its volumes and to `candidates`
    /// (LUNs that are no volume yet).
    fn facts(&self, candidates: &[String]) -> proto::HostFacts;
}

/// The serial consoles of the VMs this host runs.
pub trait ConsoleService: Send + Sync {
    /// Part of VM `q.name`'s console output.
    fn console(&self, q: &proto::VmConsoleReq) -> Result<proto::VmConsoleReply, ServiceError>;
}

/// What this host's status reports beside its groups.
pub trait StatusService: Send + Sync {
    /// How it reaches each volume.
    fn volumes(&self) -> Vec<proto::VolumeState>;
    /// The VMs it runs.
    fn vms(&self) -> Vec<proto::VmRuntime>;
    /// What it has free, for placement.
    fn load(&self) -> Option<proto::HostLoadInfo>;
}

/// The services a host offers (None: it does not serve that concern).
#[derive(Clone, Default)]
pub struct Services {
    /// Redirected block I/O.
    pub block: Option<Arc<dyn BlockService>>,
    /// FileSystemRedirected file I/O.
    pub file: Option<Arc<dyn FileService>>,
    /// Redirection on request.
    pub redirect: Option<Arc<dyn RedirectService>>,
    /// Snapshot phases.
    pub snapshot: Option<Arc<dyn SnapshotService>>,
    /// Drill faults on its paths.
    pub fault: Option<Arc<dyn FaultService>>,
    /// Facts for `csvctl validate`.
    pub probe: Option<Arc<dyn ProbeService>>,
    /// Volumes, VMs and load in its status.
    pub status: Option<Arc<dyn StatusService>>,
    /// Its VMs' serial consoles.
    pub console: Option<Arc<dyn ConsoleService>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("block", &self.block.is_some())
            .field("file", &self.file.is_some())
            .field("redirect", &self.redirect.is_some())
            .field("snapshot", &self.snapshot.is_some())
            .field("fault", &self.fault.is_some())
            .field("probe", &self.probe.is_some())
            .field("status", &self.status.is_some())
            .field("console", &self.console.is_some())
            .finish()
    }
}

/// The answer for a host without the service asked for.
pub(crate) fn missing(what: &str) -> ServiceError {
    ServiceError::text(ErrorCode::NoGroup, format!("this host {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the superblock of Volume3")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_chain_is_one_line_with_every_cause_once() {
        let e = Outer(std::io::Error::other("LUN refused the read"));
        assert_eq!(
            error_chain(&e),
            "reading the superblock of Volume3: LUN refused the read"
        );
        let s = ServiceError::unavailable(&e);
        assert_eq!(s.code, ErrorCode::Unavailable);
        let p = s.to_proto();
        assert_eq!(p.code(), ErrorCode::Unavailable);
        assert!(p.message.ends_with("LUN refused the read"));
    }
}
