//! The `csv-vmm` engine: one `csv-vmm` process per VM, driven over its
//! control socket ([`crate::control`]).
//!
//! The process gets the role's memory and vCPUs, the disk's path under
//! this host's mount root, a control socket and a serial log in the run
//! directory, and dies with the process that started it (a host whose
//! csvd is gone is failed over, and its VMs must not go on writing their
//! disks). An incoming VM's migration token reaches it in its
//! environment, never on its command line (which every local user can
//! read).

use super::engine::{
    die_with_parent, log_tail, Engine, EngineError, Instance, Start, VmHandle, VmSpec,
};
use crate::control::client::{self, Control};
use crate::control::proto::{MigrateRequest, Reply, Request, Status};
use crate::control::ControlError;
use crate::migrate::{Progress, Summary};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

/// The `csv-vmm` program.
#[derive(Debug, Clone)]
pub struct CsvVmm {
    /// Where it is.
    pub program: PathBuf,
}

/// Where `csv-vmm` is when the settings do not say: next to the running
/// program (csvd), else on PATH.
pub fn default_program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("csv-vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("csv-vmm"))
}

#[derive(Debug)]
struct Process {
    child: Child,
    log: PathBuf,
    handle: Arc<Socket>,
}

/// A VMM's control socket.
#[derive(Debug)]
struct Socket(PathBuf);

impl Engine for CsvVmm {
    fn name(&self) -> &'static str {
        "csv-vmm"
    }

    fn start(&self, vm: &VmSpec) -> Result<Box<dyn Instance>, EngineError> {
        let files = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| EngineError::Files { what, path, source }
        };
        std::fs::create_dir_all(&vm.run_dir).map_err(files("making", &vm.run_dir))?;
        let control = vm.run_dir.join(format!("{}.sock", vm.name));
        let log = vm.run_dir.join(format!("{}.log", vm.name));
        let serial = vm.run_dir.join(format!("{}.serial", vm.name));
        let _ = std::fs::remove_file(&control);
        let mut cmd = Command::new(&self.program);
        match &vm.start {
            Start::Incoming { listen, token } => {
                cmd.env("CSV_MIGRATION_TOKEN", token);
                cmd.args(["incoming", "--listen", &listen.to_string()]);
            }
            Start::Restore(state) => {
                cmd.arg("restore").arg("--from").arg(state);
            }
            Start::Boot => {
                cmd.args([
                    "run",
                    "--memory",
                    &vm.config.memory.to_string(),
                    "--vcpus",
                    &vm.config.vcpus.to_string(),
                    "--dirty-rate",
                    &vm.config.dirty_rate.to_string(),
                ]);
            }
        }
        die_with_parent(&mut cmd);
        let stderr = std::fs::File::create(&log).map_err(files("creating", &log))?;
        let child = cmd
            .arg("--disk")
            .arg(&vm.disk)
            .arg("--control")
            .arg(&control)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| EngineError::Start {
                program: self.program.clone(),
                vm: vm.name.clone(),
                source,
            })?;
        tracing::info!(vm = %vm.name, pid = child.id(), disk = %vm.disk.display(), start = ?vm.start, "VMM started");
        Ok(Box::new(Process {
            child,
            log,
            handle: Arc::new(Socket(control)),
        }))
    }
}

impl Instance for Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    fn handle(&self) -> Arc<dyn VmHandle> {
        self.handle.clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A supervisor that goes away takes its VMs with it.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn summary(r: Reply) -> Result<Summary, EngineError> {
    match r {
        Reply::Summary(s) => Ok(s),
        other => Err(ControlError::Unexpected(Box::new(other)).into()),
    }
}

impl VmHandle for Socket {
    fn status(&self) -> Result<Status, EngineError> {
        Ok(client::status(&self.0)?)
    }

    fn pause(&self) -> Result<(), EngineError> {
        Ok(client::act(&self.0, &Request::Pause)?)
    }

    fn resume(&self) -> Result<(), EngineError> {
        Ok(client::act(&self.0, &Request::Resume)?)
    }

    fn stop(&self) -> Result<(), EngineError> {
        Ok(client::act(&self.0, &Request::Stop)?)
    }

    fn save(&self, path: &Path) -> Result<Summary, EngineError> {
        let req = Request::Save {
            path: path.to_path_buf(),
            stop: true,
        };
        summary(client::ask(&self.0, &req)?)
    }

    fn migrate(
        &self,
        to: &str,
        token: &str,
        progress: &mut dyn FnMut(&Progress),
        switch_over: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Summary, EngineError> {
        let m = MigrateRequest {
            to: to.to_string(),
            token: token.to_string(),
            downtime_ms: None,
            timeout_s: None,
            verify_memory: false,
            confirm: true,
        };
        Ok(Control::connect(&self.0, None)?.migrate(m, progress, switch_over)?)
    }
}
