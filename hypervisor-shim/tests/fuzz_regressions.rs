//! Every input the fuzzers keep (`fuzz/seeds/<target>/`, and a sample of
//! the corpus they grew in `fuzz/regressions/<target>/`) through the same
//! harness as the fuzz target: a regression of any of them fails here,
//! in the ordinary test run.

include!("../../tests/kept_inputs.rs");
include!("../fuzz/harness/stream.rs");
include!("../fuzz/harness/qmp.rs");

kept_inputs_test!(stream_kept_inputs_pass, "stream", stream::run);
kept_inputs_test!(qmp_kept_inputs_pass, "qmp", qmp::run);
