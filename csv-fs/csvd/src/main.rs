//! `csvd`: turns its command line into [`csvd::settings::Settings`] and
//! runs the host (see the crate's documentation).

use clap::Parser;
use csvd::settings::{Cli, Settings};
use std::process::ExitCode;

/// What csvd keeps of root's capabilities: file access on its state and
/// mounts (chown, dac_override, dac_read_search, fowner, fsetid),
/// stopping its VMs (kill), a console on a low port (net_bind_service),
/// FUSE mounts (sys_admin), and priorities, memory locks and limits for
/// its VMMs (sys_nice, ipc_lock, sys_resource). Everything else (modules,
/// raw I/O, ptrace, setuid, network administration, ...) is gone for
/// good, for it and for every VMM it starts.
const CAPS: [caps::Capability; 11] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_NET_BIND_SERVICE,
    caps::Capability::CAP_IPC_LOCK,
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_SYS_NICE,
    caps::Capability::CAP_SYS_RESOURCE,
];

/// Prints an error and each of its causes, one per line.
fn print_error_chain(e: &dyn std::error::Error) {
    eprintln!("csvd: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
}

fn main() -> ExitCode {
    // Before any thread starts (capabilities are per thread).
    let privileges = hypervisor_shim::privileges::drop_all_but(&CAPS);
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match privileges {
        Ok(what) => tracing::info!("privileges: {what}"),
        Err(e) => tracing::warn!(
            "could not drop privileges: {}",
            coordinator::service::error_chain(&e)
        ),
    }
    csvd::crash::stay_down_after_crash();
    let settings = match Settings::from_cli(cli) {
        Ok(s) => s,
        Err(e) => {
            print_error_chain(&e);
            return ExitCode::from(2);
        }
    };
    match csvd::daemon::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error_chain(&e);
            ExitCode::from(1)
        }
    }
}
