//! Direct boot of a Linux bzImage (the x86 boot protocol, 64-bit entry):
//! the protected-mode kernel at 1 MiB, the zero page with the setup header,
//! an E820 map, the command line and the initramfs, and vCPU 0 entered in
//! long mode at ring 0 at the kernel's 64-bit entry point.
//!
//! See docs/VMM.md for how far a stock Debian kernel gets on a host whose
//! KVM is kvm_pvm (not far: ring-0 code that is not PVM-aware runs through
//! KVM's instruction emulator).

use vm_memory::{Bytes, GuestAddress};

use crate::vm::{Vm, VmError};

/// Where the zero page (`struct boot_params`) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x20000;
/// Where the protected-mode kernel is loaded.
pub const KERNEL: u64 = 0x10_0000;
const CMDLINE_MAX: usize = 4095;

/// Why an image is not a bzImage this VMM boots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BzImageError {
    /// Shorter than a setup header.
    #[error("{0} bytes is too short for a bzImage")]
    TooShort(usize),
    /// No boot flag or `HdrS` signature.
    #[error("not a bzImage (no boot flag or HdrS signature)")]
    NotBzImage,
    /// A boot protocol before 2.12.
    #[error("boot protocol {}.{} is too old (2.12 or later has the 64-bit entry)", .0 >> 8, .0 & 0xff)]
    TooOld(u16),
    /// No 64-bit entry point.
    #[error("the kernel has no 64-bit entry point (XLF_KERNEL_64)")]
    No64BitEntry,
    /// The setup sectors cover the whole image.
    #[error("setup of {0} sectors leaves no kernel")]
    NoKernel(usize),
}

/// A parsed bzImage.
#[derive(Debug)]
pub struct BzImage<'a> {
    /// The setup header as it stands in the image (0x1f1 up to its end).
    header: &'a [u8],
    /// The protected-mode kernel.
    kernel: &'a [u8],
    initrd_addr_max: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> BzImage<'a> {
    /// Checks the image: boot flag, `HdrS`, protocol 2.12 or later with a
    /// 64-bit entry point.
    pub fn parse(img: &'a [u8]) -> Result<BzImage<'a>, BzImageError> {
        if img.len() < 0x268 {
            return Err(BzImageError::TooShort(img.len()));
        }
        if u16_at(img, 0x1fe) != 0xAA55 || &img[0x202..0x206] != b"HdrS" {
            return Err(BzImageError::NotBzImage);
        }
        let version = u16_at(img, 0x206);
        if version < 0x020c {
            return Err(BzImageError::TooOld(version));
        }
        if u16_at(img, 0x236) & 1 == 0 {
            return Err(BzImageError::No64BitEntry);
        }
        let setup_sects = match img[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let pm = (setup_sects + 1) * 512;
        // The header runs from 0x1f1 to 0x202 + the byte at 0x201.
        let end = (0x202 + usize::from(img[0x201])).min(img.len()).max(0x268);
        if pm >= img.len() {
            return Err(BzImageError::NoKernel(setup_sects));
        }
        Ok(BzImage {
            header: &img[0x1f1..end],
            kernel: &img[pm..],
            initrd_addr_max: u32_at(img, 0x22c),
        })
    }
}

impl Vm {
    /// Loads a bzImage, an initramfs and a command line, and sets vCPU 0
    /// up at the 64-bit entry point.
    pub fn load_linux(
        &self,
        image: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> Result<(), VmError> {
        let bz = BzImage::parse(image)?;
        if cmdline.len() > CMDLINE_MAX {
            return Err(VmError::Config(format!(
                "command line over {CMDLINE_MAX} bytes"
            )));
        }
        let mem = self.mem_bytes();
        let m = self.guest_memory();
        let w = |addr: u64, b: &[u8]| {
            m.write_slice(b, GuestAddress(addr))
                .map_err(|e| VmError::Memory(format!("write {addr:#x}: {e}")))
        };
        if KERNEL + bz.kernel.len() as u64 > mem {
            return Err(VmError::Config(
                "the kernel does not fit in the VM's memory".into(),
            ));
        }
        w(KERNEL, bz.kernel)?;
        let mut cl = cmdline.as_bytes().to_vec();
        cl.push(0);
        w(CMDLINE, &cl)?;
        // The zero page: the image's setup header, then what the loader fills in.
        let mut zp = vec![0u8; 4096];
        zp[0x1f1..0x1f1 + bz.header.len()].copy_from_slice(bz.header);
        zp[0x210] = 0xff; // type_of_loader: undefined
        zp[0x211] |= 0x80 | 0x01; // CAN_USE_HEAP, LOADED_HIGH
        zp[0x224..0x226].copy_from_slice(&0xfe00u16.to_le_bytes()); // heap_end_ptr
        zp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
        zp[0x238..0x23c].copy_from_slice(&(CMDLINE_MAX as u32).to_le_bytes());
        if let Some(rd) = initrd {
            let top = mem.min(u64::from(bz.initrd_addr_max) + 1);
            let at = top.saturating_sub(rd.len() as u64) & !0xfff;
            if at < KERNEL + bz.kernel.len() as u64 {
                return Err(VmError::Config(
                    "the initramfs does not fit below the kernel's limit".into(),
                ));
            }
            w(at, rd)?;
            zp[0x218..0x21c].copy_from_slice(&(at as u32).to_le_bytes());
            zp[0x21c..0x220].copy_from_slice(&(rd.len() as u32).to_le_bytes());
        }
        // E820: low memory below the EBDA, and everything from 1 MiB.
        let e820 = [(0u64, 0x9fc00u64, 1u32), (KERNEL, mem - KERNEL, 1)];
        zp[0x1e8] = e820.len() as u8;
        for (i, (addr, size, kind)) in e820.iter().enumerate() {
            let at = 0x2d0 + i * 20;
            zp[at..at + 8].copy_from_slice(&addr.to_le_bytes());
            zp[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
            zp[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
        }
        w(ZERO_PAGE, &zp)?;
        // Ring 0, interrupts off, at the 64-bit entry (startup_64 loads its
        // own GDT at once).
        self.setup_long_mode(0, KERNEL + 0x200, 0, ZERO_PAGE, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(version: u16, xload: u16) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[0x1f1] = 1;
        b[0x1fe..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
        b[0x201] = 0x66;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&xload.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        b
    }

    #[test]
    fn bzimage_headers_are_checked() {
        let ok = fake(0x020f, 1);
        let bz = BzImage::parse(&ok).unwrap();
        assert_eq!(bz.kernel.len(), 0x1000 - 1024);
        assert_eq!(bz.initrd_addr_max, 0x37ff_ffff);
        let old = BzImage::parse(&fake(0x020b, 1)).unwrap_err();
        assert_eq!(old, BzImageError::TooOld(0x020b));
        assert!(old.to_string().contains("2.11 is too old"), "{old}");
        assert_eq!(
            BzImage::parse(&fake(0x020f, 0)).unwrap_err(),
            BzImageError::No64BitEntry
        );
        assert!(BzImage::parse(&ok[..0x100]).is_err());
        let mut bad = ok.clone();
        bad[0x202] = b'X';
        assert!(BzImage::parse(&bad).is_err());
    }
}
