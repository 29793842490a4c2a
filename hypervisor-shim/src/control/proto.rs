//! The control socket's messages: one definition, used by the VMM that
//! serves the socket and by everyone who talks to it (the VM supervisor,
//! `csv-vmm ctl`, the tests and the benchmark). JSON lines on a Unix
//! socket.
//!
//! ```text
//! caller                                VMM
//!   | -- Request (one line) ----------->  |
//!   | <-- Line::Progress (per round) ---  |   migrate only
//!   | <-- Line::Acked ------------------  |   migrate with `confirm`:
//!   | -- Confirm::Go / Confirm::Abort -->  |   the caller moved the disk's
//!   | <-- Line::Answer -----------------  |   write lease (or gave up)
//! ```

use crate::migrate::{Progress, Summary};
use crate::virtio_blk::BlkStats;
use crate::vm::{GuestCheck, HeartbeatView, RunState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Longest line a VMM reads (a request or a confirmation).
pub const MAX_LINE: usize = 64 * 1024;

/// What a caller asks of a VMM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Where the VM stands and what its guest reports.
    Status,
    /// Pauses the vCPUs (their in-flight disk writes complete first).
    Pause,
    /// Resumes a paused VM.
    Resume,
    /// Stops the VM: its disk is flushed and closed, the VMM exits.
    Stop,
    /// Saves the VM's state to `path` (a quick migration's first half).
    Save {
        /// The file (on the VM's volume).
        path: PathBuf,
        /// Stop the VM afterwards (else it resumes).
        #[serde(default = "yes")]
        stop: bool,
    },
    /// Live-migrates the VM to a VMM waiting with `csv-vmm incoming`.
    Migrate(MigrateRequest),
    /// The test guest's dirtying rate.
    SetRate {
        /// MiB per second.
        mib_per_s: f64,
        /// Its tick (µs).
        #[serde(default = "default_tick")]
        tick_us: u64,
    },
    /// Scans the test guest's pages (pauses for the read).
    Check,
    /// CRC32 of all guest memory (pauses for the read).
    MemoryCrc,
    /// Memory size and pages in use, for placement.
    Stats,
    /// Each vCPU's registers (pauses for the read).
    Registers,
}

fn yes() -> bool {
    true
}

fn default_tick() -> u64 {
    1000
}

/// A live migration's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target VMM's address (HOST:PORT).
    pub to: String,
    /// The target's migration token (hex).
    pub token: String,
    /// The pause the last round may take (ms).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// The longest the migration may take (s).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Compare a CRC of all memory on both sides at the end.
    #[serde(default)]
    pub verify_memory: bool,
    /// After the target acknowledged the state, wait for the caller's
    /// [`Confirm`] before letting it resume.
    #[serde(default)]
    pub confirm: bool,
}

/// The caller's word after [`Line::Acked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Confirm {
    /// The disk's write lease moved: the target may resume.
    Go,
    /// Give up: the guest resumes here.
    Abort,
}

/// A line from the VMM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Line {
    /// A migration round finished.
    Progress(Progress),
    /// The target acknowledged the whole state (with `confirm`: waiting
    /// for the caller's [`Confirm`]).
    Acked,
    /// The request's answer (the last line of the request).
    Answer(Answer),
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// It was done.
    Ok(Reply),
    /// It failed, and why.
    Err(String),
}

/// What a request that worked answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Done, nothing to say.
    Done,
    /// For `status`.
    Status(Box<Status>),
    /// For `save` and `migrate`.
    Summary(Summary),
    /// For `check`.
    Check(GuestCheck),
    /// For `memory-crc`.
    MemoryCrc(u32),
    /// For `stats`.
    Stats(Stats),
    /// For `registers`.
    Registers(Vec<VcpuRegisters>),
}

/// Where a VMM's VM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmState {
    /// The VM is being built.
    Starting,
    /// Waiting for an incoming migration.
    Incoming,
    /// The VM exists: its own state.
    Vm(RunState),
}

/// A VMM's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Where it stands (None: unknown).
    pub state: Option<VmmState>,
    /// Where an incoming VMM waits for the migration.
    #[serde(default)]
    pub listen: Option<String>,
    /// Guest memory (bytes).
    #[serde(default)]
    pub mem_bytes: u64,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: u32,
    /// The guest's TSC rate (kHz).
    #[serde(default)]
    pub tsc_khz: u32,
    /// The test guest's heartbeat as this VMM saw it.
    #[serde(default)]
    pub heartbeat: HeartbeatView,
    /// The test guest's own counters.
    #[serde(default)]
    pub guest: GuestCounters,
    /// The disk's counters.
    #[serde(default)]
    pub disk: Option<BlkStats>,
}

