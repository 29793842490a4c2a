//! Each scenario's fault: injected, watched, measured. Every fault a
//! host takes heals by itself after the drill's duration.

use super::ctx::{fence_count, Ctx};
use super::load::{libc_enospc, CHUNK};
use super::{measure, ms, DrillArgs, Measure, Scenario};
use anyhow::{Context, Result};
use coordinator::client::Client;
use coordinator::proto::{FaultKind, FaultReq};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// What a drill found.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) measures: Vec<Measure>,
    pub(super) notes: Vec<String>,
    /// The fault may make the load fail (this host cut off).
    pub(super) load_may_fail: bool,
}

/// One fault being injected.
pub(super) struct Fault<'a> {
    pub(super) ctx: &'a Ctx,
    pub(super) target: Option<u64>,
    /// When the fault began.
    pub(super) t0: Instant,
    pub(super) args: &'a DrillArgs,
    pub(super) client: &'a mut Client,
}

fn ms_u(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Fault<'_> {
    fn target(&self) -> Result<u64> {
        self.target
            .context("no host to fault (a cluster of one host?)")
    }

    fn req(kind: FaultKind) -> FaultReq {
        FaultReq {
            kind: kind as i32,
            ..Default::default()
        }
    }

    /// Waits until host `t` is Direct again: how long it took.
    fn back_to_direct(&self, t: u64, within: Duration) -> Option<Duration> {
        self.ctx
            .wait(within, || self.ctx.mode(t).as_deref() == Some("Direct"))
    }
}

/// Injects scenario `s`'s fault and measures what it does.
pub(super) fn inject(s: Scenario, f: &mut Fault, out: &mut Outcome) -> Result<()> {
    match s {
        Scenario::SanLoss => san_loss(f, out),
        Scenario::SlowSan => slow_san(f),
        Scenario::NetLossOne => net_loss(f, out, false),
        Scenario::NetLossAll => net_loss(f, out, true),
        Scenario::CoordinatorKill => crash(f, out, Duration::from_secs(3)),
        Scenario::HostKill => {
            let dur = f.ctx.dur;
            crash(f, out, dur)
        }
        Scenario::TargetRestart => target_restart(f, out),
        Scenario::DiskFull => disk_full(f, out),
        Scenario::ClockJump => clock_jump(f),
        Scenario::All => unreachable!("expanded before"),
    }
}

fn san_loss(f: &mut Fault, out: &mut Outcome) -> Result<()> {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    let t = f.target()?;
    ctx.fault(
        t,
        FaultReq {
            volume: ctx.vol,
            duration_ms: ms_u(dur),
            ..Fault::req(FaultKind::SanCut)
        },
    )?;
    let red = ctx.wait(Duration::from_secs(5), || {
        ctx.mode(t).as_deref() == Some("BlockRedirected")
    });
    out.measures.push(measure(
        "time to BlockRedirected",
        red.map_or("never".into(), ms),
        "<= 1000 ms",
        red.is_some_and(|d| d <= Duration::from_secs(1)),
    ));
    std::thread::sleep(dur.saturating_sub(f.t0.elapsed()));
    let back = f.back_to_direct(t, Duration::from_secs(30));
    out.measures.push(measure(
        "back to Direct after the path returns",
        back.map_or("never".into(), ms),
        "<= 5000 ms",
        back.is_some_and(|d| d <= Duration::from_secs(5)),
    ));
    Ok(())
}

fn slow_san(f: &mut Fault) -> Result<()> {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    ctx.fault(
        f.target()?,
        FaultReq {
            volume: ctx.vol,
            delay_ms: 200,
            duration_ms: ms_u(dur),
            ..Fault::req(FaultKind::SanSlow)
        },
    )?;
    std::thread::sleep(dur);
    Ok(())
}

/// Metadata through the cluster network while it is cut: a file created
/// and removed every 200 ms on this host's mount; with `all`, also when
/// the registry had host `t` down. (operations ok, failed, the slowest,
/// marked down after).
fn probe_metadata(
    f: &mut Fault,
    out: &mut Outcome,
    t: u64,
    all: bool,
) -> (u32, u32, Duration, Option<Duration>) {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
    let mut marked_down = None;
    while f.t0.elapsed() < dur {
        if all && marked_down.is_none() {
            let down = f
                .client
                .cluster_info()
                .is_ok_and(|i| i.health.iter().any(|h| h.node == t && !h.up));
            if down {
                marked_down = Some(f.t0.elapsed());
            }
        }
        let p = ctx.dir.join("meta-probe");
        let t1 = Instant::now();
        match File::create(&p).and_then(|_| std::fs::remove_file(&p)) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    out.notes
                        .push(format!("metadata on host {}: {e}", ctx.host));
                }
            }
        }
        slowest = slowest.max(t1.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    (ok, failed, slowest, marked_down)
}

