//! Long simulation campaigns: `cargo run -p blockmirror-sim --release --
//! --seeds 100000 [--from S]`, or `-- --seed S` to replay one seed with its
//! trace.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 10_000u64;
    let mut from = 0u64;
    let mut one = None;
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| -> u64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--seeds" => seeds = val(i),
            "--from" => from = val(i),
            "--seed" => one = Some(val(i)),
            other => panic!("unknown argument {other} (--seeds N, --from S, --seed S)"),
        }
        i += 2;
    }
    if let Some(s) = one {
        match blockmirror_sim::run(s, true) {
            Ok(sum) => println!("seed {s} passed: {sum:?}"),
            Err(f) => {
                eprintln!("{f}");
                std::process::exit(1);
            }
        }
        return;
    }
    let t = Instant::now();
    let mut failed = 0;
    for s in from..from + seeds {
        if let Err(f) = blockmirror_sim::check_seed(s) {
            failed += 1;
            eprintln!("{f}");
            if failed >= 3 {
                break;
            }
        }
    }
    println!(
        "{} seeds from {from}, {failed} failed, in {:.1?}",
        seeds,
        t.elapsed()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
