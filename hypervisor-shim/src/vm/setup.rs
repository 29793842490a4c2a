//! Setting a fresh VM up to run: long mode, page tables and descriptor
//! tables for vCPU 0.

use super::*;

impl Vm {
    /// Builds a GDT (null, 64-bit code, data, busy TSS; code and data at
    /// privilege `dpl`), an empty IDT and an identity map of the first
    /// 4 GiB with 2 MiB pages, and sets vCPU 0 up in long mode at `rip`
    /// with `rsp`, `rsi` and `rflags`.
    pub(crate) fn setup_long_mode(
        &self,
        dpl: u8,
        rip: u64,
        rsp: u64,
        rsi: u64,
        rflags: u64,
    ) -> Result<()> {
        let m = &self.mem;
        let w = |addr: u64, v: u64| {
            m.write_obj(v, GuestAddress(addr))
                .map_err(|e| VmError::Memory(format!("write {addr:#x}: {e}")))
        };
        let d = u64::from(dpl & 3) << 45;
        for (i, e) in [
            0u64,
            0x00af_9b00_0000_ffff | d,
            0x00cf_9300_0000_ffff | d,
            0x008f_8b00_0000_ffff,
        ]
        .iter()
        .enumerate()
        {
            w(guest::GDT_ADDR + 8 * i as u64, *e)?;
        }
        w(guest::IDT_ADDR, 0)?;
        let pdpt = guest::PML4_ADDR + 0x1000;
        let pd = guest::PML4_ADDR + 0x2000;
        w(guest::PML4_ADDR, pdpt | 7)?;
        for i in 0..4u64 {
            w(pdpt + 8 * i, (pd + 0x1000 * i) | 7)?;
            for j in 0..512u64 {
                w(pd + 0x1000 * i + 8 * j, ((i * 512 + j) << 21) | 0x87)?;
            }
        }
        let v = lock(&self.vcpus[0]);
        let mut sregs = kvm("read sregs", v.get_sregs())?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08 | u16::from(dpl & 3),
            type_: 0xb,
            present: 1,
            dpl: dpl & 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10 | u16::from(dpl & 3),
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        let tss = kvm_segment {
            selector: 0x18,
            type_: 0xb,
            s: 0,
            dpl: 0,
            db: 0,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = guest::GDT_ADDR;
        sregs.gdt.limit = 4 * 8 - 1;
        sregs.idt.base = guest::IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cr3 = guest::PML4_ADDR;
        sregs.cr4 |= 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = (sregs.cr0 | 0x1 | 0x8000_0000 | 0x20) & !0x6000_0000; // PE, PG, NE; caches on
        sregs.efer |= 0x500; // LME, LMA
        kvm("set sregs", v.set_sregs(&sregs))?;
        let mut regs = kvm("read regs", v.get_regs())?;
        regs.rip = rip;
        regs.rsp = rsp;
        regs.rsi = rsi;
        regs.rflags = rflags;
        kvm("set regs", v.set_regs(&regs))?;
        let mut fpu = kvm("read FPU", v.get_fpu())?;
        fpu.fcw = 0x37f;
        fpu.mxcsr = 0x1f80;
        kvm("set FPU", v.set_fpu(&fpu))?;
        Ok(())
    }
}
