//! Operations: generated docs match the spec's flag table, fstab lines mount through mount.fuse3,
//! the example systemd units are valid, readiness reaches systemd's notify socket, logs are one
//! line per event at the level asked for, and (opt-in) the Debian package installs cleanly.

mod common;

#[path = "../examples/gen_docs.rs"]
#[allow(dead_code)]
mod gen_docs;

use common::S3Server;
use common::mount::{
    FuseMount, assert_fsck_clean, is_mounted, mkfs_ext4, ours, pseudo_random, run, verify_tree,
    write_tree,
};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Docs

/// One option of `--help` or the man page: its long names, whether it takes a value, its text.
#[derive(Debug)]
struct Entry {
    longs: Vec<String>,
    takes_value: bool,
    text: String,
}

impl Entry {
    fn new(flag_line: &str) -> Entry {
        let longs = flag_line
            .split_whitespace()
            .take_while(|word| !word.starts_with('['))
            .filter_map(|word| word.trim_end_matches(',').strip_prefix("--"))
            // `--compress[=<ALG>]`
            .map(|word| word.split(['[', '=']).next().unwrap_or(word).to_string())
            .collect();
        Entry {
            longs,
            takes_value: flag_line.contains('<'),
            text: flag_line.trim().to_string(),
        }
    }

    fn push(&mut self, line: &str) {
        self.text.push(' ');
        self.text.push_str(line.trim());
    }

    /// The text of `[default: ...]` (brackets nest: `http[s]://...`), or "".
    fn default(&self) -> &str {
        let Some(start) = self.text.find("[default: ") else {
            return "";
        };
        let rest = &self.text[start + "[default: ".len()..];
        let mut depth = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '[' => depth += 1,
                ']' if depth == 0 => return &rest[..i],
                ']' => depth -= 1,
                _ => {}
            }
        }
        panic!("unclosed [default: in {:?}", self.text);
    }
}

/// `--help`: an option line is indented less than its description (which starts at column 10).
fn help_entries(help: &str) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        if line.trim_start().starts_with('-') && indent < 10 {
            entries.push(Entry::new(line));
        } else if !line.starts_with(' ') {
            // A heading ends the previous entry.
            entries.push(Entry::new(""));
        } else if let Some(entry) = entries.last_mut() {
            entry.push(line);
        }
    }
    entries
}

/// The roff man page: each option is `.TP`, the option line, then its description.
fn man_entries(roff: &str) -> Vec<Entry> {
    let plain = roff
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
        .replace("\\(aq", "'")
        .replace("\\*(Aq", "'");
    let mut entries: Vec<Entry> = Vec::new();
    let mut after_tp = false;
    for line in plain.lines() {
        if line.starts_with('.') {
            after_tp = line.starts_with(".TP");
            entries.push(Entry::new(""));
        } else if after_tp {
            after_tp = false;
            entries.push(Entry::new(line));
        } else if let Some(entry) = entries.last_mut() {
            entry.push(line);
        }
    }
    entries
}

/// What the spec's default column pins down.
#[derive(Debug)]
enum Expected {
    /// A backquoted literal that the default must contain.
    Text(String),
    /// `off`, `none`, `unlimited`: a switch, or a value flag whose default says so.
    Word(String),
    /// The first number of the column (sizes compared by value: `4k` == 4096).
    Number(u64),
    /// Prose: the flag must exist.
    Anything,
}

fn expected(column: &str) -> Expected {
    if let Some(rest) = column.strip_prefix('`') {
        let literal = &rest[..rest.find('`').expect("closing backquote")];
        // `""` (empty prefix) is rendered as "none".
        return Expected::Text(if literal == "\"\"" { "none" } else { literal }.to_string());
    }
    let first = column.split([' ', ';', ',']).next().unwrap_or("");
    if ["off", "none", "unlimited"].contains(&first) {
        return Expected::Word(first.to_string());
    }
    match numbers(column).first() {
        Some(&n) => Expected::Number(n),
        None => Expected::Anything,
    }
}

