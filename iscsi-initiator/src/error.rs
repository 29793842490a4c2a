//! Errors of the initiator. Each says which portal, target, LUN, LBA or
//! login stage it concerns.

use crate::pdu::PduError;
use crate::scsi::Sense;
use crate::text::TextError;

/// What went wrong talking to a target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URL that is not `iscsi://[user[%secret]@]host[:port]/iqn/lun`.
    #[error("bad iSCSI URL `{url}`: {reason}")]
    Url {
        /// The URL (secret removed).
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to portal {portal}")]
    Connect {
        /// host:port.
        portal: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("connection to {portal} failed while {what}")]
    Io {
        /// host:port.
        portal: String,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PDU from the target was malformed.
    #[error("malformed PDU from {portal}")]
    Pdu {
        /// host:port.
        portal: String,
        /// The problem.
        #[source]
        source: PduError,
    },
    /// Text keys from the target were malformed.
    #[error("malformed text keys from {portal}")]
    Text {
        /// host:port.
        portal: String,
        /// The problem.
        #[source]
        source: TextError,
    },
    /// The target refused the login.
    #[error("login to {target} at {portal} failed in the {stage} stage: {message} (status {class:#04x}/{detail:#04x})")]
    Login {
        /// Target name.
        target: String,
        /// host:port.
        portal: String,
        /// Security, operational or full-feature.
        stage: &'static str,
        /// Status class.
        class: u8,
        /// Status detail.
        detail: u8,
        /// What the status means.
        message: &'static str,
    },
    /// Authentication failed on our side (the target's CHAP answer was
    /// wrong, or it reflected our challenge).
    #[error("authentication of target {target} at {portal} failed: {reason}")]
    Auth {
        /// Target name.
        target: String,
        /// host:port.
        portal: String,
        /// Why.
        reason: String,
    },
    /// The target broke the protocol.
    #[error("protocol error from {portal}: {what}")]
    Protocol {
        /// host:port.
        portal: String,
        /// What it did.
        what: String,
    },
    /// A SCSI command ended with a status other than GOOD.
    #[error("{op} on {target} LUN {lun}{} failed: status {status:#04x}{}", lba.map(|l| format!(" at LBA {l}")).unwrap_or_default(), sense.as_ref().map(|s| format!(", {s}")).unwrap_or_default())]
    Scsi {
        /// The command.
        op: &'static str,
        /// Target name.
        target: String,
        /// LUN.
        lun: u16,
        /// First LBA of the command, if it has one.
        lba: Option<u64>,
        /// SCSI status.
        status: u8,
        /// Sense data, if any.
        sense: Option<Sense>,
    },
    /// RESERVATION CONFLICT: this host was fenced off the LUN.
    #[error("fenced: {op} on {target} LUN {lun} got RESERVATION CONFLICT")]
    Fenced {
        /// The command.
        op: &'static str,
        /// Target name.
        target: String,
        /// LUN.
        lun: u16,
    },
    /// The target does not implement the command (ILLEGAL REQUEST,
    /// INVALID COMMAND OPERATION CODE).
    #[error("{target} does not support {op}")]
    Unsupported {
        /// The command.
        op: &'static str,
        /// Target name.
        target: String,
    },
    /// No answer in time.
    #[error("{what} at {portal} timed out after {secs} s")]
    Timeout {
        /// host:port.
        portal: String,
        /// What was waited for.
        what: String,
        /// How long.
        secs: u64,
    },
    /// The session is gone (logged out, or the connection was lost and
    /// could not be reinstated).
    #[error("session to {target} at {portal} is closed")]
    Closed {
        /// Target name.
        target: String,
        /// host:port.
        portal: String,
    },
    /// An argument the initiator cannot use.
    #[error("{0}")]
    Invalid(String),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
