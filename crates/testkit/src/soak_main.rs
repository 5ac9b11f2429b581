//! `blockmirror-soak`: runs a primary and a mirror node on loopback under
//! the history writer and injects one seeded fault per cycle (see the
//! library's `soak` module). Prints one line per cycle and last the summary
//! line `cycles=N writes_checked=W violations=V seed=S ...`.
//!
//! Exit status: 0 when every cycle kept every guarantee, 1 on violations,
//! 2 when the soak could not run, 3 on a hang (a cycle past its deadline).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blockmirror_testkit::soak::{self, Fault, Mode, SoakConfig, SoakError};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Sync,
    Async,
}

#[derive(Parser)]
#[command(
    name = "blockmirror-soak",
    version,
    about = "Seeded fault soak of a blockmirror primary and mirror on loopback, checked with the history checker"
)]
struct Cli {
    /// The mirroring mode of the pair.
    #[arg(long, value_enum)]
    mode: ModeArg,
    /// How many cycles to run (one fault each).
    #[arg(long)]
    cycles: u64,
    /// The seed every choice comes from (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to make the run's directory (default: the temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of the first cycle: `--first-cycle C --cycles 1` replays
    /// cycle C of a run with the same seed, on a fresh pair.
    #[arg(long, default_value_t = 0)]
    first_cycle: u64,
    /// The `blockmirror` binary (default: BLOCKMIRROR_BIN, else next to this one).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Seconds a cycle may take before it counts as a hang.
    #[arg(long, default_value_t = 120)]
    cycle_deadline: u64,
    /// Only these faults (comma separated): kill-primary, kill-mirror,
    /// cut-link, net, mirror-disk, switch-mode, promote-failback.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Keep the run's directory (node logs, histories) even when it passed.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 & 0xffff_ffff_ffff)
    });
    let Some(bin) = cli.bin.or_else(soak::find_blockmirror) else {
        eprintln!(
            "blockmirror-soak: cannot find the blockmirror binary: pass --bin, set BLOCKMIRROR_BIN, \
             or build it (cargo build -p blockmirror) next to this one"
        );
        return ExitCode::from(2);
    };
    let mut faults = Vec::new();
    for f in &cli.faults {
        match Fault::parse(f) {
            Some(x) => faults.push(x),
            None => {
                eprintln!("blockmirror-soak: unknown fault {f:?}");
                return ExitCode::from(2);
            }
        }
    }
    let cfg = SoakConfig {
        mode: match cli.mode {
            ModeArg::Sync => Mode::Sync,
            ModeArg::Async => Mode::Async,
        },
        cycles: cli.cycles,
        first_cycle: cli.first_cycle,
        seed,
        dir: cli.dir,
        bin,
        cycle_deadline: Duration::from_secs(cli.cycle_deadline),
        faults,
        keep: cli.keep,
    };
    let mut out = |line: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    };
    match soak::run(&cfg, &mut out) {
        Ok(s) => {
            out(&s.line());
            if s.violations == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("blockmirror-soak: {e}");
            match e {
                SoakError::Hang { .. } | SoakError::NodeDied { .. } => ExitCode::from(3),
                _ => ExitCode::from(2),
            }
        }
    }
}