/// Numbers that start a word, with an optional k/m/g/t suffix (powers of 1024).
fn numbers(text: &str) -> Vec<u64> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if bytes[i].is_ascii_digit() && word_start {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let mut n: u64 = text[start..i].parse().unwrap();
            let shift = match bytes.get(i).map(u8::to_ascii_lowercase) {
                Some(b'k') => 10,
                Some(b'm') => 20,
                Some(b'g') => 30,
                Some(b't') => 40,
                _ => 0,
            };
            if shift > 0 && !bytes.get(i + 1).is_some_and(u8::is_ascii_alphanumeric) {
                n <<= shift;
            }
            found.push(n);
        }
        i += 1;
    }
    found
}

/// tests/data/spec_flags.txt: `--flag<TAB>default column of spec table 8.2`.
fn spec_flags() -> Vec<(String, String)> {
    let text = include_str!("data/spec_flags.txt");
    let flags: Vec<_> = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (flag, default) = line.split_once('\t').expect("flag<TAB>default");
            (
                flag.trim_start_matches("--").to_string(),
                default.to_string(),
            )
        })
        .collect();
    assert!(flags.len() > 70, "spec table incomplete: {}", flags.len());
    flags
}

/// Problems of one document (help or man page) against the spec table.
fn check_against_spec(what: &str, entries: &[Entry]) -> Vec<String> {
    let mut problems = Vec::new();
    for (flag, column) in spec_flags() {
        let Some(entry) = entries.iter().find(|e| e.longs.contains(&flag)) else {
            problems.push(format!("{what}: --{flag} is missing"));
            continue;
        };
        let default = entry.default();
        let ok = match expected(&column) {
            Expected::Text(literal) => default.contains(&literal),
            Expected::Word(word) => !entry.takes_value || default.contains(&word),
            Expected::Number(n) => numbers(default).first() == Some(&n),
            Expected::Anything => true,
        };
        if !ok {
            problems.push(format!(
                "{what}: --{flag} shows [default: {default}], the spec says \"{column}\""
            ));
        }
    }
    problems
}

#[test]
fn help_and_man_page_list_every_spec_flag_with_the_spec_default() {
    let out = Command::new(ours()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let man = String::from_utf8(gen_docs::man_page()).unwrap();
    let help_entries = help_entries(&help);
    let man_entries = man_entries(&man);
    // The parsers see the options at all (guards against a format change making this vacuous).
    assert!(help_entries.iter().any(|e| e.default() == "30"));
    assert!(man_entries.iter().any(|e| e.default() == "30"));

    let mut problems = check_against_spec("--help", &help_entries);
    problems.extend(check_against_spec("man page", &man_entries));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(man.starts_with(".ie") || man.contains(".TH s3backer 1"));
}

#[test]
fn spec_default_parsing_catches_a_wrong_default() {
    let entries = help_entries(
        "Connection:\n      --timeout <SECONDS>\n          Timeout\n          \n          [default: 60]\n",
    );
    let problems = check_against_spec("test", &entries);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("--timeout shows [default: 60]")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("--blockSize is missing"))
    );
}

