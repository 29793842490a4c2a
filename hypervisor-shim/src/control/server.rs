//! The VMM's side of its control socket: one thread per connection, one
//! request at a time (see [`super::proto`] for the messages).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::proto::{
    Answer, Confirm, GuestCounters, Line, Reply, Request, Stats, Status, VcpuRegisters, VmmState,
    MAX_LINE,
};
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

fn send(w: &mut UnixStream, line: &Line) -> std::io::Result<()> {
    let text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    writeln!(w, "{text}")
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
        if line.len() > MAX_LINE {
            let _ = send(
                &mut w,
                &Line::Answer(Answer::Err("request too long".into())),
            );
            return;
        }
        slot.active.fetch_add(1, Ordering::SeqCst);
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, slot, &mut w, &mut r),
            Err(e) => Answer::Err(format!("not a request: {e}")),
        };
        let ok = send(&mut w, &Line::Answer(answer)).is_ok();
        slot.active.fetch_sub(1, Ordering::SeqCst);
        if !ok {
            return;
        }
    }
}

/// Runs `f` with the VM paused, resuming it after if it ran.
fn paused<R>(vm: &Vm, f: impl FnOnce() -> R) -> R {
    let was_running = vm.state() == RunState::Running;
    vm.pause();
    let r = f();
    if was_running {
        vm.resume();
    }
    r
}

fn handle(req: Request, slot: &Slot, w: &mut UnixStream, r: &mut BufReader<UnixStream>) -> Answer {
    let Some(vm) = slot.get() else {
        return match req {
            Request::Status => Answer::Ok(Reply::Status(Box::new(Status {
                state: Some(if slot.incoming().is_some() {
                    VmmState::Incoming
                } else {
                    VmmState::Starting
                }),
                listen: slot.incoming().map(|a| a.to_string()),
                ..Status::default()
            }))),
            _ => Answer::Err("no VM yet (waiting for an incoming migration)".into()),
        };
    };
    let done = Answer::Ok(Reply::Done);
    match req {
        Request::Status => Answer::Ok(Reply::Status(Box::new(status(&vm)))),
        Request::Pause => {
            vm.pause();
            done
        }
        Request::Resume => {
            if vm.state() != RunState::Paused {
                return Answer::Err(format!("the VM is {:?}, not paused", vm.state()));
            }
            vm.resume();
            done
        }
        Request::Stop => {
            vm.stop();
            done
        }
        Request::SetRate { mib_per_s, tick_us } => {
            match vm.set_guest_rate(guest::TestGuestConfig::for_rate(mib_per_s, tick_us)) {
                Ok(()) => done,
                Err(e) => Answer::Err(coordinator::service::error_chain(&e)),
            }
        }
        Request::Check => Answer::Ok(Reply::Check(paused(&vm, || vm.check_test_guest()))),
        Request::MemoryCrc => Answer::Ok(Reply::MemoryCrc(paused(&vm, || vm.memory_crc()))),
        Request::Registers => match paused(&vm, || vm.vcpu_states()) {
            Ok(cpus) => Answer::Ok(Reply::Registers(
                cpus.iter()
                    .map(|c| VcpuRegisters {
                        id: c.id,
                        rip: c.regs.rip,
                        rsp: c.regs.rsp,
                        cr0: c.sregs.cr0,
                        cs: c.sregs.cs.selector,
                        mp_state: c.mp_state.mp_state,
                    })
                    .collect(),
            )),
            Err(e) => Answer::Err(coordinator::service::error_chain(&e)),
        },
        Request::Stats => Answer::Ok(Reply::Stats(Stats {
            mem_bytes: vm.mem_bytes(),
            used_bytes: vm.touched_pages() * 4096,
        })),
        Request::Save { path, stop } => match migrate::save(&vm, &path) {
            Ok(summary) => {
                if stop {
                    vm.finish(RunState::Saved);
                } else {
                    vm.resume();
                }
                Answer::Ok(Reply::Summary(summary))
            }
            Err(e) => Answer::Err(coordinator::service::error_chain(&e)),
        },
        Request::Migrate(m) => {
            let mut opts = MigrateOptions::default();
            if let Some(ms) = m.downtime_ms {
                opts.downtime_limit = Duration::from_millis(ms);
            }
            if let Some(s) = m.timeout_s {
                opts.timeout = Duration::from_secs(s);
            }
            opts.verify_memory = m.verify_memory;
            match migrate::parse_token(&m.token) {
                Ok(t) => opts.token = Some(t),
                Err(e) => return Answer::Err(e.to_string()),
            }
            // With "confirm", the hand-over waits for the caller: after the
            // target's Ack this sends `acked` and reads one line, `go` to
            // let the target resume (the caller has moved the disk's write
            // lease) or anything else to give up, which resumes the guest
            // here.
            let mut w2 = match w.try_clone() {
                Ok(w2) => w2,
                Err(e) => return Answer::Err(e.to_string()),
            };
            let result = migrate::migrate(
                &vm,
                &m.to,
                &opts,
                |p| {
                    let _ = send(w, &Line::Progress(p.clone()));
                },
                || {
                    if !m.confirm {
                        return Ok(());
                    }
                    send(&mut w2, &Line::Acked)?;
                    let mut line = String::new();
                    r.read_line(&mut line)?;
                    match serde_json::from_str::<Confirm>(&line) {
                        Ok(Confirm::Go) => Ok(()),
                        _ => Err(format!("the caller did not confirm: {}", line.trim()).into()),
                    }
                },
            );
            match result {
                Ok(summary) => Answer::Ok(Reply::Summary(summary)),
                Err(e) => Answer::Err(coordinator::service::error_chain(&e)),
            }
        }
    }
}

fn status(vm: &Vm) -> Status {
    Status {
        state: Some(VmmState::Vm(vm.state())),
        listen: None,
        mem_bytes: vm.mem_bytes(),
        vcpus: vm.config.vcpus,
        tsc_khz: vm.tsc_khz(),
        heartbeat: vm.heartbeat(),
        guest: GuestCounters {
            seq: vm.mailbox(guest::MB_SEQ),
            errors: vm.mailbox(guest::MB_ERRORS),
            pages_written: vm.mailbox(guest::MB_WRITTEN),
            laps: vm.mailbox(guest::MB_LAPS),
            disk_writes: vm.mailbox(guest::MB_DISK_WRITES),
            disk_last_seq: vm.mailbox(guest::MB_DISK_LAST),
            disk_errors: vm.mailbox(guest::MB_DISK_ERRORS),
        },
        disk: vm.disk_stats(),
    }
}
