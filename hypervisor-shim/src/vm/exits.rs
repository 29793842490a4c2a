//! The vCPU threads: KVM_RUN and its exits (port and MMIO I/O to the
//! devices), and kicking them out of KVM_RUN.

use super::*;

impl Vm {
    pub(super) fn vcpu_loop(&self, index: usize, vcpu: Arc<Mutex<VcpuFd>>) {
        let gate = &self.gate;
        let mut ran_since = Instant::now();
        loop {
            if gate.stop.load(Ordering::SeqCst) {
                break;
            }
            if gate.pause.load(Ordering::SeqCst) {
                // An I/O or MMIO exit is complete (RIP past the instruction)
                // only once KVM_RUN is entered again: do that with
                // immediate_exit, which runs no guest instruction, so the
                // state a save reads is consistent.
                {
                    let mut v = lock(&vcpu);
                    v.set_kvm_immediate_exit(1);
                    let _ = v.run();
                    v.set_kvm_immediate_exit(0);
                }
                let mut st = lock(&gate.state);
                st.parked += 1;
                gate.cv.notify_all();
                while gate.pause.load(Ordering::SeqCst) && !gate.stop.load(Ordering::SeqCst) {
                    st = gate.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.parked -= 1;
                gate.cv.notify_all();
                ran_since = Instant::now();
                continue;
            }
            let pct = gate.throttle.load(Ordering::Relaxed);
            if pct > 0 {
                // Auto-converge: run (100 - pct)% of each 10 ms window.
                let window = Duration::from_millis(10);
                let run_for = window * (100 - pct.min(99)) / 100;
                if ran_since.elapsed() >= run_for {
                    std::thread::sleep(window - run_for);
                    ran_since = Instant::now();
                }
            }
            let mut v = lock(&vcpu);
            let stop_reason = match v.run() {
                Ok(VcpuExit::IoOut(port, data)) => self.io_out(port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.io_in(port, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio_read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio_write(addr, data);
                    None
                }
                Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) => None,
                Ok(VcpuExit::Shutdown) => {
                    Some("the guest shut down (triple fault or reset)".to_string())
                }
                Ok(VcpuExit::SystemEvent(t, _)) => Some(format!("system event {t}")),
                Ok(other) => Some(format!("unhandled exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(format!("KVM_RUN failed: {e}")),
            };
            drop(v);
            if let Some(reason) = stop_reason {
                tracing::warn!(vcpu = index, %reason, "guest stopped");
                self.stop();
                break;
            }
        }
    }

    pub(super) fn io_out(&self, port: u16, data: &[u8]) -> Option<String> {
        let mut d = lock(&self.devices);
        match port {
            0x3f8..=0x3ff => {
                if let Some(&b) = data.first() {
                    let _ = d.serial.write((port - 0x3f8) as u8, b);
                }
            }
            0x60 | 0x64 => {
                if let Some(&b) = data.first() {
                    let _ = d.i8042.write((port - 0x60) as u8, b);
                }
                if self.reset.load(Ordering::SeqCst) {
                    return Some("the guest asked for a reset (i8042)".into());
                }
            }
            guest::PORT_HEARTBEAT if data.len() == 4 => {
                d.heartbeat
                    .record(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            guest::PORT_ERROR if data.len() == 4 => {
                d.heartbeat.guest_errors += 1;
                let page = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                tracing::error!(
                    page,
                    "the test guest found a page that does not match what it wrote"
                );
            }
            guest::PORT_DISK_ERROR => {
                tracing::error!(status = ?data, "the test guest's disk request failed");
            }
            guest::PORT_BOOTED => {
                d.heartbeat.booted = true;
                tracing::info!("test guest booted");
            }
            _ => {}
        }
        None
    }

    pub(super) fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let d = lock(&self.devices);
        match &d.blk {
            Some(b)
                if (virtio_blk::MMIO_BASE..virtio_blk::MMIO_BASE + virtio_blk::MMIO_SIZE)
                    .contains(&addr) =>
            {
                b.read(addr - virtio_blk::MMIO_BASE, data)
            }
            _ => data.fill(0xff),
        }
    }

    pub(super) fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut d = lock(&self.devices);
        let d = &mut *d;
        if let Some(b) = &mut d.blk {
            if (virtio_blk::MMIO_BASE..virtio_blk::MMIO_BASE + virtio_blk::MMIO_SIZE)
                .contains(&addr)
                && b.write(addr - virtio_blk::MMIO_BASE, data, &self.mem)
            {
                let _ = d.blk_irq.write(1);
            }
        }
    }

    pub(super) fn io_in(&self, port: u16, data: &mut [u8]) {
        let mut d = lock(&self.devices);
        let v = match port {
            0x3f8..=0x3ff => d.serial.read((port - 0x3f8) as u8),
            0x60 | 0x64 => d.i8042.read((port - 0x60) as u8),
            _ => 0xff,
        };
        data.fill(v);
    }

    pub(super) fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            // SAFETY: the thread handle is alive (joined only in `Drop`), and
            // the kick signal has a handler that does nothing, so it only
            // interrupts KVM_RUN.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
    }
}
