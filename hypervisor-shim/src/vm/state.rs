//! The state a save or a migration carries: the dirty-page log, memory
//! checksums, device, VM and vCPU registers, and their restore.

use super::*;

impl Vm {
    /// Switches KVM's dirty-page log on or off (and clears both logs).
    pub fn set_dirty_log(&self, on: bool) -> Result<()> {
        self.set_memory_region(on)?;
        self.vmm_bitmap().reset();
        Ok(())
    }

    pub(super) fn vmm_bitmap(&self) -> &AtomicBitmap {
        // One region, created in `new`.
        self.mem
            .iter()
            .next()
            .map(|r| (**r).bitmap())
            .expect("guest memory has one region")
    }

    /// Takes (and clears) the pages dirtied since the last call, by the
    /// guest (KVM's log) or by the VMM (the memory bitmap), merged into
    /// `into` (one bit per page).
    pub fn take_dirty(&self, into: &mut [u64]) -> Result<()> {
        let kvm_log = kvm(
            "read the dirty log",
            self.fd.get_dirty_log(0, self.config.mem_bytes as usize),
        )?;
        for (d, s) in into.iter_mut().zip(kvm_log) {
            *d |= s;
        }
        // The VMM's own writes: one bit per page, taken and cleared at once.
        for (d, s) in into.iter_mut().zip(self.vmm_bitmap().get_and_reset()) {
            *d |= s;
        }
        Ok(())
    }

