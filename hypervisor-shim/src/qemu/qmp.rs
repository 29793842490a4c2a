//! QMP, the QEMU Machine Protocol: JSON objects one per line over a unix
//! socket (`qapi/qmp-spec.rst`). QEMU greets, the client negotiates with
//! `qmp_capabilities`, then sends `{"execute": ..., "arguments": ...}` and
//! reads `{"return": ...}` or `{"error": {...}}`, with events
//! (`{"event": ..., "data": ..., "timestamp": ...}`) interleaved.
//!
//! Typed with serde types of our own for the commands the engine uses
//! (their names and fields as `qapi/*.json` spells them). The `qapi`
//! crate was looked at: it generates every QAPI type of one QEMU version
//! at build time, a larger build than the dozen commands used here, and
//! ties the build to a schema version; QMP itself is stable across
//! versions for these commands.
//!
//! Everything QEMU sends is outside input: a line longer than
//! [`MAX_LINE`] or one that is no QMP message is an error, never a panic.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest line accepted from QEMU (its replies here are a few KiB).
pub const MAX_LINE: usize = 1 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket.
    #[error("QMP socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection.
    #[error("QEMU closed its QMP connection")]
    Closed,
    /// A line that is no QMP message.
    #[error("QEMU sent something that is not QMP: {line:.200}")]
    Parse {
        /// The line (cut in the message).
        line: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A line over [`MAX_LINE`].
    #[error("QEMU sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The first message was not the greeting, or a reply came where none
    /// was due.
    #[error("unexpected QMP message: {0}")]
    Unexpected(String),
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Refused {
        /// The command.
        command: &'static str,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A reply whose contents do not read as the command's result.
    #[error("QEMU's reply to {command} does not read")]
    Reply {
        /// The command.
        command: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Waited too long (for the socket, a reply or a state).
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

/// A migration capability (`MigrationCapability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `MIGRATION` events on every status change.
    Events,
    /// Stop at `pre-switchover` until `migrate-continue`.
    PauseBeforeSwitchover,
}

/// A capability and whether it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityState {
    /// The capability.
    pub capability: Capability,
    /// On or off.
    pub state: bool,
}

/// Migration parameters set before a migration (`MigrateSetParameters`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateParameters {
    /// Longest pause allowed at the end (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bandwidth cap (bytes/s; 0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// The `tls-creds-*` object the stream is encrypted and authenticated
    /// with ("" for none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
}

/// A `tls-creds-psk` object (`object-add`): TLS keyed by a pre-shared key
/// read from `DIR/keys.psk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCredsPsk {
    /// Always `tls-creds-psk`.
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    /// The object's id.
    pub id: String,
    /// `client` or `server`.
    pub endpoint: String,
    /// The directory holding `keys.psk`.
    pub dir: String,
    /// The key's user name (a client's).
    pub username: String,
}

/// The commands the engine sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "execute", content = "arguments")]
pub enum Command {
    /// Leaves capabilities negotiation.
    #[serde(rename = "qmp_capabilities")]
    QmpCapabilities,
    /// Run state.
    #[serde(rename = "query-status")]
    QueryStatus,
    /// Pauses the vCPUs.
    #[serde(rename = "stop")]
    Stop,
    /// Resumes them.
    #[serde(rename = "cont")]
    Cont,
    /// Exits QEMU at once.
    #[serde(rename = "quit")]
    Quit,
    /// ACPI power button.
    #[serde(rename = "system_powerdown")]
    SystemPowerdown,
    /// Sets migration capabilities.
    #[serde(rename = "migrate-set-capabilities")]
    MigrateSetCapabilities {
        /// Each capability's state.
        capabilities: Vec<CapabilityState>,
    },
    /// Sets migration parameters.
    #[serde(rename = "migrate-set-parameters")]
    MigrateSetParameters(MigrateParameters),
    /// Starts an outgoing migration to `uri` (`tcp:HOST:PORT`, `file:PATH`).
    #[serde(rename = "migrate")]
    Migrate {
        /// Where.
        uri: String,
    },
    /// Starts listening for an incoming migration (`-incoming defer`).
    #[serde(rename = "migrate-incoming")]
    MigrateIncoming {
        /// Where.
        uri: String,
    },
    /// Continues a migration paused at `state`.
    #[serde(rename = "migrate-continue")]
    MigrateContinue {
        /// The state it paused in.
        state: MigrationStatus,
    },
    /// Cancels the outgoing migration.
    #[serde(rename = "migrate_cancel")]
    MigrateCancel,
    /// The migration's state and figures.
    #[serde(rename = "query-migrate")]
    QueryMigrate,
    /// Adds TLS credentials.
    #[serde(rename = "object-add")]
    ObjectAdd(TlsCredsPsk),
    /// Removes an object.
    #[serde(rename = "object-del")]
    ObjectDel {
        /// Its id.
        id: String,
    },
}

