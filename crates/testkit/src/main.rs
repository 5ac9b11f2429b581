//! `blockmirror-testkit`: test tools for blockmirror.
//!
//! ```text
//! blockmirror-testkit history write --uri nbd://127.0.0.1:10809/db --log h.log --blocks 4096 --seconds 10
//! blockmirror-testkit history check --image mirror.img --log h.log [--require flushed|acked|prefix]
//! blockmirror-testkit delay-proxy --listen 127.0.0.1:7702 --to 127.0.0.1:7701 --delay 5ms [--rate 100MiB]
//! ```
//!
//! `check` exits 0 when the image keeps the promise, 1 when it does not, 2
//! on an error (unreadable log or image).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blockmirror_testkit::delay::{self, DelayProxy, Shape};
use blockmirror_testkit::history::{self, Require};
use blockmirror_testkit::writer::{self, End, Progress, WriterConfig};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "blockmirror-testkit",
    version,
    about = "Test tools for blockmirror"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Record a write history against an NBD export, or check an image against one.
    History {
        #[command(subcommand)]
        command: HistoryCmd,
    },
    /// Forward TCP connections to one address with added one-way delay and a
    /// bandwidth limit (a WAN stand-in), until interrupted.
    DelayProxy {
        /// Where to listen (HOST:PORT).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Where to forward (HOST:PORT); the only address traffic goes to.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// One-way delay, e.g. 5ms.
        #[arg(long, default_value = "0", value_parser = delay::parse_duration)]
        delay: Duration,
        /// Bandwidth per direction, e.g. 100MiB (per second); unlimited if absent.
        #[arg(long, value_parser = delay::parse_rate)]
        rate: Option<u64>,
    },
}

#[derive(Subcommand)]
enum HistoryCmd {
    /// Write self-describing blocks with periodic FLUSHes, logging every issue and reply.
    Write {
        /// The NBD export (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH).
        #[arg(long)]
        uri: String,
        /// The history log to create.
        #[arg(long)]
        log: PathBuf,
        /// How many blocks to spread the writes over.
        #[arg(long, default_value_t = 4096)]
        blocks: u64,
        /// How long to write.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Byte offset of block 0.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        queue_depth: usize,
        /// A FLUSH after this many writes (0: never).
        #[arg(long, default_value_t = 32)]
        flush_every: u64,
        #[arg(long, default_value_t = 0x1234_5678)]
        seed: u64,
    },
    /// Check an image (file or device) against a history log.
    Check {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        log: PathBuf,
        /// The promise to hold the image to.
        #[arg(long, value_enum, default_value_t = RequireArg::Flushed)]
        require: RequireArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RequireArg {
    /// Every write covered by a successful FLUSH is present.
    Flushed,
    /// Every acknowledged write is present.
    Acked,
    /// The image is dependency closed (async mirrors).
    Prefix,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Top::History { command } => command,
        Top::DelayProxy {
            listen,
            to,
            delay,
            rate,
        } => return delay_proxy(listen, to, Shape { delay, rate }),
    };
    match command {
        HistoryCmd::Write {
            uri,
            log,
            blocks,
            seconds,
            block_size,
            offset,
            queue_depth,
            flush_every,
            seed,
        } => {
            let cfg = WriterConfig {
                uri,
                log,
                blocks,
                block_size,
                offset,
                queue_depth,
                flush_every,
                duration: Duration::from_secs_f64(seconds),
                seed,
                first_seq: 1,
            };
            match writer::run(&cfg, &Progress::default()) {
                Ok(s) => {
                    println!(
                        "writes: {} issued, {} acknowledged, {} failed; flushes: {} issued, {} acknowledged; {} unanswered",
                        s.writes_issued, s.writes_acked, s.writes_failed, s.flushes_issued, s.flushes_acked, s.unanswered
                    );
                    match s.end {
                        End::Finished => println!("finished"),
                        End::ConnectionLost(r) => println!("connection lost: {r}"),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("blockmirror-testkit: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        HistoryCmd::Check {
            image,
            log,
            require,
        } => match history::check_image(&image, &log) {
            Ok(rep) => {
                print!("{}", rep.summary());
                let r = match require {
                    RequireArg::Flushed => Require::Flushed,
                    RequireArg::Acked => Require::Acked,
                    RequireArg::Prefix => Require::Prefix,
                };
                if rep.holds(r) {
                    println!("OK");
                    ExitCode::SUCCESS
                } else {
                    println!("FAILED");
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("blockmirror-testkit: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn delay_proxy(listen: std::net::SocketAddr, to: std::net::SocketAddr, shape: Shape) -> ExitCode {
    match DelayProxy::start(listen, to, shape) {
        Ok(p) => {
            println!(
                "forwarding {} -> {to}, one-way delay {:?}, rate {}",
                p.addr(),
                shape.delay,
                shape
                    .rate
                    .map_or("unlimited".to_string(), |r| format!("{r} B/s"))
            );
            // Runs until the process is interrupted.
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("blockmirror-testkit: delay-proxy on {listen}: {e}");
            ExitCode::from(2)
        }
    }
}
