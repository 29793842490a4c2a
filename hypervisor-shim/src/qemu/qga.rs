//! The QEMU guest agent (`qemu-ga` in the guest, reached through a
//! virtio-serial port QEMU exposes as a unix socket on the host): the same
//! JSON framing as QMP without a greeting ([`super::qmp::parse`] reads its
//! lines). Used to freeze and thaw the guest's filesystems around a
//! snapshot (`guest-fsfreeze-freeze`/`-thaw`).
//!
//! The socket accepts a connection whether or not an agent runs in the
//! guest, so every exchange starts with `guest-sync` and a random id: an
//! agent that answers with the id is there (and any stale reply of an
//! earlier, timed-out exchange is skipped); silence within the deadline
//! means no agent.

use super::qmp::{self, Message, QmpError};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connection to a guest agent that answered `guest-sync`.
#[derive(Debug)]
pub struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: std::path::PathBuf,
}

impl Agent {
    /// Connects and checks an agent answers within `wait`.
    pub fn connect(path: &Path, wait: Duration) -> Result<Agent, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        let writer = s.try_clone().map_err(io)?;
        let mut a = Agent {
            reader: BufReader::new(s),
            writer,
            path: path.to_path_buf(),
        };
        let id = u64::from(std::process::id()) << 32
            | u64::from(Instant::now().elapsed().subsec_nanos())
            | 1;
        let v = a.call(
            "guest-sync",
            Some(serde_json::json!({ "id": id })),
            wait,
            Some(id),
        )?;
        if v.as_u64() != Some(id) {
            return Err(QmpError::Unexpected(format!("guest-sync answered {v}")));
        }
        Ok(a)
    }

    /// Sends `command` and waits up to `wait` for its result. With
    /// `sync_id`, replies other than that id are skipped.
    fn call(
        &mut self,
        command: &'static str,
        args: Option<serde_json::Value>,
        wait: Duration,
        sync_id: Option<u64>,
    ) -> Result<serde_json::Value, QmpError> {
        let mut req = serde_json::json!({ "execute": command });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut text = req.to_string().into_bytes();
        text.push(b'\n');
        let io = |source| QmpError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(&text).map_err(io)?;
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(wait, command));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            let mut line = Vec::new();
            match (&mut self.reader)
                .take(qmp::MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout(wait, command))
                }
                Err(source) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
            // A delimiter byte (0xff) may precede a reply.
            let line: Vec<u8> = line.into_iter().filter(|&b| b != 0xff).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match qmp::parse(&line)? {
                Message::Return { value } => {
                    if sync_id.is_some_and(|id| value.as_u64() != Some(id)) {
                        continue;
                    }
                    return Ok(value);
                }
                Message::Error { error } => {
                    return Err(QmpError::Refused {
                        command,
                        class: error.class,
                        desc: error.desc,
                    })
                }
                Message::Event { .. } | Message::Greeting { .. } => continue,
            }
        }
    }

    /// Freezes the guest's filesystems; how many it froze.
    pub fn freeze(&mut self, wait: Duration) -> Result<u32, QmpError> {
        let v = self.call("guest-fsfreeze-freeze", None, wait, None)?;
        Ok(v.as_u64().unwrap_or(0) as u32)
    }

    /// Thaws them; how many it thawed.
    pub fn thaw(&mut self, wait: Duration) -> Result<u32, QmpError> {
        let v = self.call("guest-fsfreeze-thaw", None, wait, None)?;
        Ok(v.as_u64().unwrap_or(0) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_socket_is_no_agent_and_a_stale_reply_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qga.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: never answers.
            let (_silent, _) = l.accept().unwrap();
            // Second: a stale reply, then the right one, then a freeze.
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let id = serde_json::from_str::<serde_json::Value>(&line).unwrap()["arguments"]["id"]
                .clone();
            w.write_all(b"\xff{\"return\": 7}\n").unwrap();
            writeln!(w, "{{\"return\": {id}}}").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("guest-fsfreeze-freeze"));
            writeln!(w, "{{\"return\": 2}}").unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = Agent::connect(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, QmpError::Timeout(..)), "{e}");
        let mut a = Agent::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(a.freeze(Duration::from_secs(5)).unwrap(), 2);
        server.join().unwrap();
    }
}