impl Command {
    /// Its QMP name (for messages).
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities => "qmp_capabilities",
            Command::QueryStatus => "query-status",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::SystemPowerdown => "system_powerdown",
            Command::MigrateSetCapabilities { .. } => "migrate-set-capabilities",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::Migrate { .. } => "migrate",
            Command::MigrateIncoming { .. } => "migrate-incoming",
            Command::MigrateContinue { .. } => "migrate-continue",
            Command::MigrateCancel => "migrate_cancel",
            Command::QueryMigrate => "query-migrate",
            Command::ObjectAdd(_) => "object-add",
            Command::ObjectDel { .. } => "object-del",
        }
    }
}

/// A migration's status (`MigrationStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A status of a newer QEMU.
    #[serde(other)]
    Other,
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`,
    /// `finish-migrate`, `shutdown`, ...).
    pub status: String,
}

/// RAM figures of a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes left.
    #[serde(default)]
    pub remaining: u64,
    /// Guest RAM.
    #[serde(default)]
    pub total: u64,
    /// Pages dirtied per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Throughput (Mbit/s).
    #[serde(default)]
    pub mbps: f64,
    /// Rounds over the dirty bitmap.
    #[serde(default)]
    pub dirty_sync_count: u64,
}

/// An address QEMU listens on (`SocketAddress`, the kinds used here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    /// TCP.
    Inet {
        /// Host.
        host: String,
        /// Port.
        port: String,
    },
    /// A unix socket.
    Unix {
        /// Its path.
        path: String,
    },
    /// Anything else.
    #[serde(other)]
    Other,
}

/// `query-migrate`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Where it stands (absent before any migration).
    pub status: Option<MigrationStatus>,
    /// RAM figures.
    pub ram: Option<RamStats>,
    /// Milliseconds since it began.
    pub total_time: Option<u64>,
    /// The pause at the end (ms), once completed.
    pub downtime: Option<u64>,
    /// The pause QEMU expects (ms), while active.
    pub expected_downtime: Option<u64>,
    /// Where an incoming migration listens.
    pub socket_address: Option<Vec<SocketAddress>>,
    /// Why it failed.
    pub error_desc: Option<String>,
}

/// QEMU's error object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorBody {
    /// The error class.
    pub class: String,
    /// What went wrong.
    pub desc: String,
}

/// An event's timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds.
    pub seconds: i64,
    /// Microseconds.
    pub microseconds: i64,
}

impl Timestamp {
    /// As a point in time (QEMU stamps events with the host's real-time
    /// clock); None when out of range.
    pub fn time(&self) -> Option<std::time::SystemTime> {
        let secs = u64::try_from(self.seconds).ok()?;
        let micros = u64::try_from(self.microseconds).ok()?;
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_micros(
            secs.checked_mul(1_000_000)?.checked_add(micros)?,
        ))
    }
}

/// Events kept on a connection (the rest are dropped, oldest first).
pub const MAX_EVENTS: usize = 64;

/// Something QEMU sent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Message {
    /// A command's result.
    Return {
        /// The result.
        #[serde(rename = "return")]
        value: Value,
    },
    /// A command's failure.
    Error {
        /// Why.
        error: ErrorBody,
    },
    /// An event.
    Event {
        /// Its name (`MIGRATION`, `STOP`, `SHUTDOWN`, ...).
        event: String,
        /// Its data.
        #[serde(default)]
        data: Value,
        /// When.
        timestamp: Timestamp,
    },
    /// The greeting on connect.
    Greeting {
        /// Version and capabilities.
        #[serde(rename = "QMP")]
        qmp: Value,
    },
}

/// Parses one line QEMU sent.
pub fn parse(line: &[u8]) -> Result<Message, QmpError> {
    if line.len() > MAX_LINE {
        return Err(QmpError::TooLong);
    }
    serde_json::from_slice(line).map_err(|source| QmpError::Parse {
        line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
        source,
    })
}

/// A QMP connection, past the capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, oldest first (the
    /// latest [`MAX_EVENTS`]): name, data, when.
    pub events: Vec<(String, Value, Timestamp)>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, waiting up to `wait` for it to
    /// appear, and leaves negotiation mode.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io(e)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        match q.read()? {
            Message::Greeting { .. } => {}
            other => return Err(QmpError::Unexpected(format!("{other:?}"))),
        }
        q.execute::<Value>(&Command::QmpCapabilities)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Message, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.len() > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        parse(&line)
    }

    /// Sends `cmd` and reads its result as `T`; events that arrive first
    /// are kept in [`Qmp::events`].
    pub fn execute<T: serde::de::DeserializeOwned>(
        &mut self,
        cmd: &Command,
    ) -> Result<T, QmpError> {
        let mut text = serde_json::to_vec(cmd).map_err(|source| QmpError::Reply {
            command: cmd.name(),
            source,
        })?;
        text.push(b'\n');
        self.writer
            .write_all(&text)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            match self.read()? {
                Message::Return { value } => {
                    return serde_json::from_value(value).map_err(|source| QmpError::Reply {
                        command: cmd.name(),
                        source,
                    })
                }
                Message::Error { error } => {
                    return Err(QmpError::Refused {
                        command: cmd.name(),
                        class: error.class,
                        desc: error.desc,
                    })
                }
                Message::Event {
                    event,
                    data,
                    timestamp,
                } => {
                    if self.events.len() >= MAX_EVENTS {
                        self.events.remove(0);
                    }
                    self.events.push((event, data, timestamp));
                }
                Message::Greeting { .. } => {
                    return Err(QmpError::Unexpected("a second greeting".into()))
                }
            }
        }
    }

    /// Sends a command whose result is empty.
    pub fn run(&mut self, cmd: &Command) -> Result<(), QmpError> {
        self.execute::<Value>(cmd).map(drop)
    }

    /// Starts an outgoing migration to `uri` over TLS with the
    /// credentials object `tls_creds`, QEMU's events on and the guest held
    /// at `pre-switchover` until `migrate-continue` (a downtime limit of
    /// 300 ms).
    pub fn migrate_paused(&mut self, tls_creds: &str, uri: String) -> Result<(), QmpError> {
        self.run(&Command::MigrateSetParameters(MigrateParameters {
            tls_creds: Some(tls_creds.into()),
            downtime_limit: Some(300),
            ..Default::default()
        }))?;
        self.run(&Command::MigrateSetCapabilities {
            capabilities: vec![
                CapabilityState {
                    capability: Capability::Events,
                    state: true,
                },
                CapabilityState {
                    capability: Capability::PauseBeforeSwitchover,
                    state: true,
                },
            ],
        })?;
        self.run(&Command::Migrate { uri })
    }

    /// When QEMU last held a migrating guest at `pre-switchover` (its
    /// event's stamp), if it said.
    pub fn paused_at(&self) -> Option<std::time::SystemTime> {
        self.events
            .iter()
            .rev()
            .find(|(e, d, _)| {
                e == "MIGRATION"
                    && d.get("status").and_then(|s| s.as_str()) == Some("pre-switchover")
            })
            .and_then(|(_, _, t)| t.time())
    }

    /// Polls `query-migrate` every `every` until `done` says so, for at
    /// most `limit`; returns the last answer.
    pub fn wait_migration(
        &mut self,
        every: Duration,
        limit: Duration,
        mut done: impl FnMut(&MigrationInfo) -> bool,
    ) -> Result<MigrationInfo, QmpError> {
        let deadline = Instant::now() + limit;
        loop {
            let info: MigrationInfo = self.execute(&Command::QueryMigrate)?;
            if done(&info) {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(limit, "the migration"));
            }
            std::thread::sleep(every);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commands_are_spelled_as_qapi_spells_them() {
        let j = |c: &Command| serde_json::to_string(c).unwrap();
        assert_eq!(
            j(&Command::QmpCapabilities),
            r#"{"execute":"qmp_capabilities"}"#
        );
        assert_eq!(
            j(&Command::MigrateCancel),
            r#"{"execute":"migrate_cancel"}"#
        );
        assert_eq!(
            j(&Command::MigrateContinue {
                state: MigrationStatus::PreSwitchover
            }),
            r#"{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}"#
        );
        assert_eq!(
            j(&Command::MigrateSetCapabilities {
                capabilities: vec![CapabilityState {
                    capability: Capability::PauseBeforeSwitchover,
                    state: true
                }]
            }),
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":true}]}}"#
        );
        assert_eq!(
            j(&Command::MigrateSetParameters(MigrateParameters {
                downtime_limit: Some(300),
                ..Default::default()
            })),
            r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300}}"#
        );
        for c in [Command::Stop, Command::QueryMigrate, Command::Quit] {
            assert!(j(&c).contains(c.name()));
        }
    }

    #[test]
    fn replies_events_and_the_greeting_read() {
        let g = parse(br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#).unwrap();
        assert!(matches!(g, Message::Greeting { .. }));
        let r = parse(br#"{"return": {"status": "pre-switchover", "ram": {"transferred": 10, "remaining": 0, "total": 512, "mbps": 1.5}, "total-time": 40}}"#).unwrap();
        let Message::Return { value } = r else {
            panic!("{r:?}")
        };
        let m: MigrationInfo = serde_json::from_value(value).unwrap();
        assert_eq!(m.status, Some(MigrationStatus::PreSwitchover));
        assert_eq!(m.ram.unwrap().transferred, 10);
        let inc = parse(br#"{"return": {"status": "setup", "socket-address": [{"port": "40001", "ipv6": false, "host": "127.0.0.1", "type": "inet"}]}}"#).unwrap();
        let Message::Return { value } = inc else {
            panic!()
        };
        let m: MigrationInfo = serde_json::from_value(value).unwrap();
        assert_eq!(
            m.socket_address.unwrap()[0],
            SocketAddress::Inet {
                host: "127.0.0.1".into(),
                port: "40001".into()
            }
        );
        let e = parse(br#"{"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).unwrap();
        assert!(matches!(e, Message::Event { ref event, .. } if event == "MIGRATION"));
        let err = parse(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap();
        assert!(matches!(err, Message::Error { .. }));
        // A status of a later QEMU still reads.
        let s: MigrationStatus = serde_json::from_str(r#""something-new""#).unwrap();
        assert_eq!(s, MigrationStatus::Other);
    }

    #[test]
    fn garbage_and_overlong_lines_are_errors() {
        assert!(matches!(parse(b"not json"), Err(QmpError::Parse { .. })));
        assert!(matches!(
            parse(br#"{"neither": 1}"#),
            Err(QmpError::Parse { .. })
        ));
        assert!(matches!(
            parse(&vec![b' '; MAX_LINE + 1]),
            Err(QmpError::TooLong)
        ));
    }

    #[test]
    fn a_fake_qemu_answers_through_the_client() {
        use std::io::{BufRead, Write};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qmp.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("query-status"));
            writeln!(
                w,
                r#"{{"event": "RESUME", "timestamp": {{"seconds": 1, "microseconds": 0}}}}"#
            )
            .unwrap();
            writeln!(
                w,
                r#"{{"return": {{"running": true, "status": "running"}}}}"#
            )
            .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            writeln!(
                w,
                r#"{{"error": {{"class": "GenericError", "desc": "nope"}}}}"#
            )
            .unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let s: StatusInfo = q.execute(&Command::QueryStatus).unwrap();
        assert!(s.running);
        assert_eq!(q.events[0].0, "RESUME");
        let e = q.run(&Command::Cont).unwrap_err();
        assert!(e.to_string().contains("refused cont: nope"), "{e}");
        server.join().unwrap();
    }

    proptest! {
        #[test]
        fn any_line_parses_or_errs(line in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&line);
        }

        #[test]
        fn any_json_value_parses_or_errs(v in any::<Option<i64>>(), key in "[a-zQ]{1,8}", s in ".{0,20}") {
            let line = serde_json::json!({ key: { "status": s, "x": v } }).to_string();
            let _ = parse(line.as_bytes());
        }
    }
}
