//! Replays the fuzz corpus through each target's body, on stable: the
//! committed seeds (`tests/fuzz/corpus/<target>/`) and every input a
//! fuzzer found a bug with (`tests/fuzz/regressions/<target>/`), so what
//! was found stays fixed. The targets themselves run with `cargo fuzz`
//! (see `tests/fuzz/README.md`).

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in roboger_tests::fuzz::TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "target {name} has no fuzz_targets/{name}.rs"
        );
        let mut seeds = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                let data = std::fs::read(&path).expect("read a corpus file");
                let run = std::panic::catch_unwind(|| target(&data));
                assert!(run.is_ok(), "{name} fails on {}", path.display());
                seeds += 1;
            }
        }
        assert!(seeds > 0, "target {name} has no corpus");
    }
}