fn net_loss(f: &mut Fault, out: &mut Outcome, all: bool) -> Result<()> {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    let t = f.target()?;
    let addrs: Vec<String> = ctx
        .info
        .nodes
        .iter()
        .flat_map(|n| {
            if all {
                n.addrs.clone()
            } else {
                n.addrs.first().cloned().into_iter().collect()
            }
        })
        .collect();
    let fenced_before = fence_count(ctx, t);
    ctx.fault(
        t,
        FaultReq {
            addrs,
            duration_ms: ms_u(dur),
            ..Fault::req(FaultKind::NetCut)
        },
    )?;
    let (ok, failed, slowest, marked_down) = probe_metadata(f, out, t, all);
    let local_cut = t == ctx.host && all;
    out.load_may_fail = local_cut;
    out.measures.push(measure(
        "metadata operations failed",
        format!("{failed} of {}", ok + failed),
        "0",
        failed == 0 || local_cut,
    ));
    out.measures.push(measure(
        "slowest metadata operation",
        ms(slowest),
        "<= 5000 ms",
        slowest <= Duration::from_secs(5) || local_cut,
    ));
    if !all {
        return Ok(());
    }
    out.measures.push(measure(
        "cut-off host marked down after",
        marked_down.map_or("never".into(), ms),
        "<= 3000 ms",
        marked_down.is_some_and(|d| d <= Duration::from_secs(3)),
    ));
    let back = f.back_to_direct(t, Duration::from_secs(60));
    out.measures.push(measure(
        "cut-off host back to Direct after",
        back.map_or("never".into(), ms),
        "<= 30000 ms",
        back.is_some(),
    ));
    // Its key was preempted while it was cut off: it finds out (and
    // registers again) once it is back.
    let iscsi = ctx
        .info
        .volumes
        .iter()
        .any(|v| v.number == ctx.vol && v.lun.starts_with("iscsi://"));
    let fenced = iscsi
        && ctx
            .wait(Duration::from_secs(10), || {
                fence_count(ctx, t) > fenced_before
            })
            .is_some();
    out.measures.push(measure(
        "cut-off host fenced off the LUN",
        match (iscsi, fenced) {
            (false, _) => "n/a (LUN file)".into(),
            (true, true) => "yes".into(),
            (true, false) => "no".into(),
        },
        "yes",
        fenced || !iscsi,
    ));
    Ok(())
}

/// Host `target` crashes and stays down for `down`.
fn crash(f: &mut Fault, out: &mut Outcome, down: Duration) -> Result<()> {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    let t = f.target()?;
    let was_coordinator = ctx.coordinator() == Some(t);
    let k0 = Instant::now();
    ctx.fault(
        t,
        FaultReq {
            duration_ms: ms_u(down),
            ..Fault::req(FaultKind::Crash)
        },
    )?;
    if was_coordinator {
        std::thread::sleep(Duration::from_millis(150));
        let failover = ctx.wait(Duration::from_secs(30), || {
            ctx.coordinator().is_some_and(|h| h != t)
        });
        out.measures.push(measure(
            "failover: a new coordinator after",
            failover
                .map(|d| d + Duration::from_millis(150))
                .map_or("never".into(), ms),
            "<= 5000 ms",
            failover.is_some_and(|d| d <= Duration::from_millis(4850)),
        ));
    }
    std::thread::sleep(down.max(dur).saturating_sub(k0.elapsed()));
    let back = f.back_to_direct(t, Duration::from_secs(60));
    out.measures.push(measure(
        "crashed host back to Direct after",
        back.map_or("never".into(), |d| {
            ms(d + down.max(dur).saturating_sub(down))
        }),
        "<= 30000 ms",
        back.is_some(),
    ));
    Ok(())
}

fn target_restart(f: &mut Fault, out: &mut Outcome) -> Result<()> {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    let cmd = f.args.target_cmd.as_deref().context(
        "target-restart needs --target-cmd (the command that restarts the iSCSI target)",
    )?;
    let st = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    out.measures.push(measure(
        "target restart command",
        format!(
            "{} in {}",
            if st.success() { "ok" } else { "failed" },
            ms(f.t0.elapsed())
        ),
        "ok",
        st.success(),
    ));
    let all = ctx.wait(Duration::from_secs(60), || {
        ctx.hosts()
            .iter()
            .all(|h| ctx.mode(*h).as_deref() == Some("Direct"))
    });
    out.measures.push(measure(
        "every host Direct again after",
        all.map_or("never".into(), ms),
        "<= 30000 ms",
        all.is_some(),
    ));
    std::thread::sleep(dur.saturating_sub(f.t0.elapsed()));
    Ok(())
}

fn disk_full(f: &mut Fault, out: &mut Outcome) -> Result<()> {
    let (ctx, dur, t0) = (f.ctx, f.ctx.dur, f.t0);
    let fill = ctx.dir.join("filler");
    let file = File::create(&fill)?;
    let block = vec![0xA5u8; 4 << 20];
    let mut at = 0u64;
    let full = loop {
        match file
            .write_all_at(&block, at)
            .and_then(|()| file.sync_data())
        {
            Ok(()) => at += block.len() as u64,
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => break true,
            Err(e) => {
                out.notes.push(format!("filling: {e}"));
                break false;
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            break false;
        }
    };
    out.measures.push(measure(
        "volume full (ENOSPC) after",
        format!("{} in {}", vhd::size::human(at), ms(t0.elapsed())),
        "ENOSPC",
        full,
    ));
    std::thread::sleep(dur);
    drop(file);
    std::fs::remove_file(&fill)?;
    let freed = Instant::now();
    // Writing resumes: every writer acknowledges new chunks.
    let probe = ctx.dir.join("after-full");
    let resumed = ctx.wait(Duration::from_secs(30), || {
        File::create(&probe)
            .and_then(|p| {
                p.write_all_at(&block[..CHUNK], 0)
                    .and_then(|()| p.sync_data())
            })
            .is_ok()
    });
    out.measures.push(measure(
        "writing again after space is freed",
        resumed.map_or("never".into(), |_| ms(freed.elapsed())),
        "<= 5000 ms",
        resumed.is_some_and(|d| d <= Duration::from_secs(5)),
    ));
    Ok(())
}

fn clock_jump(f: &mut Fault) -> Result<()> {
    let (ctx, dur) = (f.ctx, f.ctx.dur);
    ctx.fault(
        f.target()?,
        FaultReq {
            offset_ms: 3_600_000,
            duration_ms: ms_u(dur),
            ..Fault::req(FaultKind::Clock)
        },
    )?;
    std::thread::sleep(dur);
    Ok(())
}
