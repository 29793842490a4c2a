//! The KVM state a stream carries: VM-wide (interrupt controllers, PIT,
//! clock), per vCPU, and the devices', each a list of tagged records.

use super::*;

/// The VM-wide KVM state.
#[derive(Debug, Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const VM_PIC_MASTER: u16 = 1;
const VM_PIC_SLAVE: u16 = 2;
const VM_IOAPIC: u16 = 3;
const VM_PIT: u16 = 4;
const VM_CLOCK: u16 = 5;

impl VmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_record(&mut v, VM_PIC_MASTER, bytes_of(&self.pic_master));
        put_record(&mut v, VM_PIC_SLAVE, bytes_of(&self.pic_slave));
        put_record(&mut v, VM_IOAPIC, bytes_of(&self.ioapic));
        put_record(&mut v, VM_PIT, bytes_of(&self.pit));
        put_record(&mut v, VM_CLOCK, bytes_of(&self.clock));
        v
    }

    pub fn decode(p: &[u8]) -> Result<VmState> {
        const F: &str = "VmState";
        let mut r = Reader::new(F, p);
        let (mut pm, mut ps, mut io, mut pit, mut clock) = (None, None, None, None, None);
        while let Some((tag, body)) = r.record()? {
            match tag {
                VM_PIC_MASTER => pm = Some(pod(F, "PIC master", body)?),
                VM_PIC_SLAVE => ps = Some(pod(F, "PIC slave", body)?),
                VM_IOAPIC => io = Some(pod(F, "IOAPIC", body)?),
                VM_PIT => pit = Some(pod(F, "PIT", body)?),
                VM_CLOCK => clock = Some(pod(F, "KVM clock", body)?),
                _ => {}
            }
        }
        let missing = |what: &str| StreamError::Malformed {
            frame: F,
            what: format!("no {what} record"),
        };
        Ok(VmState {
            pic_master: pm.ok_or_else(|| missing("PIC master"))?,
            pic_slave: ps.ok_or_else(|| missing("PIC slave"))?,
            ioapic: io.ok_or_else(|| missing("IOAPIC"))?,
            pit: pit.ok_or_else(|| missing("PIT"))?,
            clock: clock.ok_or_else(|| missing("KVM clock"))?,
        })
    }
}

/// One vCPU's KVM state, in the order it is restored.
#[derive(Debug)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

const CPU_CPUID: u16 = 1;
const CPU_TSC_KHZ: u16 = 2;
const CPU_MP_STATE: u16 = 3;
pub(super) const CPU_REGS: u16 = 4;
const CPU_SREGS: u16 = 5;
const CPU_XSAVE: u16 = 6;
const CPU_XCRS: u16 = 7;
const CPU_DEBUGREGS: u16 = 8;
const CPU_LAPIC: u16 = 9;
const CPU_MSRS: u16 = 10;
const CPU_EVENTS: u16 = 11;

/// Most CPUID entries and MSRs accepted in a state record.
const MAX_ENTRIES: usize = 4096;

