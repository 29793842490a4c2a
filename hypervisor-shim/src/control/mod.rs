//! The per-VM control socket: a Unix socket speaking JSON lines, typed on
//! both sides by [`proto`].
//!
//! | request | answer |
//! |---|---|
//! | `status` | state, memory, vCPUs, heartbeat, the guest's own counters |
//! | `pause`, `resume`, `stop` | done |
//! | `save` (`path`, `stop`) | summary |
//! | `migrate` (`to`, `token`, `downtime_ms`, `timeout_s`, `verify_memory`, `confirm`) | progress lines (and `acked`, then the caller's `go` or `abort`, with `confirm`), summary |
//! | `set-rate` (`mib_per_s`, `tick_us`) | done |
//! | `check` | the host-side scan of the test guest's pages |
//! | `memory-crc` | CRC32 of all guest memory (pauses for the read) |
//! | `stats` | memory size and pages in use, for placement |
//! | `registers` | each vCPU's RIP, RSP, CR0, CS and MP state (pauses for the read) |
//!
//! - [`proto`]: the messages; [`server`]: the VMM's side; [`client`]: the
//!   caller's.

pub mod client;
pub mod proto;
pub mod server;

pub use client::{Control, ControlError};
pub use server::{serve, Slot};

#[cfg(test)]
mod tests {
    use super::proto::{Reply, Request, VmmState};
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::Arc;

    #[test]
    fn a_vmm_without_its_vm_yet_answers_status_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let slot = Arc::new(Slot::default());
        serve(&path, slot.clone()).unwrap();
        let s = client::status(&path).unwrap();
        assert_eq!(s.state, Some(VmmState::Starting));
        slot.set_incoming("127.0.0.1:4444".parse().unwrap());
        let s = client::status(&path).unwrap();
        assert_eq!(s.state, Some(VmmState::Incoming));
        assert_eq!(s.listen.as_deref(), Some("127.0.0.1:4444"));
        match client::act(&path, &Request::Pause) {
            Err(ControlError::Refused(why)) => assert!(why.contains("no VM yet"), "{why}"),
            other => panic!("{other:?}"),
        }
        // The same connection answers one request after another.
        let mut c = Control::connect(&path, Some(std::time::Duration::from_secs(5))).unwrap();
        for _ in 0..3 {
            assert!(matches!(
                c.ask(&Request::Status, |_| {}),
                Ok(Reply::Status(_))
            ));
        }
    }

    #[test]
    fn a_line_that_is_no_request_gets_an_error_and_the_connection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        serve(&path, Arc::new(Slot::default())).unwrap();
        let mut conn = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        for bad in ["{\"pause\":", "[1,2]", "\"reboot\""] {
            writeln!(conn, "{bad}").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("not a request"), "{bad}: {line}");
        }
        writeln!(conn, "{}", serde_json::to_string(&Request::Status).unwrap()).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("starting"), "{line}");
        // A line over the limit closes the connection after its answer.
        let long = "x".repeat(proto::MAX_LINE + 1);
        writeln!(conn, "{long}").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("too long"), "{line}");
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
    }
}
