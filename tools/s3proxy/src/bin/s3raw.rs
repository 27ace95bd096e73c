//! The benchmark's "raw limit" client: PUTs then GETs whole objects in parallel, with no FUSE and
//! no block layers, and prints MiB/s of each phase, e.g. `put_mib_s 812.3` and `get_mib_s 990.1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

#[derive(Parser)]
struct Args {
    /// e.g. http://127.0.0.1:9000/
    #[arg(long)]
    base_url: url::Url,
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "testkey")]
    access_key: String,
    #[arg(long, default_value = "testsecret")]
    secret_key: String,
    /// Total bytes moved per phase, MiB.
    #[arg(long, default_value_t = 1024)]
    total_mib: usize,
    /// Object size, KiB.
    #[arg(long, default_value_t = 1024)]
    object_kib: usize,
    #[arg(long, default_value_t = 20)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    let bucket = Bucket::new(
        args.base_url.clone(),
        UrlStyle::Path,
        args.bucket.clone(),
        "us-east-1",
    )
    .expect("bucket");
    let creds = Credentials::new(args.access_key.clone(), args.secret_key.clone());
    let size = args.object_kib * 1024;
    let count = args.total_mib * 1024 / args.object_kib;
    let config = ureq::Agent::config_builder()
        .http_status_as_error(true)
        .max_idle_connections(args.threads)
        .max_idle_connections_per_host(args.threads)
        .timeout_global(Some(Duration::from_secs(120)))
        .build();
    // The same transport as s3backer's, so the raw limit is not held back by delayed ACKs.
    let agent = ureq::Agent::with_parts(
        config,
        ureq_quickack::QuickAckConnector,
        ureq::unversioned::resolver::DefaultResolver::default(),
    );
    let shared = Arc::new((bucket, creds, agent));
    let mut payload = vec![0u8; size];
    let mut rng = fastrand::Rng::with_seed(1);
    rng.fill(&mut payload);
    let payload = Arc::new(payload);
    for phase in ["put", "get"] {
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let workers: Vec<_> = (0..args.threads)
            .map(|_| {
                let (shared, next, payload) = (shared.clone(), next.clone(), payload.clone());
                std::thread::spawn(move || {
                    let (bucket, creds, agent) = &*shared;
                    let mut buf = Vec::with_capacity(payload.len());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let key = format!("raw/{i:08x}");
                        let ttl = Duration::from_secs(600);
                        if phase == "put" {
                            let url = bucket.put_object(Some(creds), &key).sign(ttl);
                            agent.put(url.as_str()).send(&payload[..]).expect("PUT");
                        } else {
                            let url = bucket.get_object(Some(creds), &key).sign(ttl);
                            let mut resp = agent.get(url.as_str()).call().expect("GET");
                            buf.clear();
                            std::io::copy(&mut resp.body_mut().as_reader(), &mut buf)
                                .expect("GET body");
                            assert_eq!(buf.len(), payload.len(), "short GET");
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{phase}_mib_s {:.1}",
            (count * size) as f64 / 1048576.0 / secs
        );
    }
}
