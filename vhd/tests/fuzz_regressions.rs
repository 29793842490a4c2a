//! Every input the fuzzers keep (`fuzz/seeds/<target>/`, and a sample of
//! the corpus they grew in `fuzz/regressions/<target>/`) through the same
//! harness as the fuzz target: a regression of any of them fails here,
//! in the ordinary test run.

include!("../../tests/kept_inputs.rs");
include!("../fuzz/harness/open_read.rs");
include!("../fuzz/harness/vhdx_open_read.rs");

kept_inputs_test!(open_read_kept_inputs_pass, "open_read", open_read::run);
kept_inputs_test!(
    vhdx_open_read_kept_inputs_pass,
    "vhdx_open_read",
    vhdx_open_read::run
);