/// The test guest's own counters (its mailbox).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCounters {
    /// Its heartbeat sequence number.
    pub seq: u64,
    /// Pages it found damaged.
    pub errors: u64,
    /// Pages it wrote.
    pub pages_written: u64,
    /// Laps over its dirty area.
    pub laps: u64,
    /// Disk writes it completed.
    pub disk_writes: u64,
    /// The heartbeat number of its last completed disk write.
    pub disk_last_seq: u64,
    /// Disk writes that failed.
    pub disk_errors: u64,
}

/// Memory, for placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Guest memory (bytes).
    pub mem_bytes: u64,
    /// Of it, touched (bytes).
    pub used_bytes: u64,
}

/// A vCPU's main registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRegisters {
    /// The vCPU.
    pub id: u32,
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// CR0.
    pub cr0: u64,
    /// Code segment selector.
    pub cs: u16,
    /// Multiprocessing state.
    pub mp_state: u32,
}

impl Status {
    /// The state as the cluster reports it.
    pub fn vm_state(&self) -> coordinator::proto::VmState {
        use coordinator::proto::VmState as S;
        match self.state {
            None => S::Unknown,
            Some(VmmState::Starting) => S::Starting,
            Some(VmmState::Incoming) => S::Incoming,
            Some(VmmState::Vm(RunState::Created)) => S::Starting,
            Some(VmmState::Vm(RunState::Running)) => S::Running,
            Some(VmmState::Vm(RunState::Paused)) => S::Paused,
            Some(VmmState::Vm(RunState::Migrated)) => S::Migrating,
            Some(VmmState::Vm(RunState::Saved)) => S::Saved,
            Some(VmmState::Vm(RunState::Stopped)) => S::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_they_were_written_by_hand() {
        let r: Request = serde_json::from_str(r#"{"cmd": "status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let r: Request = serde_json::from_str(r#"{"cmd": "save", "path": "/v/vm.state"}"#).unwrap();
        assert_eq!(
            r,
            Request::Save {
                path: "/v/vm.state".into(),
                stop: true
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"cmd": "migrate", "to": "10.0.0.2:4000", "token": "ab", "confirm": true}"#,
        )
        .unwrap();
        let Request::Migrate(m) = r else { panic!() };
        assert!(m.confirm && !m.verify_memory && m.downtime_ms.is_none());
        let r: Request = serde_json::from_str(r#"{"cmd": "set-rate", "mib_per_s": 50}"#).unwrap();
        assert_eq!(
            r,
            Request::SetRate {
                mib_per_s: 50.0,
                tick_us: 1000
            }
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for bad in [
            r#"{"cmd": "reboot"}"#,
            r#"{"cmd": "save"}"#,
            r#"{"cmd": "set-rate", "mib_per_s": 1.0, "tick_us": 100, "extra": 1}"#,
            r#"{"nocmd": 1}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        // A request without fields reads whatever else its line holds
        // (serde's internally tagged unit variants do not refuse them).
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd": "status", "extra": 1}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn every_line_round_trips() {
        let lines = [
            Line::Acked,
            Line::Progress(Progress::default()),
            Line::Answer(Answer::Err("no VM yet".into())),
            Line::Answer(Answer::Ok(Reply::Status(Box::new(Status {
                state: Some(VmmState::Vm(RunState::Running)),
                ..Status::default()
            })))),
            Line::Answer(Answer::Ok(Reply::Summary(Summary::default()))),
            Line::Answer(Answer::Ok(Reply::MemoryCrc(7))),
        ];
        for l in lines {
            let text = serde_json::to_string(&l).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<Line>(&text).unwrap(), l);
        }
        let c: Confirm = serde_json::from_str(r#"{"cmd": "go"}"#).unwrap();
        assert_eq!(c, Confirm::Go);
    }

    proptest::proptest! {
        /// Any text is a request or an error, never a panic.
        #[test]
        fn any_text_is_a_request_or_refused(s in ".{0,200}") {
            let _ = serde_json::from_str::<Request>(&s);
            let _ = serde_json::from_str::<Line>(&s);
        }
    }
}