impl VcpuState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8192);
        v.extend_from_slice(&self.id.to_le_bytes());
        let mut cpuid = Vec::with_capacity(self.cpuid.len() * 40);
        for e in &self.cpuid {
            cpuid.extend_from_slice(bytes_of(e));
        }
        put_record(&mut v, CPU_CPUID, &cpuid);
        put_record(&mut v, CPU_TSC_KHZ, &self.tsc_khz.to_le_bytes());
        put_record(&mut v, CPU_MP_STATE, bytes_of(&self.mp_state));
        put_record(&mut v, CPU_REGS, bytes_of(&self.regs));
        put_record(&mut v, CPU_SREGS, bytes_of(&self.sregs));
        put_record(&mut v, CPU_XSAVE, bytes_of(&*self.xsave));
        put_record(&mut v, CPU_XCRS, bytes_of(&self.xcrs));
        put_record(&mut v, CPU_DEBUGREGS, bytes_of(&self.debugregs));
        put_record(&mut v, CPU_LAPIC, bytes_of(&self.lapic));
        let mut msrs = Vec::with_capacity(self.msrs.len() * 12);
        for (i, d) in &self.msrs {
            msrs.extend_from_slice(&i.to_le_bytes());
            msrs.extend_from_slice(&d.to_le_bytes());
        }
        put_record(&mut v, CPU_MSRS, &msrs);
        put_record(&mut v, CPU_EVENTS, bytes_of(&self.events));
        v
    }

    pub fn decode(p: &[u8]) -> Result<VcpuState> {
        const F: &str = "VcpuState";
        let mut r = Reader::new(F, p);
        let id = r.u32("vCPU id")?;
        let mut cpuid = None;
        let mut tsc_khz = None;
        let mut mp = None;
        let mut regs = None;
        let mut sregs = None;
        let mut xsave: Option<Box<kvm_xsave>> = None;
        let mut xcrs = None;
        let mut dregs = None;
        let mut lapic = None;
        let mut msrs = None;
        let mut events = None;
        while let Some((tag, body)) = r.record()? {
            match tag {
                CPU_CPUID => {
                    let sz = std::mem::size_of::<kvm_cpuid_entry2>();
                    if body.len() % sz != 0 || body.len() / sz > MAX_ENTRIES {
                        return Err(r.err(format!("CPUID record of {} bytes", body.len())));
                    }
                    let mut v = Vec::with_capacity(body.len() / sz);
                    for c in body.chunks_exact(sz) {
                        v.push(pod(F, "CPUID entry", c)?);
                    }
                    cpuid = Some(v);
                }
                CPU_TSC_KHZ => tsc_khz = Some(pod::<u32>(F, "TSC kHz", body)?),
                CPU_MP_STATE => mp = Some(pod(F, "MP state", body)?),
                CPU_REGS => regs = Some(pod(F, "registers", body)?),
                CPU_SREGS => sregs = Some(pod(F, "special registers", body)?),
                CPU_XSAVE => xsave = Some(Box::new(pod(F, "XSAVE area", body)?)),
                CPU_XCRS => xcrs = Some(pod(F, "XCRs", body)?),
                CPU_DEBUGREGS => dregs = Some(pod(F, "debug registers", body)?),
                CPU_LAPIC => lapic = Some(pod(F, "local APIC", body)?),
                CPU_MSRS => {
                    if body.len() % 12 != 0 || body.len() / 12 > MAX_ENTRIES {
                        return Err(r.err(format!("MSR record of {} bytes", body.len())));
                    }
                    let v = body
                        .chunks_exact(12)
                        .map(|c| {
                            let mut i = [0u8; 4];
                            let mut d = [0u8; 8];
                            i.copy_from_slice(&c[..4]);
                            d.copy_from_slice(&c[4..]);
                            (u32::from_le_bytes(i), u64::from_le_bytes(d))
                        })
                        .collect();
                    msrs = Some(v);
                }
                CPU_EVENTS => events = Some(pod(F, "vCPU events", body)?),
                _ => {}
            }
        }
        let missing = |what: &str| StreamError::Malformed {
            frame: F,
            what: format!("vCPU {id}: no {what} record"),
        };
        Ok(VcpuState {
            id,
            cpuid: cpuid.ok_or_else(|| missing("CPUID"))?,
            tsc_khz: tsc_khz.ok_or_else(|| missing("TSC frequency"))?,
            mp_state: mp.ok_or_else(|| missing("MP state"))?,
            regs: regs.ok_or_else(|| missing("registers"))?,
            sregs: sregs.ok_or_else(|| missing("special registers"))?,
            xsave: xsave.ok_or_else(|| missing("XSAVE"))?,
            xcrs: xcrs.ok_or_else(|| missing("XCRs"))?,
            debugregs: dregs.ok_or_else(|| missing("debug registers"))?,
            lapic: lapic.ok_or_else(|| missing("local APIC"))?,
            msrs: msrs.ok_or_else(|| missing("MSRs"))?,
            events: events.ok_or_else(|| missing("vCPU events"))?,
        })
    }
}

/// The VMM's own device state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// 16550 registers: divisor low/high, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub serial_regs: [u8; 9],
    /// Bytes waiting in the serial receive FIFO.
    pub serial_in: Vec<u8>,
    /// Last heartbeat sequence number seen (full 64 bits).
    pub heartbeat_seq: u64,
    /// Heartbeats seen since the guest booted (across hosts).
    pub heartbeats: u64,
    /// Gaps seen in the heartbeat sequence.
    pub heartbeat_gaps: u64,
    /// Page-check failures the guest reported.
    pub guest_errors: u64,
    /// The virtio-blk device, when the VM has a disk.
    pub blk: Option<crate::virtio_blk::BlkState>,
}

const DEV_SERIAL: u16 = 1;
const DEV_HEARTBEAT: u16 = 2;
const DEV_VIRTIO_BLK: u16 = 3;

impl DeviceState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let mut s = self.serial_regs.to_vec();
        s.extend_from_slice(&self.serial_in);
        put_record(&mut v, DEV_SERIAL, &s);
        let mut h = Vec::with_capacity(32);
        for x in [
            self.heartbeat_seq,
            self.heartbeats,
            self.heartbeat_gaps,
            self.guest_errors,
        ] {
            h.extend_from_slice(&x.to_le_bytes());
        }
        put_record(&mut v, DEV_HEARTBEAT, &h);
        if let Some(b) = &self.blk {
            put_record(&mut v, DEV_VIRTIO_BLK, &b.encode());
        }
        v
    }

    pub fn decode(p: &[u8]) -> Result<DeviceState> {
        const F: &str = "Devices";
        let mut r = Reader::new(F, p);
        let mut d = DeviceState::default();
        let (mut serial, mut hb) = (false, false);
        while let Some((tag, body)) = r.record()? {
            match tag {
                DEV_SERIAL => {
                    if body.len() < 9 || body.len() > 9 + 4096 {
                        return Err(r.err(format!("serial record of {} bytes", body.len())));
                    }
                    d.serial_regs.copy_from_slice(&body[..9]);
                    d.serial_in = body[9..].to_vec();
                    serial = true;
                }
                DEV_HEARTBEAT => {
                    let mut hr = Reader::new(F, body);
                    d.heartbeat_seq = hr.u64("heartbeat sequence")?;
                    d.heartbeats = hr.u64("heartbeat count")?;
                    d.heartbeat_gaps = hr.u64("heartbeat gaps")?;
                    d.guest_errors = hr.u64("guest errors")?;
                    hr.finish()?;
                    hb = true;
                }
                DEV_VIRTIO_BLK => {
                    let mut br = Reader::new(F, body);
                    let b = crate::virtio_blk::BlkState::decode(&mut br)?;
                    br.finish()?;
                    d.blk = Some(b);
                }
                _ => {}
            }
        }
        if !serial || !hb {
            return Err(r.err("missing serial or heartbeat record"));
        }
        Ok(d)
    }
}
