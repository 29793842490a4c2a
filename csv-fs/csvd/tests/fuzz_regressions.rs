//! Every input the fuzzers keep (`fuzz/seeds/<target>/`, and a sample of
//! the corpus they grew in `fuzz/regressions/<target>/`) through the same
//! harness as the fuzz target: a regression of any of them fails here,
//! in the ordinary test run.

include!("../../../tests/kept_inputs.rs");
include!("../fuzz/harness/config.rs");

kept_inputs_test!(config_kept_inputs_pass, "config", config::run);
