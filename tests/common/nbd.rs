//! NBD end-to-end helpers: our binary serving a disk on a Unix socket, and `nbdfuse` turning
//! that export into a file (there is no /dev/nbd* here). Undone on drop, even on panic.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::mount::{Finished, is_mounted, wait_until};

/// `s3backer --nbd-socket=SOCKET -f args... BUCKET`, running until `stop`.
pub struct NbdServer {
    child: Option<Child>,
    pub socket: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdServer {
    pub fn start(binary: &Path, args: &[String], bucket: &str) -> NbdServer {
        let dir = tempfile::Builder::new()
            .prefix("s3b-nbd")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("sock");
        let stderr_path = dir.path().join("stderr.log");
        let child = Command::new(binary)
            .arg(format!("--nbd-socket={}", socket.display()))
            .arg("-f")
            .args(args)
            .arg(bucket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn s3backer");
        let mut server = NbdServer {
            child: Some(child),
            socket,
            stderr_path,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(60), || {
            server.socket.exists()
                || server
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
        });
        if !up || !server.socket.exists() {
            let finished = server.stop();
            panic!(
                "NBD server did not come up ({}):\n{}",
                finished.status, finished.stderr
            );
        }
        server
    }

    /// The libnbd URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for the final flush and exit.
    pub fn stop(&mut self) -> Finished {
        let mut child = self.child.take().expect("server already stopped");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let exited = wait_until(Duration::from_secs(180), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let stderr = self.stderr();
        assert!(exited, "NBD server did not exit within 180 s:\n{stderr}");
        Finished { status, stderr }
    }

    /// Stops and asserts a clean exit.
    pub fn stop_ok(mut self) {
        let finished = self.stop();
        assert!(
            finished.status.success(),
            "NBD server exited badly ({}):\n{}",
            finished.status,
            finished.stderr
        );
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `nbdfuse MOUNTPOINT URI`: the export as the file `MOUNTPOINT/nbd`.
pub struct NbdFuse {
    child: Option<Child>,
    pub mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdFuse {
    pub fn start(uri: &str) -> NbdFuse {
        let dir = tempfile::Builder::new()
            .prefix("s3b-nbdfuse")
            .tempdir()
            .unwrap();
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let child = Command::new("nbdfuse")
            .arg(&mount_point)
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse (scripts/install-deps.sh installs libnbd-bin)");
        let mut fuse = NbdFuse {
            child: Some(child),
            mount_point,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(30), || {
            is_mounted(&fuse.mount_point)
                || fuse
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
        });
        assert!(up && is_mounted(&fuse.mount_point), "nbdfuse did not mount");
        fuse
    }

    pub fn file(&self) -> PathBuf {
        self.mount_point.join("nbd")
    }

    /// Unmounts and waits for nbdfuse to disconnect.
    pub fn unmount(mut self) {
        self.release();
    }

    fn release(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if is_mounted(&self.mount_point) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mount_point)
                .status();
        }
        let exited = wait_until(Duration::from_secs(60), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        self.release();
    }
}
