// Arbitrary bytes as a VM state stream (a save file or what a migration
// source sends): every frame and payload is checked, nothing panics.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod stream {
    use hypervisor_shim::stream;

    /// One input.
    pub fn run(data: &[u8]) {
        let _ = stream::inspect(&mut &data[..]);
        // The payload decoders on their own, as a receiver meets them.
        let _ = stream::Hello::decode(data);
        let _ = stream::PagesHead::decode(data, 1 << 30);
        let _ = stream::VmState::decode(data);
        let _ = stream::VcpuState::decode(data);
        let _ = stream::DeviceState::decode(data);
        let _ = stream::Status::decode(data);
    }
}
