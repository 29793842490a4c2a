//! A failure drill's crash of this host (`csvctl drill host-kill`,
//! `coordinator-kill`): its VMs are killed and csvd starts over at once,
//! as the same process (so whoever supervises it keeps its handle), with
//! nothing of its memory: its connections and FUSE sessions close as on a
//! SIGKILL, and the new csvd stays down for the time asked before it
//! starts.

use hypervisor_shim::supervisor::SupervisorView;
use std::time::Duration;

/// Set (to milliseconds) in the environment of a csvd started again by a
/// drill's crash: how long the host stays down first.
const DRILL_DOWN: &str = "CSV_DRILL_DOWN_MS";

/// Crashes this host now: kills its VMs and executes csvd again.
pub fn crash(vms: Option<&SupervisorView>, down: Duration) {
    use std::os::unix::process::CommandExt;
    for vm in vms.map(|v| v.reports()).unwrap_or_default() {
        if vm.pid > 1 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(vm.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let err = std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env(DRILL_DOWN, down.as_millis().to_string())
        .exec();
    eprintln!("csvd: starting again after a drill's crash: {err}");
    std::process::abort();
}

/// After a drill's crash: stays down for the time it asked (SIGTERM and
/// SIGINT end the process meanwhile).
pub fn stay_down_after_crash() {
    let Some(ms) = std::env::var(DRILL_DOWN)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    let _ = sigs.thread_unblock();
    tracing::warn!("a failure drill crashed this host: down for {ms} ms");
    std::thread::sleep(Duration::from_millis(ms.min(600_000)));
}
