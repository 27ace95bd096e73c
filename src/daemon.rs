//! Going to the background like C s3backer: the parent waits until the child reports that the
//! mount is live (exit 0) or failed (the child's exit code), so `mount` and fstab see the truth.
//! Done with fork(2) by hand because it must happen before any thread exists.
//! Readiness is also reported to systemd (`NOTIFY_SOCKET`), in the foreground as well.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// The child's end of the readiness pipe; sends systemd STOPPING=1 on drop once it was ready.
pub struct Readiness {
    pipe: Option<File>,
    notified: bool,
}

impl Readiness {
    /// A process that did not fork (foreground): only systemd is told.
    pub fn foreground() -> Self {
        Readiness {
            pipe: None,
            notified: false,
        }
    }

    /// Tells systemd and the parent the mount succeeded; a daemon detaches from the terminal and
    /// switches its logs to syslog.
    pub fn ready(&mut self) {
        if !self.notified {
            self.notified = true;
            crate::notify::ready();
        }
        if let Some(mut pipe) = self.pipe.take() {
            crate::logging::switch_to_syslog();
            redirect_stdio_to_null();
            let _ = pipe.write_all(&[1]);
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        if self.notified {
            crate::notify::stopping();
        }
    }
}

/// Forks. Returns in the child only; the parent waits for readiness and exits.
/// Must be called while the process is single-threaded.
pub fn daemonize() -> std::io::Result<Readiness> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees no other thread exists, so the child inherits a consistent state.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(Readiness {
                pipe: Some(File::from(write_end)),
                notified: false,
            })
        }
        child => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let got = File::from(read_end).read(&mut byte).unwrap_or(0);
            if got == 1 {
                std::process::exit(0);
            }
            // The child failed before the mount went live; it already printed why.
            let mut status = 0;
            // SAFETY: status is a valid out-pointer; child is our own child pid.
            unsafe { libc::waitpid(child, &mut status, 0) };
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                1
            };
            std::process::exit(if code == 0 { 1 } else { code });
        }
    }
}

fn redirect_stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; null stays open for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}
