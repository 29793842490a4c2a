//! A QEMU VM's serial console as csvd keeps it. QEMU connects the guest's
//! first serial port to a unix socket this process listens on (`-chardev
//! socket,server=off`): everything the guest prints is appended to
//! `NAME.serial`, which `csvctl vm console` reads from any host, and what
//! an operator types (`csvctl vm console --interactive`) is written back
//! into the socket. A file alone (`-serial file:`) would take no input, and
//! a socket QEMU serves itself drops the output while nobody is connected.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the console waits for QEMU to connect.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);

/// Where console input goes: the connection from QEMU, once it is there.
pub type ConsoleInput = Arc<Mutex<Option<UnixStream>>>;

/// Listens on `socket` for QEMU's serial port and keeps its output in
/// `log` (made anew) on a thread of its own, which ends when QEMU goes
/// away (or never connects). Returns where input goes.
pub fn keep(socket: &Path, log: &Path) -> io::Result<ConsoleInput> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    let mut out = File::create(log)?;
    let input: ConsoleInput = Arc::new(Mutex::new(None));
    let to = input.clone();
    let name = socket.display().to_string();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let deadline = Instant::now() + CONNECT_WITHIN;
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        tracing::warn!(console = %name, error = %e, "QEMU never connected its serial console");
                        return;
                    }
                }
            };
            drop(listener);
            let _ = stream.set_nonblocking(false);
            if let Ok(w) = stream.try_clone() {
                let _ = w.set_write_timeout(Some(Duration::from_secs(2)));
                *to.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
            }
            let mut r = stream;
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Err(e) = out.write_all(&buf[..n]) {
                            tracing::warn!(console = %name, error = %e, "cannot keep the console's output");
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            *to.lock().unwrap_or_else(|p| p.into_inner()) = None;
        })?;
    Ok(input)
}

/// Types `bytes` on the console.
pub fn type_into(input: &ConsoleInput, bytes: &[u8]) -> io::Result<()> {
    let mut g = input.lock().unwrap_or_else(|p| p.into_inner());
    match g.as_mut() {
        Some(s) => s.write_all(bytes),
        None => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the VM's serial console is not connected",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_kept_and_input_reaches_the_port() {
        let d = tempfile::tempdir().unwrap();
        let (sock, log) = (d.path().join("c.console"), d.path().join("c.serial"));
        let input = keep(&sock, &log).unwrap();
        assert!(type_into(&input, b"x").is_err(), "nothing connected yet");
        // QEMU's side.
        let mut port = UnixStream::connect(&sock).unwrap();
        port.write_all(b"login: ").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while input.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        type_into(&input, b"root\n").unwrap();
        let mut got = [0u8; 5];
        port.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"root\n");
        drop(port);
        while std::fs::read(&log).unwrap() != b"login: " && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(std::fs::read(&log).unwrap(), b"login: ");
        // QEMU gone: input has nowhere to go.
        while input.lock().unwrap().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(type_into(&input, b"x").is_err());
    }
}
