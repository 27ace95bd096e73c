//! Security: secrets never reach logs, `--debug-http` output or the stats file; the cache file
//! is private; `--insecure` warns; the password prompt does not echo.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{FuseMount, ours, pseudo_random, write_and_fsync};
use common::{ACCESS_KEY, S3Server, SECRET_KEY};

const BUCKET: &str = "secrets";
const PASSWORD: &str = "Pw-Zebra-7f3a9c-secret";
const SESSION_TOKEN: &str = "SessTok-Quokka-5b1e-secret";

/// Every secret a mount was given, and the distinctive parts of each (so a secret cut or
/// re-quoted in a log line is found too).
fn leaked(text: &str) -> Vec<&'static str> {
    [
        SECRET_KEY,
        PASSWORD,
        SESSION_TOKEN,
        "Zebra-7f3a9c",
        "Quokka-5b1e",
    ]
    .into_iter()
    .filter(|s| text.contains(s))
    .collect()
}

fn base_args(server: &S3Server) -> Vec<String> {
    vec![
        format!("--baseURL={}", server.base_url()),
        "--timeout=1".to_string(),
        "--initialRetryPause=50".to_string(),
        "--maxRetryPause=300".to_string(),
        "--size=1m".to_string(),
        "--blockSize=64k".to_string(),
    ]
}

#[test]
fn secrets_never_appear_in_debug_logs_http_traces_errors_or_stats() {
    let mut server = S3Server::start(&[BUCKET]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let mut args = base_args(&server);
    args.extend([
        "--debug".to_string(),
        "--debug-http".to_string(),
        "--encrypt".to_string(),
        format!("--password={PASSWORD}"),
        format!("--blockCacheFile={}", cache.display()),
    ]);
    // Credentials from the environment, with a session token that every request carries.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_SESSION_TOKEN", SESSION_TOKEN),
    ] {
        // SAFETY: nextest runs each test in its own process, and no other thread reads the
        // environment here; the spawned s3backer inherits it.
        unsafe { std::env::set_var(k, v) };
    }
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    write_and_fsync(&mount.file(), &pseudo_random(3, 256 * 1024)).unwrap();
    let stats = mount.stats();
    // Errors too: the store goes away and a read of an uncached block is retried, then fails.
    server.stop();
    let file = std::fs::File::open(mount.file()).unwrap();
    let mut buf = vec![0u8; 4096];
    let _ = file.read_at(&mut buf, 900 * 1024);
    drop(file);
    let log = mount.stderr();
    drop(mount);

    assert!(
        log.contains("HTTP request: PUT"),
        "no HTTP trace in:\n{log}"
    );
    assert!(log.contains("cannot connect"), "no error in:\n{log}");
    assert!(
        leaked(&log).is_empty(),
        "{:?} leaked into the log:\n{log}",
        leaked(&log)
    );
    assert!(
        leaked(&stats).is_empty(),
        "{:?} leaked into stats:\n{stats}",
        leaked(&stats)
    );
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "cache file mode {mode:o}");
    println!(
        "secrets: {} log lines with --debug --debug-http (requests, errors) and the stats file \
         hold no secret; cache file mode 0600",
        log.lines().count()
    );
}

#[test]
fn insecure_warns() {
    let server = S3Server::start(&[BUCKET]);
    let mut args = base_args(&server);
    args.extend([
        format!("--accessId={ACCESS_KEY}"),
        format!("--accessKey={SECRET_KEY}"),
        "--insecure".to_string(),
    ]);
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    let done = mount.unmount();
    assert!(
        done.stderr
            .lines()
            .any(|l| l.contains("warning") && l.contains("--insecure")),
        "{}",
        done.stderr
    );
}

/// The prompt runs on a pseudo-terminal (`script`): what the terminal shows must not include the
/// typed password, and the password must still be taken (the verify run succeeds).
#[test]
fn the_password_prompt_does_not_echo() {
    let server = S3Server::start(&[BUCKET]);
    let mut cmd = vec![ours().display().to_string()];
    cmd.extend(base_args(&server));
    cmd.extend([
        format!("--accessId={ACCESS_KEY}"),
        format!("--accessKey={SECRET_KEY}"),
        "--encrypt".to_string(),
        "--verify".to_string(),
        BUCKET.to_string(),
    ]);
    let mut child = Command::new("script")
        .args(["-qec", &cmd.join(" "), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 256];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 || tx.send(chunk[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Type only once the prompt is shown: earlier input would be echoed before echo is off.
    let mut shown = Vec::new();
    let start = Instant::now();
    while !String::from_utf8_lossy(&shown).contains("Password:") {
        assert!(start.elapsed() < Duration::from_secs(20), "no prompt");
        if let Ok(bytes) = rx.recv_timeout(Duration::from_millis(200)) {
            shown.extend(bytes);
        }
    }
    // The prompt is up; give the program a moment to switch echo off before typing.
    std::thread::sleep(Duration::from_millis(300));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    let status = child.wait().unwrap();
    drop(stdin);
    reader.join().unwrap();
    shown.extend(rx.try_iter().flatten());
    let shown = String::from_utf8_lossy(&shown).into_owned();
    assert!(
        status.success(),
        "verify with a typed password failed:\n{shown}"
    );
    assert!(shown.contains("all intact"), "{shown}");
    assert!(
        !shown.contains(PASSWORD),
        "the password was echoed:\n{shown}"
    );
}