    /// CRC32 of all guest memory (call while paused for a stable answer).
    pub fn memory_crc(&self) -> u32 {
        let (p, len) = self.host_memory();
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`.
        let s = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
        crc32fast::hash(s)
    }

    /// The device state (call while paused).
    pub fn device_state(&self) -> DeviceState {
        let d = lock(&self.devices);
        let s = d.serial.state();
        DeviceState {
            serial_regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            serial_in: s.in_buffer.clone(),
            heartbeat_seq: d.heartbeat.seq,
            heartbeats: d.heartbeat.count,
            heartbeat_gaps: d.heartbeat.gaps,
            guest_errors: d.heartbeat.guest_errors,
            blk: d.blk.as_ref().map(VirtioBlk::state),
        }
    }

    /// Restores the device state (before `start`).
    pub fn restore_devices(&self, s: &DeviceState) -> Result<()> {
        let mut d = lock(&self.devices);
        let r = s.serial_regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.serial_in.clone(),
        };
        let irq = IrqFd(
            d.serial
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| VmError::Config(format!("eventfd: {e}")))?,
        );
        let out = self
            .config
            .serial
            .open()
            .map_err(|e| VmError::Config(format!("serial output: {e}")))?;
        d.serial = Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| VmError::Config(format!("serial state: {e:?}")))?;
        d.heartbeat.seq = s.heartbeat_seq;
        d.heartbeat.count = s.heartbeats;
        d.heartbeat.gaps = s.heartbeat_gaps;
        d.heartbeat.guest_errors = s.guest_errors;
        d.heartbeat.booted = s.heartbeats > 0;
        if let Some(b) = &s.blk {
            let mut dev = VirtioBlk::new(b.capacity);
            dev.restore(b)?;
            d.blk = Some(dev);
        }
        Ok(())
    }

    /// The VM-wide KVM state (call while paused).
    pub fn vm_state(&self) -> Result<VmState> {
        let chip = |id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            kvm("read the irqchip", self.fd.get_irqchip(&mut c))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: kvm("read the PIT", self.fd.get_pit2())?,
            clock: kvm("read the KVM clock", self.fd.get_clock())?,
        })
    }

    /// Restores the VM-wide state (before `start`).
    pub fn restore_vm_state(&self, s: &VmState) -> Result<()> {
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            kvm("restore the irqchip", self.fd.set_irqchip(c))?;
        }
        kvm("restore the PIT", self.fd.set_pit2(&s.pit))?;
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            // With the realtime stamp KVM advances the clock by the wall
            // time that passed between save and restore.
            flags: s.clock.flags & KVM_CLOCK_REALTIME,
            realtime: s.clock.realtime,
            ..Default::default()
        };
        kvm("restore the KVM clock", self.fd.set_clock(&clock))?;
        Ok(())
    }

    /// Every vCPU's state (call while paused).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>> {
        let mut out = Vec::with_capacity(self.vcpus.len());
        for (id, v) in self.vcpus.iter().enumerate() {
            let v = lock(v);
            let id = id as u32;
            let what = |w: &str| format!("vCPU {id}: read {w}");
            let mp_state = kvm(what("MP state"), v.get_mp_state())?;
            let regs = kvm(what("registers"), v.get_regs())?;
            let sregs = kvm(what("special registers"), v.get_sregs())?;
            let xsave = Box::new(kvm(what("XSAVE"), v.get_xsave())?);
            let xcrs = kvm(what("XCRs"), v.get_xcrs())?;
            let debugregs = kvm(what("debug registers"), v.get_debug_regs())?;
            let lapic = kvm(what("local APIC"), v.get_lapic())?;
            let entries: Vec<kvm_msr_entry> = self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| VmError::Config(format!("MSR list: {e:?}")))?;
            let n = kvm(what("MSRs"), v.get_msrs(&mut msrs))?;
            let msrs: Vec<(u32, u64)> = msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect();
            let events = kvm(what("events"), v.get_vcpu_events())?;
            let cpuid = kvm(what("CPUID"), v.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
            out.push(VcpuState {
                id,
                cpuid: cpuid.as_slice().to_vec(),
                tsc_khz: self.tsc_khz,
                mp_state,
                regs,
                sregs,
                xsave,
                xcrs,
                debugregs,
                lapic,
                msrs,
                events,
            });
        }
        Ok(out)
    }

    /// Restores the vCPUs in the order KVM needs: CPUID, MP state,
    /// registers, special registers, XSAVE, XCRs, debug registers, local
    /// APIC, MSRs, and the pending events last.
    pub fn restore_vcpus(&self, states: &[VcpuState]) -> Result<()> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::Config(format!(
                "the state has {} vCPUs, this VM {}",
                states.len(),
                self.vcpus.len()
            )));
        }
        for s in states {
            let v = self
                .vcpus
                .get(s.id as usize)
                .ok_or_else(|| VmError::Config(format!("state for unknown vCPU {}", s.id)))?;
            let v = lock(v);
            let id = s.id;
            let e = |what: &'static str| move |source| VmError::Restore { id, what, source };
            if s.tsc_khz != self.tsc_khz {
                tracing::warn!(
                    saved = s.tsc_khz,
                    here = self.tsc_khz,
                    "TSC frequency differs from the source host; the guest's sense of time will drift"
                );
                let _ = v.set_tsc_khz(s.tsc_khz);
            }
            let cpuid = CpuId::from_entries(&s.cpuid)
                .map_err(|err| VmError::Config(format!("CPUID of vCPU {id}: {err:?}")))?;
            v.set_cpuid2(&cpuid).map_err(e("CPUID"))?;
            v.set_mp_state(s.mp_state).map_err(e("MP state"))?;
            v.set_regs(&s.regs).map_err(e("registers"))?;
            v.set_sregs(&s.sregs).map_err(e("special registers"))?;
            // SAFETY: the XSAVE area was read from KVM by the same structure
            // layout (kvm_xsave, 4 KiB); extended areas beyond it are not used.
            unsafe { v.set_xsave(&s.xsave) }.map_err(e("XSAVE"))?;
            v.set_xcrs(&s.xcrs).map_err(e("XCRs"))?;
            v.set_debug_regs(&s.debugregs)
                .map_err(e("debug registers"))?;
            v.set_lapic(&s.lapic).map_err(e("local APIC"))?;
            let entries: Vec<kvm_msr_entry> = s
                .msrs
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|err| VmError::Config(format!("MSRs of vCPU {id}: {err:?}")))?;
            let n = v.set_msrs(&msrs).map_err(e("MSRs"))?;
            if n != entries.len() {
                let failed = entries.get(n).map(|m| m.index).unwrap_or(0);
                return Err(VmError::Config(format!(
                    "vCPU {id}: KVM took {n} of {} MSRs (refused MSR {failed:#x})",
                    entries.len()
                )));
            }
            v.set_vcpu_events(&s.events).map_err(e("vCPU events"))?;
        }
        Ok(())
    }
}

/// The MSRs KVM reports and can actually read on this host.
pub(super) fn readable_msrs(kvm_sys: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm("read the MSR list", kvm_sys.get_msr_index_list())?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| VmError::Config(format!("MSR list: {e:?}")))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            ok.push(index);
        }
    }
    Ok(ok)
}
