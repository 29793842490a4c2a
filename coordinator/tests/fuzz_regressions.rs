//! Every input the fuzzers keep (`fuzz/seeds/<target>/`, and a sample of
//! the corpus they grew in `fuzz/regressions/<target>/`) through the same
//! harness as the fuzz target: a regression of any of them fails here,
//! in the ordinary test run.

include!("../fuzz/harness/join_token.rs");
include!("../fuzz/harness/rpc.rs");

fn inputs(target: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        if let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) {
            out.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    out.sort();
    out
}

#[test]
fn join_token_kept_inputs_pass() {
    let files = inputs("join_token");
    assert!(!files.is_empty(), "no kept inputs for join_token");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        join_token::run(&data);
    }
}

#[test]
fn rpc_kept_inputs_pass() {
    let files = inputs("rpc");
    assert!(!files.is_empty(), "no kept inputs for rpc");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        rpc::run(&data);
    }
}
