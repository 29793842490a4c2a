//! Builds the test guest (guest/testguest.S) with the system assembler and
//! linker into a flat binary that csv-vmm loads at 1 MiB.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (binutils: `as`, `ld`, `objcopy`)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = "guest/testguest.S";
    println!("cargo:rerun-if-changed={src}");
    let obj = out.join("testguest.o");
    let elf = out.join("testguest.elf");
    let bin = out.join("testguest.bin");
    run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(src));
    run(Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "--no-warn-rwx-segments",
            "-Ttext=0x100000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&elf)
        .arg(&bin));
}
