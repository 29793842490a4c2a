//! Arbitrary bytes as a VM state stream (a save file or what a migration
//! source sends): every frame and payload is checked, nothing panics.
#![no_main]

use hypervisor_shim::stream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stream::inspect(&mut &data[..]);
    // The payload decoders on their own, as a receiver meets them.
    let _ = stream::Hello::decode(data);
    let _ = stream::PagesHead::decode(data, 1 << 30);
    let _ = stream::VmState::decode(data);
    let _ = stream::VcpuState::decode(data);
    let _ = stream::DeviceState::decode(data);
    let _ = stream::Status::decode(data);
});
