// The kept inputs of the fuzz targets (`fuzz/seeds/<target>/`, and a sample
// of the corpus they grew in `fuzz/regressions/<target>/`), for the
// `tests/fuzz_regressions.rs` of each crate with fuzz targets, which
// includes this file next to its targets' harnesses.

/// A test named `$test` that runs every kept input of fuzz target
/// `$target` (of the crate being tested) through `$run`, its harness.
macro_rules! kept_inputs_test {
    ($test:ident, $target:literal, $run:path) => {
        #[test]
        fn $test() {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
            let mut files = Vec::new();
            for dir in ["seeds", "regressions"] {
                if let Ok(rd) = std::fs::read_dir(root.join(dir).join($target)) {
                    files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
                }
            }
            files.sort();
            assert!(!files.is_empty(), "no kept inputs for {}", $target);
            for f in files {
                let data = std::fs::read(&f).unwrap();
                $run(&data);
            }
        }
    };
}
