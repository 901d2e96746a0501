//! Every input the fuzzer ever found a panic with (files under `regressions/<target>/`) runs
//! through its target again; plus a short fuzzing run per target, so CI exercises the harness.

#[test]
fn saved_inputs_no_longer_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut seen = 0;
    for t in gingham_fuzz::targets() {
        let dir = root.join(t.name);
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let input = std::fs::read(entry.path()).unwrap();
            if let Some(msg) = gingham_fuzz::try_one(t.check, &input) {
                panic!("{} panics again: {msg}", entry.path().display());
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "the regression corpus is empty");
}

#[test]
fn a_short_run_of_every_target_finds_nothing() {
    std::panic::set_hook(Box::new(|_| {}));
    for t in gingham_fuzz::targets() {
        let out = gingham_fuzz::run(&t, 7, 20_000, gingham_fuzz::accepted);
        assert!(out.panics.is_empty(), "{}: {:?}", t.name, out.panics.iter().map(|(_, m)| m).collect::<Vec<_>>());
        // The generators must reach past the first token.
        assert!(
            out.accepted * 20 > out.inputs,
            "{}: only {} of {} inputs were valid",
            t.name,
            out.accepted,
            out.inputs
        );
    }
}
