//! The `SKIP <test>: <reason>` convention.
//!
//! A test that needs root, a device or a tool this machine lacks calls
//! [`skip_unless!`](crate::skip_unless) first. When something is missing it
//! prints `SKIP <test>: <reason>` on stderr, appends the same line to the
//! file named by `CSV_SKIP_LOG` (set by `tools/test.sh`, which prints the
//! list after the run, so skips are visible even when the runner captures
//! output) and returns from the test.

use std::io::Write;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Effective uid 0 (tgtd, network namespaces, mounts).
    Root,
    /// A program on `PATH`.
    Command(&'static str),
    /// A device node that can be opened read-write (`/dev/kvm`, `/dev/fuse`).
    Device(&'static str),
}

impl Need {
    /// Why this need is not met on this machine, or `None` when it is.
    pub fn missing(&self) -> Option<String> {
        match *self {
            Need::Root => (!nix::unistd::geteuid().is_root()).then(|| "needs root".to_string()),
            Need::Command(c) => (!crate::cmd::have(c)).then(|| format!("`{c}` is not installed")),
            Need::Device(d) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(d)
                .err()
                .map(|e| format!("cannot open {d}: {e}")),
        }
    }
}

/// The first unmet need of `needs`, as a reason.
pub fn missing(needs: &[Need]) -> Option<String> {
    needs.iter().find_map(Need::missing)
}

/// Reports that the current test is skipped, and why.
pub fn report(reason: &str) {
    let line = skip_line(reason);
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("CSV_SKIP_LOG") {
        append(std::path::Path::new(&path), &line);
    }
}

/// `SKIP <test>: <reason>`; the test's name is its thread's (libtest and
/// nextest name the thread after the test).
fn skip_line(reason: &str) -> String {
    let current = std::thread::current();
    let name = current.name().unwrap_or("<unnamed test>");
    format!("SKIP {name}: {reason}")
}

fn append(path: &std::path::Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // Best effort: the line is on stderr already.
        let _ = writeln!(f, "{line}");
    }
}

/// Returns from the enclosing test with a `SKIP` line unless every need
/// holds: `skip_unless!(Need::Root, Need::Command("tgtd"));`
#[macro_export]
macro_rules! skip_unless {
    ($($need:expr),+ $(,)?) => {
        if let Some(reason) = $crate::skip::missing(&[$($need),+]) {
            $crate::skip::report(&reason);
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_command_is_reported() {
        let r = missing(&[Need::Command("csv-no-such-program")]).unwrap();
        assert!(r.contains("csv-no-such-program"), "{r}");
    }

    #[test]
    fn present_command_is_not() {
        assert!(missing(&[Need::Command("sh")]).is_none());
    }

    #[test]
    fn skip_line_names_the_test_and_reaches_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        append(&log, &skip_line("because"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.starts_with(
                "SKIP skip::tests::skip_line_names_the_test_and_reaches_the_log: because"
            ),
            "{text}"
        );
    }
}
