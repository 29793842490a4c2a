//! Running the external tools the fixtures drive (`tgtadm`, `ip`, ...), with
//! errors that say which command failed and what it printed.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::process::{Command, Output};

/// Runs `cmd` to completion; fails with the command line, exit status and
/// stderr when it does not exit 0. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`], but kills the command and fails when it has not exited within
/// `limit` (a daemon's control tool that hangs on a busy daemon).
pub fn run_within(cmd: &mut Command, limit: std::time::Duration) -> Result<String> {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` did not finish in {:.0} s (killed)",
                describe(cmd),
                limit.as_secs_f64()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        bail!("`{}` failed ({status}): {}", describe(cmd), err.trim());
    }
    Ok(out)
}

/// Runs `cmd` to completion and returns its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Shorthand: `run(Command::new(program).args(args))`.
pub fn run_args<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(program).args(args))
}

/// The command line of `cmd`, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Whether `program` is on `PATH` (or is an existing path).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Path of a binary of this workspace (`csvctl`, `csvd`, ...), built into
/// the same target directory as the running test (tools/test.sh builds the
/// workspace's binaries before the tests). `CSV_BIN_DIR` overrides.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CSV_BIN_DIR") {
        return std::path::Path::new(&dir).join(name);
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>;
    // target/<profile>/<binary> (the benchmark driver) -> its own directory.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut profile_dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let p = profile_dir.join(name);
    if !p.exists() {
        // A test run without the binaries built first: build them now.
        let _ = std::process::Command::new(env!("CARGO"))
            .args(["build", "--bins", "--quiet"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status();
    }
    p
}
