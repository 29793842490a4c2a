//! The caller's side of a VMM's control socket.

use super::proto::{Answer, Confirm, Line, MigrateRequest, Reply, Request, Status};
use crate::migrate::{Progress, Summary};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a request to a VMM did not get its answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket is not there or refuses.
    #[error("connecting to the control socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking on it.
    #[error("on the control socket")]
    Io(#[from] std::io::Error),
    /// The VMM closed it before answering.
    #[error("the VMM closed its control socket without an answer")]
    Closed,
    /// A line that is not a message.
    #[error("the VMM sent something that is not a control message")]
    Garbled(#[source] serde_json::Error),
    /// The VMM refused or failed.
    #[error("the VMM answered: {0}")]
    Refused(String),
    /// An answer of another kind than the request's.
    #[error("the VMM answered {0:?}, not what was asked")]
    Unexpected(Box<Reply>),
    /// The caller's own switch-over step failed (the migration was given
    /// up and the guest resumed at the source).
    #[error("the switch-over was given up")]
    SwitchOver(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A conversation with one VMM.
#[derive(Debug)]
pub struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    /// Connects to the socket at `path`; answers wait at most `timeout`
    /// (None: as long as they take).
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Control, ControlError> {
        let conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        conn.set_read_timeout(timeout)?;
        Ok(Control {
            w: conn.try_clone()?,
            r: BufReader::new(conn),
        })
    }

    fn write<T: serde::Serialize>(&mut self, m: &T) -> Result<(), ControlError> {
        let text = serde_json::to_string(m).map_err(ControlError::Garbled)?;
        writeln!(self.w, "{text}")?;
        Ok(())
    }

    fn next(&mut self) -> Result<Line, ControlError> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(ControlError::Closed);
        }
        serde_json::from_str(&line).map_err(ControlError::Garbled)
    }

    /// Sends `req` and waits for its answer; progress lines go to
    /// `progress`.
    pub fn ask(
        &mut self,
        req: &Request,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Reply, ControlError> {
        self.write(req)?;
        loop {
            match self.next()? {
                Line::Progress(p) => progress(&p),
                // Only a migration with `confirm` waits for an answer.
                Line::Acked => self.write(&Confirm::Abort)?,
                Line::Answer(Answer::Ok(r)) => return Ok(r),
                Line::Answer(Answer::Err(e)) => return Err(ControlError::Refused(e)),
            }
        }
    }

    /// Live-migrates the VM. With `confirm` set, `switch_over` runs once
    /// the target has the whole state and before it resumes (the disk's
    /// write lease moves there); its failure gives the migration up.
    pub fn migrate(
        &mut self,
        m: MigrateRequest,
        mut progress: impl FnMut(&Progress),
        mut switch_over: impl FnMut() -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Summary, ControlError> {
        self.write(&Request::Migrate(m))?;
        let mut failed = None;
        loop {
            match self.next()? {
                Line::Progress(p) => progress(&p),
                Line::Acked => match switch_over() {
                    Ok(()) => self.write(&Confirm::Go)?,
                    Err(e) => {
                        failed = Some(e);
                        self.write(&Confirm::Abort)?;
                    }
                },
                Line::Answer(a) => {
                    if let Some(e) = failed {
                        return Err(ControlError::SwitchOver(e));
                    }
                    return match a {
                        Answer::Ok(Reply::Summary(s)) => Ok(s),
                        Answer::Ok(other) => Err(ControlError::Unexpected(Box::new(other))),
                        Answer::Err(e) => Err(ControlError::Refused(e)),
                    };
                }
            }
        }
    }
}

/// One request to the VMM at `path` (answer within 15 s).
pub fn ask(path: &Path, req: &Request) -> Result<Reply, ControlError> {
    Control::connect(path, Some(Duration::from_secs(15)))?.ask(req, |_| {})
}

/// The status of the VMM at `path`.
pub fn status(path: &Path) -> Result<Status, ControlError> {
    match ask(path, &Request::Status)? {
        Reply::Status(s) => Ok(*s),
        other => Err(ControlError::Unexpected(Box::new(other))),
    }
}

/// Asks for something that answers `done`.
pub fn act(path: &Path, req: &Request) -> Result<(), ControlError> {
    match ask(path, req)? {
        Reply::Done => Ok(()),
        other => Err(ControlError::Unexpected(Box::new(other))),
    }
}
