//! Every input the fuzzers keep (`fuzz/seeds/<target>/`, and a sample of
//! the corpus they grew in `fuzz/regressions/<target>/`) through the same
//! harness as the fuzz target: a regression of any of them fails here,
//! in the ordinary test run.

include!("../../tests/kept_inputs.rs");
include!("../fuzz/harness/join_token.rs");
include!("../fuzz/harness/rpc.rs");

kept_inputs_test!(join_token_kept_inputs_pass, "join_token", join_token::run);
kept_inputs_test!(rpc_kept_inputs_pass, "rpc", rpc::run);
