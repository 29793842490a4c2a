// Arbitrary bytes as a line QEMU sends on its QMP socket (a greeting, a
// reply, an error, an event), and the replies read as the types the qemu
// engine asks for: every input is an answer or an error, nothing panics.
//
// Shared by the fuzz target and the crate's `fuzz_regressions` test, which
// runs every kept input (`fuzz/seeds/`, `fuzz/regressions/`) through it.

#[allow(dead_code, unused_imports)]
mod qmp {
    use hypervisor_shim::qemu::qmp::{self, Message, MigrationInfo, StatusInfo};

    /// One input.
    pub fn run(data: &[u8]) {
        if let Ok(Message::Return { value }) = qmp::parse(data) {
            let _ = serde_json::from_value::<MigrationInfo>(value.clone());
            let _ = serde_json::from_value::<StatusInfo>(value);
        }
    }
}
