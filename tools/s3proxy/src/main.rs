//! `s3proxy --upstream 127.0.0.1:PORT [--delay-ms 25] [--fault SPEC]...`: prints the address it
//! listens on, runs until SIGTERM/SIGINT, then writes its counters (`--stats-file`, else stderr).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use s3proxy::{Proxy, ProxyConfig, Rule};

#[derive(Parser)]
#[command(about = "Delay and fault-injecting HTTP proxy in front of an S3 test server")]
struct Args {
    /// The S3 server, host:port.
    #[arg(long)]
    upstream: SocketAddr,
    /// Where to listen (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Added to every request, concurrently.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Seed of the fault dice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KIND[=ARG][,method=M][,path=SUBSTR][,nth=N][,p=PROB][,limit=N]; KIND: 500, 503, slowdown,
    /// reset, stall=SECS, truncate, corrupt, drop-response, stale. Repeatable; first match wins.
    #[arg(long = "fault")]
    faults: Vec<Rule>,
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Also write the listening address here.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Counters written here at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut config = ProxyConfig::new(args.upstream);
    config.listen = args.listen;
    config.delay = Duration::from_millis(args.delay_ms);
    config.seed = args.seed;
    config.rules = args.faults;
    config.max_connections = args.max_connections;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let proxy = Proxy::start(config)?;
    if let Some(path) = &args.addr_file {
        std::fs::write(path, format!("{}\n", proxy.addr()))?;
    }
    println!("{}", proxy.addr());
    std::io::stdout().flush()?;
    let _ = signals.forever().next();
    let stats = proxy.stop();
    match &args.stats_file {
        Some(path) => std::fs::write(path, stats.to_string())?,
        None => eprint!("{stats}"),
    }
    Ok(())
}