#[test]
fn shell_completions_offer_every_spec_flag() {
    for (shell, _) in gen_docs::SHELLS {
        let script = String::from_utf8(gen_docs::completion(shell)).unwrap();
        for (flag, _) in spec_flags() {
            // fish writes `-l flag`, bash and zsh `--flag`.
            let found =
                script.contains(&format!("--{flag}")) || script.contains(&format!("-l {flag}"));
            assert!(found, "{shell} completion lacks --{flag}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fstab

/// PIDs of processes whose command line mentions `path` (the daemons mount.fuse3 started).
fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// A daemon flushes after `umount` returns; wait (bounded) until it has exited.
fn wait_for_daemon_exit(mount_point: &Path) {
    let start = Instant::now();
    while !processes_mentioning(mount_point).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "s3backer for {} still running 120 s after umount",
            mount_point.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// mount(8) drops PATH before it runs a helper, and mount.fuse3 runs `/bin/sh -c 's3backer ...'`,
/// so an fstab line always runs the first `s3backer` of the shell's default PATH
/// (/usr/local/sbin, /usr/local/bin, /usr/sbin, /usr/bin: C s3backer here). This test process
/// thread gets its own mount namespace in which /usr/local/sbin holds only a link to the cargo
/// binary; nothing outside sees it. Mount namespaces are per thread: check mounts with
/// `mounted_here`, not /proc/self.
fn put_our_binary_first_in_the_default_path(bin: &Path) {
    // SAFETY: unshare has no memory-safety preconditions.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNS): {} (needs root, and a single-threaded test process as nextest gives)",
        std::io::Error::last_os_error()
    );
    run(Command::new("mount").args(["--make-rprivate", "/"]));
    std::os::unix::fs::symlink(ours(), bin.join("s3backer")).unwrap();
    run(Command::new("mount")
        .arg("--bind")
        .arg(bin)
        .arg("/usr/local/sbin"));
}

/// `fstype options` of the mount on `point` in this thread's mount namespace, if any.
fn mounted_here(point: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/thread-self/mounts").unwrap();
    let point = point.to_string_lossy();
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&point.as_ref()))
        .map(|f| format!("{} {}", f[2], f[3]))
}

/// Unmounts on drop (in this thread's namespace), even when the test fails.
struct Umount(PathBuf);

impl Drop for Umount {
    fn drop(&mut self) {
        if mounted_here(&self.0).is_some() {
            let ok = Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
}

/// `mount -T FSTAB POINT`.
fn mount_from_fstab(fstab: &Path, point: &Path) {
    run(Command::new("mount").arg("-T").arg(fstab).arg(point));
    assert!(
        mounted_here(point).is_some(),
        "{} not mounted",
        point.display()
    );
}

/// The FUSE daemon behind `point` is the cargo-built binary, not /usr/bin/s3backer (C).
fn assert_ours_serves(point: &Path) {
    let pids = processes_mentioning(point);
    assert_eq!(pids.len(), 1, "daemons for {}: {pids:?}", point.display());
    let exe = std::fs::read_link(format!("/proc/{}/exe", pids[0])).unwrap();
    assert_eq!(exe, ours().canonicalize().unwrap());
}

fn umount(point: &Path) {
    run(Command::new("umount").arg(point));
}

#[test]
fn fstab_lines_mount_through_mount_fuse3_with_a_loop_file_system_on_top() {
    let tmp = tempfile::Builder::new()
        .prefix("s3b-fstab")
        .tempdir()
        .unwrap();
    let dir = |name: &str| {
        let p = tmp.path().join(name);
        std::fs::create_dir(&p).unwrap();
        p
    };
    put_our_binary_first_in_the_default_path(&dir("bin"));
    let (store, legacy_store) = (dir("store"), dir("legacy-store"));
    let (disk, data, legacy) = (dir("disk"), dir("data"), dir("legacy"));
    let fstab = tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# fstab-only words (noauto, _netdev, nofail, defaults, x-systemd.*) must not reach the kernel\n\
             {store}  {disk}  fuse.s3backer  defaults,noauto,_netdev,nofail,x-systemd.requires=network-online.target,x-systemd.mount-timeout=60,test,size=32m,blockSize=64k,noatime  0 0\n\
             {disk}/file  {data}  ext4  loop,discard,noauto,nofail,x-systemd.requires-mounts-for={disk}  0 0\n\
             s3backer#{legacy_store}  {legacy}  fuse  noauto,_netdev,test,size=8m,blockSize=64k,filename=disk  0 0\n",
            store = store.display(),
            disk = disk.display(),
            data = data.display(),
            legacy_store = legacy_store.display(),
            legacy = legacy.display(),
        ),
    )
    .unwrap();

    // Write: disk, ext4 on its file, a tree of files; unmount in reverse order.
    let tree = {
        mount_from_fstab(&fstab, &disk);
        let _disk_guard = Umount(disk.clone());
        assert_eq!(
            std::fs::metadata(disk.join("file")).unwrap().len(),
            32 << 20
        );
        let options = mounted_here(&disk).unwrap();
        assert!(options.starts_with("fuse.s3backer "), "{options}");
        assert_ours_serves(&disk);
        mkfs_ext4(&disk.join("file"));
        mount_from_fstab(&fstab, &data);
        let data_guard = Umount(data.clone());
        let options = mounted_here(&data).unwrap();
        assert!(
            options.starts_with("ext4 ") && options.contains("discard"),
            "{options}"
        );
        let tree = write_tree(&data, 11, 12);
        drop(data_guard);
        assert!(mounted_here(&data).is_none());
        umount(&disk);
        tree
    };
    wait_for_daemon_exit(&disk);
    assert!(
        std::fs::read_dir(&store).unwrap().count() > 0,
        "nothing stored"
    );

    // Remount both from the same lines and read everything back.
    mount_from_fstab(&fstab, &disk);
    let disk_guard = Umount(disk.clone());
    mount_from_fstab(&fstab, &data);
    let data_guard = Umount(data.clone());
    verify_tree(&data, &tree);
    drop(data_guard);
    assert_fsck_clean(&disk.join("file"));
    drop(disk_guard);
    wait_for_daemon_exit(&disk);

    // The legacy `s3backer#SOURCE` form with type `fuse`.
    let bytes = pseudo_random(12, 300_000);
    mount_from_fstab(&fstab, &legacy);
    assert_ours_serves(&legacy);
    {
        let _guard = Umount(legacy.clone());
        std::fs::write(legacy.join("disk"), &bytes).unwrap();
    }
    wait_for_daemon_exit(&legacy);
    mount_from_fstab(&fstab, &legacy);
    let _guard = Umount(legacy.clone());
    let back = std::fs::read(legacy.join("disk")).unwrap();
    assert_eq!(back.len(), 8 << 20);
    assert_eq!(&back[..bytes.len()], &bytes[..]);
}

// ---------------------------------------------------------------------------------------------
// systemd

fn packaging_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

#[test]
fn example_systemd_units_pass_systemd_analyze_verify() {
    let units = packaging_dir().join("systemd");
    let files: Vec<PathBuf> = std::fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "service"))
    );
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "mount"))
    );
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&files)
        .output()
    else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (scripts/install-deps.sh installs it)"
        );
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
    // Stopping must wait for the flush: the service is stopped by SIGTERM with a long timeout.
    let service = std::fs::read_to_string(units.join("s3backer-vm1.service")).unwrap();
    for line in [
        "Type=notify",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "TimeoutStopSec=15min",
    ] {
        assert!(service.lines().any(|l| l == line), "service lacks {line}");
    }
    assert!(service.contains("ExecStart=/usr/bin/s3backer -f "));
}

