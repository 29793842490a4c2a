//! The per-VM control socket: a Unix socket speaking JSON lines.
//!
//! Each request is one JSON object with a `cmd`; each answer is one JSON
//! object with `ok` (and `error` when not ok). `migrate` first streams
//! `{"event": "progress", ...}` lines, one per round.
//!
//! | cmd | fields | answer |
//! |---|---|---|
//! | `status` | | state, memory, vCPUs, heartbeat, the guest's own counters |
//! | `pause`, `resume`, `stop` | | |
//! | `save` | `path`, `stop` (default true) | summary |
//! | `migrate` | `to`, `token` (the target's), `downtime_ms`, `timeout_s`, `verify_memory`, `confirm` | progress lines (and `acked`, then a `go` from the caller, with `confirm`), summary |
//! | `set-rate` | `mib_per_s`, `tick_us` (default 1000) | |
//! | `check` | | the host-side scan of the test guest's pages |
//! | `memory-crc` | | CRC32 of all guest memory (pauses for the read) |
//! | `stats` | | memory size and pages in use, for placement |
//! | `registers` | | each vCPU's RIP, RSP, CR0, CS and MP state (pauses for the read) |

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::guest;
use crate::migrate::{self, MigrateOptions};
use crate::vm::{RunState, Vm};

/// The VM a control socket acts on (none yet while a migration is incoming).
#[derive(Debug, Default)]
pub struct Slot {
    vm: Mutex<Option<Arc<Vm>>>,
    active: AtomicUsize,
    incoming: Mutex<Option<std::net::SocketAddr>>,
}

impl Slot {
    pub fn set(&self, vm: Arc<Vm>) {
        *self.vm.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm);
    }

    /// Where this VMM waits for an incoming migration (reported by
    /// `status` until the VM arrives).
    pub fn set_incoming(&self, addr: std::net::SocketAddr) {
        *self.incoming.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
    }

    fn incoming(&self) -> Option<std::net::SocketAddr> {
        *self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self) -> Option<Arc<Vm>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (up to `max`) for requests in progress to send their answers.
    pub fn drain(&self, max: Duration) {
        let t = std::time::Instant::now();
        while self.active.load(Ordering::SeqCst) > 0 && t.elapsed() < max {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Serves the control socket at `path` on a background thread.
pub fn serve(path: &Path, slot: Arc<Slot>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let slot = slot.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || connection(conn, &slot));
            }
        })?;
    Ok(())
}

fn connection(conn: UnixStream, slot: &Slot) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > 64 * 1024 {
            let _ = writeln!(w, "{}", json!({"ok": false, "error": "request too long"}));
            return;
        }
        slot.active.fetch_add(1, Ordering::SeqCst);
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, slot, &mut w, &mut r),
            Err(e) => json!({"ok": false, "error": format!("not a JSON request: {e}")}),
        };
        let ok = writeln!(w, "{answer}").is_ok();
        slot.active.fetch_sub(1, Ordering::SeqCst);
        if !ok {
            return;
        }
    }
}

