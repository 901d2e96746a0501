//! `gingham-fuzz [selector|cni|documents|all] [--iterations N] [--seed S] [--save DIR]`: run
//! the targets (1,000,000 inputs each by default), print what share the parsers accepted, save
//! any input that panicked under DIR (default `fuzz-crashes/`), exit 1 if one did.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut which = "all".to_string();
    let mut iterations: u64 = 1_000_000;
    let mut seed: u64 = 0x6769_6e67;
    let mut save = std::path::PathBuf::from("fuzz-crashes");
    let mut i = 0;
    while i < args.len() {
        let next = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--iterations" => iterations = next.parse().unwrap_or(iterations),
            "--seed" => seed = next.parse().unwrap_or(seed),
            "--save" => save = next.into(),
            t if !t.starts_with('-') => {
                which = t.to_string();
                i += 1;
                continue;
            }
            other => {
                eprintln!("unknown option {other}");
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    // Panics are caught and reported per input; keep their messages off the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = false;
    for t in gingham_fuzz::targets().iter().filter(|t| which == "all" || t.name == which) {
        let started = std::time::Instant::now();
        let out = gingham_fuzz::run(t, seed, iterations, gingham_fuzz::accepted);
        println!(
            "{:<10} {:>9} inputs in {:>6.1} s, {:>5.1}% accepted by the parser, {} panics",
            t.name,
            out.inputs,
            started.elapsed().as_secs_f64(),
            out.accepted as f64 * 100.0 / out.inputs.max(1) as f64,
            out.panics.len()
        );
        println!(
            "  slowest input: {:.1} ms ({} bytes): {:?}",
            out.slowest.0.as_secs_f64() * 1e3,
            out.slowest.1.len(),
            String::from_utf8_lossy(&out.slowest.1[..out.slowest.1.len().min(120)])
        );
        for (input, msg) in &out.panics {
            failed = true;
            let _ = std::fs::create_dir_all(&save);
            let name = format!("{}-{:016x}", t.name, fnv(input));
            let path = save.join(&name);
            let _ = std::fs::write(&path, input);
            println!(
                "  PANIC: {msg}\n    input saved as {} (copy it to crates/fuzz/regressions/{}/)",
                path.display(),
                t.name
            );
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3))
}
