//! The drill's VM.

use super::ctx::Ctx;
use crate::cluster_cmd::Access;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// The drill's VM: a VM role of the test guest on a small VHD in the
/// drill's directory, driven through csvctl's own `vm` commands.
#[derive(Clone)]
pub(super) struct DrillVm {
    name: String,
    access: Access,
}

impl DrillVm {
    fn csvctl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .access
            .csvctl()?
            .args(args)
            .output()
            .context("running csvctl")?;
        if !out.status.success() {
            bail!(
                "csvctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds and starts it on `host`; waits until its guest runs.
    pub(super) fn start(access: &Access, ctx: &Ctx, host: u64) -> Result<DrillVm> {
        let name = format!("csv-drill-{}", std::process::id());
        let file = ctx.dir.join("vm.vhd");
        vhd::Vhd::create(
            &file,
            &vhd::CreateOptions::new(vhd::footer::DiskType::Dynamic, 16 << 20),
        )
        .with_context(|| format!("create {}", file.display()))?;
        let disk = format!(
            "/ClusterStorage/Volume{}/{}/vm.vhd",
            ctx.vol,
            ctx.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let vm = DrillVm {
            name,
            access: access.clone(),
        };
        vm.csvctl(&[
            "vm",
            "add",
            &vm.name,
            "--memory",
            "32M",
            "--disk",
            &disk,
            "--volume",
            &ctx.vol.to_string(),
            "--owner",
            "csv-drill",
        ])?;
        vm.csvctl(&["vm", "start", &vm.name, "--on", &host.to_string()])?;
        if ctx
            .wait(Duration::from_secs(30), || vm.host() == Some(host))
            .is_none()
        {
            let _ = vm.remove();
            bail!("the drill's VM did not start on host {host}");
        }
        Ok(vm)
    }

    /// Where its guest runs (and has sent heartbeats).
    pub(super) fn host(&self) -> Option<u64> {
        let s: serde_json::Value =
            serde_json::from_str(&self.csvctl(&["vm", "status", &self.name, "--json"]).ok()?)
                .ok()?;
        s["runtime"]
            .as_array()?
            .iter()
            .find(|x| x["state"] == "running" && x["heartbeats"].as_u64().unwrap_or(0) > 10)
            .and_then(|x| x["host"].as_u64())
    }

    /// Live-migrates it to `to`: the downtime its hosts measured.
    pub(super) fn migrate(&self, to: u64) -> Result<f64> {
        let out = self.csvctl(&["vm", "migrate", &self.name, "--to", &to.to_string()])?;
        out.split("downtime ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no downtime in {out:?}"))
    }

    pub(super) fn remove(&self) -> Result<()> {
        let _ = self.csvctl(&["vm", "stop", &self.name]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            let s = self.csvctl(&["vm", "status", &self.name, "--json"])?;
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            if v["runtime"].as_array().is_none_or(|r| r.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.csvctl(&["vm", "remove", &self.name]).map(|_| ())
    }
}
