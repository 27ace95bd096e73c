//! End-to-end helpers: run an s3backer binary in the foreground on a temp mount point, put ext4
//! on its file, write and verify a tree of files. Everything is undone on drop, even on panic.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Our binary, as built by cargo for this test run.
pub fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3backer"))
}

/// Debian's C s3backer 1.5.4, the compatibility peer.
pub fn c_s3backer() -> PathBuf {
    let path = PathBuf::from("/usr/bin/s3backer");
    assert!(
        path.exists(),
        "C s3backer is not installed: run scripts/install-deps.sh"
    );
    path
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.as_ref()))
}

pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// A running s3backer (foreground) with its FUSE mount.
pub struct FuseMount {
    child: Option<Child>,
    pub mount_point: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// What an s3backer process said and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stderr: String,
}

impl FuseMount {
    /// Starts `binary args... BUCKET MOUNTPOINT -f` and waits until the mount is live.
    pub fn start(binary: &Path, args: &[String], bucket: &str) -> FuseMount {
        Self::try_start(binary, args, bucket).unwrap_or_else(|f| {
            panic!(
                "{} failed to mount ({}):\n{}",
                binary.display(),
                f.status,
                f.stderr
            )
        })
    }

    /// Like `start`, but returns how the process ended when the mount never came up.
    pub fn try_start(binary: &Path, args: &[String], bucket: &str) -> Result<FuseMount, Finished> {
        let dir = tempfile::Builder::new()
            .prefix("s3b-mnt")
            .tempdir()
            .unwrap();
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = Command::new(binary)
            .args(args)
            .arg("-f")
            .arg(bucket)
            .arg(&mount_point)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn s3backer");
        let mut mount = FuseMount {
            child: Some(child),
            mount_point,
            stderr_path,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(60), || {
            is_mounted(&mount.mount_point)
                || mount
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
        });
        if !up || !is_mounted(&mount.mount_point) {
            return Err(mount.finish());
        }
        Ok(mount)
    }

    pub fn file(&self) -> PathBuf {
        self.mount_point.join("file")
    }

    pub fn stats(&self) -> String {
        std::fs::read_to_string(self.mount_point.join("stats")).unwrap()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `umount`s the FUSE file system and waits (bounded) for the process to flush and exit.
    pub fn unmount(mut self) -> Finished {
        if is_mounted(&self.mount_point) {
            let out = Command::new("umount")
                .arg(&self.mount_point)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "umount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.finish()
    }

    /// Kills the process with SIGKILL (no flush, no token cleanup) and detaches the dead mount.
    pub fn crash(mut self) {
        let mut child = self.child.take().expect("process already finished");
        let _ = child.kill();
        let _ = child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
    }

    fn finish(&mut self) -> Finished {
        let mut child = self.child.take().expect("process already finished");
        let exited = wait_until(Duration::from_secs(180), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut stderr);
        }
        assert!(
            exited,
            "s3backer did not exit within 180 s after unmount:\n{stderr}"
        );
        Finished { status, stderr }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if is_mounted(&self.mount_point) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mount_point)
                    .status();
            }
            let _ = wait_until(Duration::from_secs(30), || {
                child.try_wait().ok().flatten().is_some()
            });
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loop mount of an image file, unmounted on drop.
pub struct LoopMount {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LoopMount {
    pub fn new(image: &Path, options: &str) -> LoopMount {
        let tmp = tempfile::Builder::new()
            .prefix("s3b-ext4")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        run(Command::new("mount")
            .arg("-o")
            .arg(format!("loop,{options}"))
            .arg(image)
            .arg(&dir));
        LoopMount { dir, _tmp: tmp }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
    }
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn mkfs_ext4(image: &Path) {
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image));
}

/// `e2fsck -fn`: forced full check, no changes; panics unless the file system is clean.
pub fn assert_fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn reported problems ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic pseudo-random bytes (xorshift), so trees are reproducible from a seed.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes a tree of `files` files of varied sizes (some empty, some several MiB, some
/// compressible) under `root`; returns relative path -> SHA-256.
pub fn write_tree(root: &Path, seed: u64, files: usize) -> BTreeMap<PathBuf, String> {
    let mut sums = BTreeMap::new();
    for i in 0..files {
        let rel = PathBuf::from(format!("d{}/sub{}/f{i:04}.bin", i % 7, i % 3));
        let size = match i % 5 {
            0 => 0,
            1 => 1 + (i * 37) % 5000,
            2 => 4096 * (1 + i % 9),
            3 => 100_000 + (i * 7919) % 300_000,
            _ => 2_000_000 + (i * 104_729) % 1_000_000,
        };
        let data = if i % 4 == 0 {
            vec![b'a' + (i % 26) as u8; size]
        } else {
            pseudo_random(seed ^ i as u64, size)
        };
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        sums.insert(rel, hex::encode(Sha256::digest(&data)));
    }
    sums
}

/// Asserts every file of `expected` is under `root` with the same SHA-256.
pub fn verify_tree(root: &Path, expected: &BTreeMap<PathBuf, String>) {
    for (rel, sum) in expected {
        let data = std::fs::read(root.join(rel))
            .unwrap_or_else(|e| panic!("{} unreadable: {e}", rel.display()));
        assert_eq!(
            &hex::encode(Sha256::digest(&data)),
            sum,
            "{} changed",
            rel.display()
        );
    }
}

/// Unmounts a path on drop (used for mounts made by `mount(8)` rather than by a child we own).
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
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

/// Mounts with `binary`, creates ext4 on the file, writes a tree of `files` files, unmounts
/// everything and checks the process exited cleanly. Returns the tree's checksums.
pub fn write_ext4_disk(
    binary: &Path,
    args: &[String],
    bucket: &str,
    seed: u64,
    files: usize,
) -> BTreeMap<PathBuf, String> {
    let mount = FuseMount::start(binary, args, bucket);
    mkfs_ext4(&mount.file());
    let tree = {
        let ext4 = LoopMount::new(&mount.file(), "discard");
        write_tree(&ext4.dir, seed, files)
    };
    let done = mount.unmount();
    assert!(
        done.status.success(),
        "writer exited badly:\n{}",
        done.stderr
    );
    tree
}

/// Mounts with `binary`, checks every file of `tree` on a read-only loop mount and that
/// `e2fsck -fn` finds the file system clean, then unmounts.
pub fn verify_ext4_disk(
    binary: &Path,
    args: &[String],
    bucket: &str,
    tree: &BTreeMap<PathBuf, String>,
) {
    let mount = FuseMount::start(binary, args, bucket);
    {
        let ext4 = LoopMount::new(&mount.file(), "ro");
        verify_tree(&ext4.dir, tree);
    }
    assert_fsck_clean(&mount.file());
    let done = mount.unmount();
    assert!(
        done.status.success(),
        "reader exited badly:\n{}",
        done.stderr
    );
}

/// Writes `data` at the start of `path` and fsyncs it: the barrier every durability test relies on.
pub fn write_and_fsync(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// The first `len` bytes of `path`.
pub fn read_prefix(path: &Path, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut back))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    back
}

/// A counter of the FUSE stats file's text.
pub fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {name} in stats:\n{stats}"))
}
