//! Every input the fuzzers keep (`fuzz/seeds/<target>/`, and a sample of
//! the corpus they grew in `fuzz/regressions/<target>/`) through the same
//! harness as the fuzz target: a regression of any of them fails here,
//! in the ordinary test run.

include!("../../tests/kept_inputs.rs");
include!("../fuzz/harness/pdu.rs");
include!("../fuzz/harness/text.rs");

kept_inputs_test!(pdu_kept_inputs_pass, "pdu", pdu::run);
kept_inputs_test!(text_kept_inputs_pass, "text", text::run);