fn err(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

fn handle(req: &Value, slot: &Slot, w: &mut UnixStream, r: &mut BufReader<UnixStream>) -> Value {
    let Some(cmd) = req.get("cmd").and_then(Value::as_str) else {
        return err("the request has no \"cmd\"");
    };
    let Some(vm) = slot.get() else {
        return if cmd == "status" {
            match slot.incoming() {
                Some(a) => json!({"ok": true, "state": "incoming", "listen": a.to_string()}),
                None => json!({"ok": true, "state": "starting"}),
            }
        } else {
            err("no VM yet (waiting for an incoming migration)")
        };
    };
    match cmd {
        "status" => status(&vm),
        "pause" => {
            vm.pause();
            json!({"ok": true})
        }
        "resume" => {
            if vm.state() != RunState::Paused {
                return err(format!("the VM is {:?}, not paused", vm.state()));
            }
            vm.resume();
            json!({"ok": true})
        }
        "stop" => {
            vm.stop();
            json!({"ok": true})
        }
        "set-rate" => {
            let Some(rate) = req.get("mib_per_s").and_then(Value::as_f64) else {
                return err("set-rate needs \"mib_per_s\"");
            };
            let tick = req.get("tick_us").and_then(Value::as_u64).unwrap_or(1000);
            match vm.set_guest_rate(guest::TestGuestConfig::for_rate(rate, tick)) {
                Ok(()) => json!({"ok": true}),
                Err(e) => err(e),
            }
        }
        "check" | "memory-crc" => {
            let was_running = vm.state() == RunState::Running;
            vm.pause();
            let v = if cmd == "check" {
                json!({"ok": true, "check": vm.check_test_guest()})
            } else {
                json!({"ok": true, "memory_crc": vm.memory_crc()})
            };
            if was_running {
                vm.resume();
            }
            v
        }
        "registers" => {
            let was_running = vm.state() == RunState::Running;
            vm.pause();
            let v = match vm.vcpu_states() {
                Ok(cpus) => {
                    let regs: Vec<Value> = cpus
                        .iter()
                        .map(|c| {
                            json!({"id": c.id, "rip": format!("{:#x}", c.regs.rip),
                                "rsp": format!("{:#x}", c.regs.rsp),
                                "cr0": format!("{:#x}", c.sregs.cr0),
                                "cs": c.sregs.cs.selector, "mp_state": c.mp_state.mp_state})
                        })
                        .collect();
                    json!({"ok": true, "vcpus": regs})
                }
                Err(e) => err(e),
            };
            if was_running {
                vm.resume();
            }
            v
        }
        "stats" => json!({
            "ok": true,
            "mem_bytes": vm.mem_bytes(),
            "used_bytes": vm.touched_pages() * 4096,
        }),
        "save" => {
            let Some(path) = req.get("path").and_then(Value::as_str) else {
                return err("save needs \"path\"");
            };
            let stop = req.get("stop").and_then(Value::as_bool).unwrap_or(true);
            match migrate::save(&vm, Path::new(path)) {
                Ok(summary) => {
                    if stop {
                        vm.finish(RunState::Saved);
                    } else {
                        vm.resume();
                    }
                    json!({"ok": true, "summary": summary})
                }
                Err(e) => err(e),
            }
        }
        "migrate" => {
            let Some(to) = req.get("to").and_then(Value::as_str) else {
                return err("migrate needs \"to\" (host:port of a csv-vmm incoming)");
            };
            let mut opts = MigrateOptions::default();
            if let Some(ms) = req.get("downtime_ms").and_then(Value::as_u64) {
                opts.downtime_limit = Duration::from_millis(ms);
            }
            if let Some(s) = req.get("timeout_s").and_then(Value::as_u64) {
                opts.timeout = Duration::from_secs(s);
            }
            if let Some(v) = req.get("verify_memory").and_then(Value::as_bool) {
                opts.verify_memory = v;
            }
            match req.get("token").and_then(Value::as_str).map(migrate::parse_token) {
                Some(Ok(t)) => opts.token = Some(t),
                Some(Err(e)) => return err(e),
                None => return err("migrate needs \"token\" (the target's migration token)"),
            }
            // With "confirm", the hand-over waits for the caller: after the
            // target's Ack this sends {"event": "acked"} and reads one line,
            // {"cmd": "go"} to let the target resume (the caller has moved
            // the disk's write lease) or anything else to give up, which
            // resumes the guest here.
            let confirm = req.get("confirm").and_then(Value::as_bool).unwrap_or(false);
            let mut w2 = match w.try_clone() {
                Ok(w2) => w2,
                Err(e) => return err(e),
            };
            let r = migrate::migrate(
                &vm,
                to,
                &opts,
                |p| {
                    let _ = writeln!(w, "{}", json!({"event": "progress", "progress": p}));
                },
                || {
                    if !confirm {
                        return Ok(());
                    }
                    writeln!(w2, "{}", json!({"event": "acked"})).map_err(|e| e.to_string())?;
                    let mut line = String::new();
                    r.read_line(&mut line).map_err(|e| e.to_string())?;
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v["cmd"] == "go" => Ok(()),
                        _ => Err(format!("the caller did not confirm: {}", line.trim())),
                    }
                },
            );
            match r {
                Ok(summary) => json!({"ok": true, "summary": summary}),
                Err(e) => err(e),
            }
        }
        other => err(format!(
            "unknown command {other:?} (status, pause, resume, stop, save, migrate, set-rate, check, memory-crc, stats, registers)"
        )),
    }
}

fn status(vm: &Vm) -> Value {
    json!({
        "ok": true,
        "state": vm.state(),
        "mem_bytes": vm.mem_bytes(),
        "vcpus": vm.config.vcpus,
        "tsc_khz": vm.tsc_khz(),
        "heartbeat": vm.heartbeat(),
        "guest": {
            "seq": vm.mailbox(guest::MB_SEQ),
            "errors": vm.mailbox(guest::MB_ERRORS),
            "pages_written": vm.mailbox(guest::MB_WRITTEN),
            "laps": vm.mailbox(guest::MB_LAPS),
            "disk_writes": vm.mailbox(guest::MB_DISK_WRITES),
            "disk_last_seq": vm.mailbox(guest::MB_DISK_LAST),
            "disk_errors": vm.mailbox(guest::MB_DISK_ERRORS),
        },
        "disk": vm.disk_stats(),
    })
}

/// Sends one request to a control socket and returns the final answer;
/// progress lines go to `on_event`.
pub fn request(
    path: &Path,
    req: &Value,
    mut on_event: impl FnMut(&Value),
) -> std::io::Result<Value> {
    let conn = UnixStream::connect(path)?;
    let mut w = conn.try_clone()?;
    writeln!(w, "{req}")?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VMM closed the control socket without an answer",
            ));
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer: {e}"))
        })?;
        if v.get("event").is_some() {
            on_event(&v);
        } else {
            return Ok(v);
        }
    }
}