/// A child s3backer killed and its mount detached on drop, even if the test fails.
struct Child {
    child: std::process::Child,
    mount_point: PathBuf,
}

impl Drop for Child {
    fn drop(&mut self) {
        if is_mounted(&self.mount_point) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn notify_socket_gets_ready_once_the_file_is_usable_and_stopping_at_unmount() {
    let tmp = tempfile::Builder::new()
        .prefix("s3b-notify")
        .tempdir()
        .unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&store).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Child {
        child: Command::new(ours())
            .args(["-f", "--test", "--size=16m", "--blockSize=64k"])
            .arg(&store)
            .arg(&mnt)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        mount_point: mnt.clone(),
    };
    let recv = |what: &str| {
        let mut buf = [0u8; 512];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {what} within 60 s: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    assert_eq!(recv("READY=1"), "READY=1\n");
    // The moment READY arrives, the file is there and takes I/O.
    assert!(is_mounted(&mnt));
    let file = mnt.join("file");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 16 << 20);
    let bytes = pseudo_random(21, 200_000);
    common::mount::write_and_fsync(&file, &bytes).unwrap();
    assert_eq!(common::mount::read_prefix(&file, bytes.len()), bytes);

    umount(&mnt);
    assert_eq!(recv("STOPPING=1"), "STOPPING=1\n");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no exit after unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // Nothing more was sent.
    socket.set_nonblocking(true).unwrap();
    assert!(socket.recv(&mut [0u8; 64]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Mounts with `env ENV... s3backer ARGS`, writes the file, unmounts; returns the stderr lines.
fn log_lines<S: AsRef<str>>(env: &[&str], args: &[S], bucket: &str) -> Vec<String> {
    let mut all: Vec<String> = env.iter().map(|s| s.to_string()).collect();
    all.push(ours().display().to_string());
    all.extend(args.iter().map(|s| s.as_ref().to_string()));
    let mount = FuseMount::start(Path::new("/usr/bin/env"), &all, bucket);
    std::fs::write(mount.file(), b"hello").unwrap();
    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    done.stderr.lines().map(str::to_string).collect()
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// Lines at info level (startup progress, mount and unmount).
fn info_lines(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| {
            l.strip_prefix("s3backer: ").is_some_and(|rest| {
                !["warning: ", "error: ", "debug: "]
                    .iter()
                    .any(|level| rest.starts_with(level))
            })
        })
        .collect()
}

const TEST_STORE: [&str; 3] = ["--test", "--size=4m", "--blockSize=64k"];

#[test]
fn log_levels_follow_debug_quiet_and_rust_log() {
    let store = tempfile::tempdir().unwrap();
    let bucket = store.path().to_str().unwrap();
    let with = |extra: &[&'static str]| [&TEST_STORE[..], extra].concat();

    let normal = log_lines(&[], &TEST_STORE, bucket);
    assert_eq!(count(&normal, "s3backer: mounted "), 1, "{normal:?}");
    assert_eq!(count(&normal, "debug: "), 0, "{normal:?}");

    let quiet = log_lines(&[], &with(&["--quiet"]), bucket);
    assert!(info_lines(&normal).len() >= 3, "{normal:?}");
    assert_eq!(
        info_lines(&quiet),
        Vec::<&String>::new(),
        "--quiet printed {quiet:?}"
    );

    let debug = log_lines(&[], &with(&["--debug"]), bucket);
    assert!(count(&debug, "s3backer: debug: ") >= 1, "{debug:?}");
    assert_eq!(count(&debug, "s3backer: mounted "), 1, "{debug:?}");

    // RUST_LOG wins over the flags, in both directions.
    let env_info = log_lines(&["RUST_LOG=s3backer=info"], &with(&["--quiet"]), bucket);
    assert_eq!(count(&env_info, "s3backer: mounted "), 1, "{env_info:?}");
    let env_quiet = log_lines(&["RUST_LOG=s3backer=warn"], &with(&["--debug"]), bucket);
    assert_eq!(count(&env_quiet, "debug: "), 0, "{env_quiet:?}");
    assert_eq!(
        info_lines(&env_quiet),
        Vec::<&String>::new(),
        "{env_quiet:?}"
    );
}

/// FUSE's multi-line warnings (e.g. "[Not Implemented] getxattr(ino: INodeNo(\n 0x2,\n), ...)")
/// must not leak into the log: one event is one line starting with "s3backer: ".
#[test]
fn every_log_line_is_one_whole_event() {
    let store = tempfile::tempdir().unwrap();
    let args = [&TEST_STORE[..], &["--debug"]].concat();
    let lines = log_lines(&[], &args, store.path().to_str().unwrap());
    for line in &lines {
        assert!(
            line.starts_with("s3backer: "),
            "stray log line {line:?} in {lines:#?}"
        );
    }
}

#[test]
fn debug_http_logs_each_request_and_response_on_one_line() {
    const BUCKET: &str = "logs";
    let server = S3Server::start(&[BUCKET]);
    let args = server.args(&["--size=4m", "--blockSize=64k", "--debug"]);
    let plain = log_lines(&[], &args, BUCKET);
    assert_eq!(count(&plain, "HTTP request"), 0, "{plain:?}");

    let http = log_lines(&[], &[&args[..], &["--debug-http".into()]].concat(), BUCKET);
    let requests = count(&http, "s3backer: debug: HTTP request: ");
    assert!(requests >= 2, "{http:?}");
    // Every request gets its response line (a retried request has one of each per attempt).
    assert_eq!(
        count(&http, "s3backer: debug: HTTP response: "),
        requests,
        "{http:?}"
    );
    assert!(http.iter().any(|l| l.contains("HTTP request: PUT ")));
    // The secret is not in any line (signatures are, the key is not).
    assert_eq!(count(&http, common::SECRET_KEY), 0);

    // RUST_LOG alone raises the level too.
    let no_debug = &args[..args.len() - 1];
    let env = log_lines(
        &["RUST_LOG=s3backer=debug"],
        &[no_debug, &["--debug-http".into()]].concat(),
        BUCKET,
    );
    assert!(
        count(&env, "s3backer: debug: HTTP request: ") >= 2,
        "{env:?}"
    );
}

/// Like C (which prints curl's verbose output), --debug-http alone shows the HTTP lines
/// although they are debug events and the level is otherwise info.
#[test]
fn debug_http_alone_shows_the_http_lines() {
    const BUCKET: &str = "logs";
    let server = S3Server::start(&[BUCKET]);
    let args = server.args(&["--size=4m", "--blockSize=64k", "--debug-http"]);
    let http = log_lines(&[], &args, BUCKET);
    assert!(
        count(&http, "s3backer: debug: HTTP request: ") >= 2,
        "{http:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Debian package

/// `S3BACKER_DEB`, else the newest target/debian/s3backer-rs_*.deb.
fn built_deb() -> PathBuf {
    if let Some(deb) = std::env::var_os("S3BACKER_DEB") {
        return PathBuf::from(deb);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no .deb in {}: run scripts/package.sh", dir.display()))
}

/// Every file and directory under `root`, relative, sorted.
fn tree_of(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                todo.push(path.clone());
            }
            found.push(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    found.sort();
    found
}

/// Checks the package without touching this machine's packages (C s3backer stays installed):
/// metadata and file list, then install + purge into an empty dpkg root.
#[test]
#[ignore = "opt-in (needs the release build and cargo-deb): scripts/package.sh runs it"]
fn debian_package_installs_and_purges_cleanly_in_a_throwaway_root() {
    let deb = built_deb();
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: s3backer-rs",
        "Conflicts: s3backer",
        "Replaces: s3backer",
        "Provides: s3backer",
    ] {
        assert!(
            info.lines().any(|l| l.trim() == field),
            "no {field:?} in:\n{info}"
        );
    }
    let depends = info
        .lines()
        .find(|l| l.trim().starts_with("Depends:"))
        .unwrap_or("");
    assert!(
        depends.contains("fuse3") && depends.contains("libc6"),
        "{depends}"
    );

    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for file in [
        "./usr/bin/s3backer",
        "./usr/share/man/man1/s3backer.1.gz",
        "./usr/share/bash-completion/completions/s3backer",
        "./usr/share/zsh/vendor-completions/_s3backer",
        "./usr/share/fish/vendor_completions.d/s3backer.fish",
        "./usr/share/doc/s3backer-rs/examples/s3backer-vm1.service",
        "./usr/share/doc/s3backer-rs/examples/mnt-data.mount",
        "./usr/share/doc/s3backer-rs/examples/fstab.example",
        "./usr/share/doc/s3backer-rs/copyright",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(file)),
            "{file} not in the package:\n{contents}"
        );
    }

    let root = tempfile::Builder::new()
        .prefix("s3b-dpkg")
        .tempdir()
        .unwrap();
    let db = root.path().join("var/lib/dpkg");
    for sub in ["info", "updates", "triggers", "alternatives"] {
        std::fs::create_dir_all(db.join(sub)).unwrap();
    }
    std::fs::write(db.join("status"), "").unwrap();
    std::fs::write(db.join("available"), "").unwrap();
    let dpkg = |args: &[&str]| {
        run(Command::new("dpkg")
            .arg(format!("--root={}", root.path().display()))
            .arg("--log=/dev/null")
            .arg("--force-depends")
            .args(args))
    };
    let before = tree_of(root.path());
    dpkg(&["-i", deb.to_str().unwrap()]);
    let installed = root.path().join("usr/bin/s3backer");
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert!(version.status.success());
    let version = String::from_utf8_lossy(&version.stderr);
    assert!(version.starts_with("s3backer version "), "{version}");
    let man = run(Command::new("zcat").arg(root.path().join("usr/share/man/man1/s3backer.1.gz")));
    assert!(man.contains(".TH s3backer 1"), "{man}");

    dpkg(&["-P", "s3backer-rs"]);
    // dpkg's own bookkeeping (status-old, locks) aside, nothing new may remain.
    let after: Vec<PathBuf> = tree_of(root.path())
        .into_iter()
        .filter(|p| !before.contains(p) && !p.starts_with("var/lib/dpkg"))
        .collect();
    assert!(after.is_empty(), "left behind after purge: {after:#?}");
    let leftovers: Vec<PathBuf> = tree_of(&db)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("s3backer"))
        .collect();
    assert!(leftovers.is_empty(), "dpkg database keeps {leftovers:?}");
    let status = std::fs::read_to_string(db.join("status")).unwrap();
    assert!(!status.contains("s3backer"), "{status}");
}
