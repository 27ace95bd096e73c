//! The FUSE view of the disk (spec 7): a root directory holding the data file and the stats
//! file. Served by fuser's multi-threaded loop so slow block requests run side by side.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, WriteFlags,
};
use parking_lot::Mutex;
use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::layer::block_part::BlockPart;
use crate::store::BlockStore;

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);
const STATS_INO: INodeNo = INodeNo(3);

/// The kernel caps one request at 1 MiB (`max_pages_limit` 256 pages).
const MAX_WRITE: u32 = 1 << 20;
/// Kernel background requests (read-ahead, async direct I/O) in flight at once.
const MAX_BACKGROUND: u16 = 64;

/// How the disk is mounted; built from the command line and `-o` options.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    pub mount_point: PathBuf,
    /// Name of the data file (`--filename`).
    pub filename: String,
    /// Name of the stats file (`--statsFilename`); `None` hides it.
    pub stats_filename: Option<String>,
    /// Permission bits of the data file (`--fileMode`).
    pub file_mode: u32,
    pub read_only: bool,
    /// Open the data file with direct_io (`--directIO`).
    pub direct_io: bool,
    /// Source shown in the mount table (`<desc>` of the bucket).
    pub fsname: String,
    /// Further FUSE `-o` options (`allow_other`, `uid=`, `ro`, ...).
    pub mount_options: Vec<String>,
    /// FUSE request threads (`-s` means 1).
    pub threads: usize,
    /// Log every FUSE operation (`-d`).
    pub debug: bool,
}

/// Mounts the disk, calls `on_ready` once the mount is live, serves until the file system is
/// unmounted or SIGINT/SIGTERM arrives (then unmounts it), and finally flushes the store:
/// `Ok` means every write reached the store's backend.
pub fn serve(
    store: Arc<dyn BlockStore>,
    opts: &FuseOptions,
    on_ready: impl FnOnce(),
) -> Result<()> {
    check_mount_point(&opts.mount_point)?;
    let mount = parse_mount_options(opts)?;
    let config = {
        let mut config = Config::default();
        config.mount_options = mount.options;
        config.acl = mount.acl;
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        config
    };
    let fs = DiskFs::new(store.clone(), opts, mount.owner, mount.ttl);
    let mut session = fuser::Session::new(fs, &opts.mount_point, &config).map_err(|err| {
        let hint = if Path::new("/dev/fuse").exists() {
            ""
        } else {
            " (/dev/fuse missing: is the fuse module loaded?)"
        };
        Error::io(
            format!("cannot mount {}{hint}", opts.mount_point.display()),
            err,
        )
    })?;
    let signals = spawn_signal_watcher(session.unmount_callable(), &opts.mount_point)?;
    info!("mounted {}", opts.mount_point.display());
    on_ready();

    let run_result = match session.run() {
        // A connection the kernel tore down (a lazy unmount racing the last close, or an
        // abort) ends some reads with ECONNABORTED instead of ENODEV: the session is over all
        // the same, and the flush below still decides success.
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionAborted => {
            info!(
                "FUSE connection of {} ended by the kernel",
                opts.mount_point.display()
            );
            Ok(())
        }
        other => other,
    };
    signals.stop();
    info!("unmount {}: flushing", opts.mount_point.display());
    let flush_result = store.flush();
    if let Err(err) = &flush_result {
        error!(
            "unmount {}: flush failed, data may be lost: {err}",
            opts.mount_point.display()
        );
    }
    if let Err(err) = run_result {
        let err = Error::io("FUSE session failed", err);
        error!("{err}");
        flush_result?;
        return Err(err);
    }
    flush_result
}

/// Rejects mount points that are missing, not directories, or already a FUSE mount.
pub fn check_mount_point(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|err| {
        let hint = if err.raw_os_error() == Some(libc::ENOTCONN) {
            " (a dead FUSE mount? try \"fusermount3 -u\")"
        } else {
            ""
        };
        Error::io(format!("mount point {}{hint}", path.display()), err)
    })?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "mount point {} is not a directory",
            path.display()
        )));
    }
    let canonical = path
        .canonicalize()
        .map_err(|err| Error::io(format!("mount point {}", path.display()), err))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(fstype) = fuse_mount_at(&mountinfo, &canonical) {
        return Err(Error::Busy(format!(
            "mount point {} is already mounted ({fstype})",
            path.display()
        )));
    }
    Ok(())
}

/// The file system type when a FUSE file system is mounted exactly at `path`.
fn fuse_mount_at(mountinfo: &str, path: &Path) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = unescape_mountinfo(fields.get(4)?);
        let sep = fields.iter().position(|&f| f == "-")?;
        let fstype = *fields.get(sep + 1)?;
        (Path::new(OsStr::from_bytes(&mount_point)) == path && fstype.starts_with("fuse"))
            .then(|| fstype.to_string())
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Owner reported for all three files (real ids, or `-o uid=,gid=`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// Cache lifetimes given to the kernel (spec 7 defaults: names for a year, attributes not at
/// all, so size and times of the stats file are always fresh).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Ttl {
    entry: Duration,
    attr: Duration,
}

struct MountSetup {
    options: Vec<MountOption>,
    acl: SessionACL,
    owner: Owner,
    ttl: Ttl,
}

/// Turns our options into fuser's: kernel options and flags go to the mount, the libfuse
/// options C s3backer users pass (uid=, timeouts, kernel_cache...) are applied here or
/// accepted as no-ops, since fuser speaks to the kernel directly.
fn parse_mount_options(opts: &FuseOptions) -> Result<MountSetup> {
    // SAFETY: getuid/getgid cannot fail.
    let mut owner = unsafe {
        Owner {
            uid: libc::getuid(),
            gid: libc::getgid(),
        }
    };
    let mut ttl = Ttl {
        entry: Duration::from_secs(31_536_000),
        attr: Duration::ZERO,
    };
    let mut acl = SessionACL::All;
    let mut fsname = opts.fsname.clone();
    let mut subtype = "s3backer".to_string();
    let mut options = vec![
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    let number = |option: &str, value: &str| -> Result<u32> {
        value
            .parse()
            .map_err(|_| Error::Invalid(format!("FUSE option \"{option}\": bad number")))
    };
    let seconds = |option: &str, value: &str| -> Result<Duration> {
        value
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| Error::Invalid(format!("FUSE option \"{option}\": bad seconds")))
    };
    for option in opts.mount_options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let flag = match key {
            "" => continue,
            "allow_other" => {
                acl = SessionACL::All;
                continue;
            }
            "allow_root" => {
                acl = SessionACL::RootAndOwner;
                continue;
            }
            "fsname" => {
                fsname = value.to_string();
                continue;
            }
            "subtype" => {
                subtype = value.to_string();
                continue;
            }
            "uid" => {
                owner.uid = number(option, value)?;
                continue;
            }
            "gid" => {
                owner.gid = number(option, value)?;
                continue;
            }
            "entry_timeout" => {
                ttl.entry = seconds(option, value)?;
                continue;
            }
            "attr_timeout" => {
                ttl.attr = seconds(option, value)?;
                continue;
            }
            "ro" => MountOption::RO,
            "rw" => MountOption::RW,
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            "suid" => MountOption::Suid,
            "nosuid" => MountOption::NoSuid,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dirsync" => MountOption::DirSync,
            "default_permissions" => MountOption::DefaultPermissions,
            "auto_unmount" => MountOption::AutoUnmount,
            "max_read" | "blksize" => {
                number(option, value)?;
                MountOption::CUSTOM(option.to_string())
            }
            // libfuse tuning options without meaning here, and fstab-only words that
            // mount.fuse normally strips.
            "kernel_cache"
            | "auto_cache"
            | "noauto_cache"
            | "big_writes"
            | "large_read"
            | "hard_remove"
            | "use_ino"
            | "readdir_ino"
            | "negative_timeout"
            | "ac_attr_timeout"
            | "intr"
            | "intr_signal"
            | "modules"
            | "max_readahead"
            | "max_write"
            | "max_background"
            | "congestion_threshold"
            | "async_read"
            | "sync_read"
            | "noforget"
            | "remember"
            | "nopath"
            | "splice_read"
            | "splice_write"
            | "splice_move"
            | "no_remote_lock"
            | "nonempty"
            | "direct_io"
            | "noauto"
            | "auto"
            | "nofail"
            | "_netdev"
            | "user"
            | "users"
            | "nouser"
            | "owner"
            | "group"
            | "defaults"
            | "comment" => {
                debug!("FUSE option \"{option}\" ignored");
                continue;
            }
            _ if key.starts_with("x-") => continue,
            _ => {
                return Err(Error::Invalid(format!("unknown FUSE option \"{option}\"")));
            }
        };
        options.retain(|o| !conflicts(o, &flag));
        options.push(flag);
    }
    options.push(MountOption::FSName(fsname));
    // fuser's direct mount(2) drops `Subtype`; the kernel takes it as a plain option.
    options.push(MountOption::CUSTOM(format!("subtype={subtype}")));
    Ok(MountSetup {
        options,
        acl,
        owner,
        ttl,
    })
}

/// A later option overrides an earlier opposite one (`-o nodev` default, user `dev`).
fn conflicts(old: &MountOption, new: &MountOption) -> bool {
    use MountOption::*;
    let pairs = [
        (Dev, NoDev),
        (Suid, NoSuid),
        (RO, RW),
        (Exec, NoExec),
        (Atime, NoAtime),
        (Sync, Async),
    ];
    old == new
        || pairs
            .iter()
            .any(|(a, b)| (old == a && new == b) || (old == b && new == a))
}

/// Unmounts on SIGINT/SIGTERM, which makes the session loop end.
struct SignalWatcher {
    handle: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
}

impl SignalWatcher {
    fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

fn spawn_signal_watcher(
    mut unmounter: fuser::SessionUnmounter,
    mount_point: &Path,
) -> Result<SignalWatcher> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|err| Error::io("cannot watch signals", err))?;
    let handle = signals.handle();
    let mount_point = mount_point.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("fuse-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!("signal {signal}: unmounting {}", mount_point.display());
                if let Err(err) = unmounter.unmount() {
                    // Busy (e.g. a loop device still open): detach now, the session ends
                    // when the last user lets go, as libfuse does.
                    warn!("unmount {}: {err}; detaching lazily", mount_point.display());
                    lazy_unmount(&mount_point);
                }
            }
        })
        .map_err(|err| Error::io("cannot start signal thread", err))?;
    Ok(SignalWatcher { handle, thread })
}

fn lazy_unmount(mount_point: &Path) {
    let Ok(path) = CString::new(mount_point.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return;
    }
    // Not root: the setuid helper may unmount for us.
    match std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mount_point)
        .status()
    {
        Ok(status) if status.success() => {}
        other => error!("cannot unmount {}: {other:?}", mount_point.display()),
    }
}

/// The three-inode file system.
struct DiskFs {
    store: Arc<dyn BlockStore>,
    part: BlockPart,
    geometry: Geometry,
    filename: String,
    stats_filename: Option<String>,
    file_mode: u16,
    read_only: bool,
    direct_io: bool,
    debug: bool,
    owner: Owner,
    ttl: Ttl,
    start: SystemTime,
    last_read: Mutex<SystemTime>,
    last_write: Mutex<SystemTime>,
    /// Stats text rendered at open, per open handle of the stats file.
    stats_snapshots: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    next_fh: AtomicU64,
}

impl DiskFs {
    fn new(store: Arc<dyn BlockStore>, opts: &FuseOptions, owner: Owner, ttl: Ttl) -> Self {
        let start = SystemTime::now();
        DiskFs {
            part: BlockPart::new(store.clone()),
            geometry: store.geometry(),
            store,
            filename: opts.filename.clone(),
            stats_filename: opts.stats_filename.clone(),
            file_mode: (opts.file_mode & 0o7777) as u16,
            read_only: opts.read_only,
            direct_io: opts.direct_io,
            debug: opts.debug,
            owner,
            ttl,
            start,
            last_read: Mutex::new(start),
            last_write: Mutex::new(start),
            stats_snapshots: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn render_stats(&self) -> Vec<u8> {
        crate::stats::report_of(self.store.as_ref())
            .render()
            .into_bytes()
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let base = FileAttr {
            ino,
            size: 0,
            blocks: 0,
            atime: self.start,
            mtime: self.start,
            ctime: self.start,
            crtime: self.start,
            kind: FileType::RegularFile,
            perm: 0,
            nlink: 1,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        Some(match ino {
            ROOT_INO => FileAttr {
                kind: FileType::Directory,
                perm: 0o755,
                nlink: 2,
                ..base
            },
            FILE_INO => FileAttr {
                size: self.geometry.file_size(),
                // Spec 7: C reports the number of disk blocks here.
                blocks: u64::from(self.geometry.num_blocks()),
                atime: *self.last_read.lock(),
                mtime: *self.last_write.lock(),
                perm: self.file_mode,
                blksize: self.geometry.block_size(),
                ..base
            },
            STATS_INO if self.stats_filename.is_some() => FileAttr {
                size: self.render_stats().len() as u64,
                perm: 0o444,
                ..base
            },
            _ => return None,
        })
    }

    fn ino_of(&self, name: &OsStr) -> Option<INodeNo> {
        if name.as_bytes() == self.filename.as_bytes() {
            Some(FILE_INO)
        } else if self.stats_filename.as_deref().map(str::as_bytes) == Some(name.as_bytes()) {
            Some(STATS_INO)
        } else {
            None
        }
    }

    /// Logs a failed operation and turns it into the errno the kernel gets.
    fn fail(&self, op: &str, err: &Error) -> Errno {
        error!("{op}: {err}");
        Errno::from_i32(err.errno())
    }

    /// Flushes the store and answers the kernel: ok once everything written is durable.
    fn reply_flush(&self, op: &str, reply: ReplyEmpty) {
        match self.store.flush() {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(self.fail(op, &err)),
        }
    }
}

thread_local! {
    /// Each FUSE thread's read buffer (at most `MAX_WRITE`-sized requests), kept between
    /// requests: a fresh zeroed 1 MiB buffer per read cost a memset and page faults.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        // Let the kernel split large direct I/O into parallel requests.
        let wanted = InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_PARALLEL_DIROPS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.ino_of(name).and_then(|ino| self.attr(ino))) {
            (ROOT_INO, Some(attr)) => {
                reply.entry_with_ttls(&self.ttl.attr, &self.ttl.entry, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&self.ttl.attr, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if size.is_some() && self.read_only {
            return reply.error(Errno::EROFS);
        }
        // The disk size is fixed: truncate succeeds without effect, like C.
        reply.attr(&self.ttl.attr, &attr);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match (parent, self.ino_of(name)) {
            (ROOT_INO, Some(STATS_INO)) => {
                info!("stats file unlinked: statistics reset");
                self.store.reset_stats();
                reply.ok();
            }
            (ROOT_INO, Some(_)) => reply.error(Errno::EOPNOTSUPP),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match ino {
            FILE_INO if writing && self.read_only => reply.error(Errno::EROFS),
            FILE_INO if self.direct_io => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            // Only we change the disk, so cached pages stay valid across opens.
            FILE_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            STATS_INO if self.stats_filename.is_some() => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                let text = Arc::new(self.render_stats());
                self.stats_snapshots.lock().insert(fh, text);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if self.debug {
            debug!("read ino {} offset {offset} size {size}", ino.0);
        }
        match ino {
            FILE_INO => {
                if offset > self.geometry.file_size() {
                    return reply.error(Errno::ESPIPE);
                }
                READ_BUF.with_borrow_mut(|buf| {
                    buf.resize(size as usize, 0);
                    match self.part.read(offset, buf) {
                        Ok(len) => {
                            *self.last_read.lock() = SystemTime::now();
                            reply.data(&buf[..len]);
                        }
                        Err(err) => {
                            reply.error(self.fail(&format!("read {size} bytes at {offset}"), &err))
                        }
                    }
                });
            }
            STATS_INO => {
                let text = self.stats_snapshots.lock().get(&fh.0).cloned();
                let text = text.unwrap_or_else(|| Arc::new(self.render_stats()));
                let start = (offset as usize).min(text.len());
                let end = start.saturating_add(size as usize).min(text.len());
                reply.data(&text[start..end]);
            }
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.debug {
            debug!("write ino {} offset {offset} size {}", ino.0, data.len());
        }
        match ino {
            FILE_INO if self.read_only => reply.error(Errno::EROFS),
            FILE_INO => {
                let size = self.geometry.file_size();
                if offset > size {
                    return reply.error(Errno::ESPIPE);
                }
                // Writing at the very end: report a full disk, not a zero-length write that
                // callers would retry forever.
                if offset == size && !data.is_empty() {
                    return reply.error(Errno::ENOSPC);
                }
                match self.part.write(offset, data) {
                    Ok(len) => {
                        *self.last_write.lock() = SystemTime::now();
                        reply.written(len as u32);
                    }
                    Err(err) => reply
                        .error(self.fail(&format!("write {} bytes at {offset}", data.len()), &err)),
                }
            }
            STATS_INO => reply.error(Errno::EINVAL),
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close of the data file waits for all dirty blocks (spec 6.2).
        match ino {
            FILE_INO => self.reply_flush("flush", reply),
            _ => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino == STATS_INO {
            self.stats_snapshots.lock().remove(&fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A real barrier, unlike C (DESIGN.md "Data safety rules").
        self.reply_flush("fsync", reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.reply_flush("fsyncdir", reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, self.filename.as_str()),
        ];
        if let Some(stats) = &self.stats_filename {
            entries.push((STATS_INO, FileType::RegularFile, stats.as_str()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bs = self.geometry.block_size();
        let blocks = u64::from(self.geometry.num_blocks());
        reply.statfs(blocks, 0, 0, 3, 0, bs, 255, bs);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match fallocate_action(&self.geometry, ino, offset, length, mode, self.read_only) {
            Err(errno) => reply.error(errno),
            Ok(false) => reply.ok(),
            Ok(true) => match self.part.zero_range(offset, length) {
                Ok(()) => {
                    *self.last_write.lock() = SystemTime::now();
                    reply.ok()
                }
                Err(err) => {
                    reply.error(self.fail(&format!("punch hole {length} bytes at {offset}"), &err))
                }
            },
        }
    }
}

/// What `fallocate` must do (spec 7): `Ok(true)` = zero the range, `Ok(false)` = nothing.
fn fallocate_action(
    geometry: &Geometry,
    ino: INodeNo,
    offset: u64,
    length: u64,
    mode: i32,
    read_only: bool,
) -> std::result::Result<bool, Errno> {
    const ZEROING: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    const KNOWN: i32 = ZEROING | libc::FALLOC_FL_KEEP_SIZE;
    match ino {
        FILE_INO => {}
        STATS_INO => return Err(Errno::EOPNOTSUPP),
        _ => return Err(Errno::ENODEV),
    }
    if length == 0 || i64::try_from(offset).is_err() {
        return Err(Errno::EINVAL);
    }
    if offset
        .checked_add(length)
        .is_none_or(|end| end > geometry.file_size())
    {
        return Err(Errno::ENOSPC);
    }
    // Collapse/insert would change the size, which is fixed.
    if mode & !KNOWN != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    if mode & ZEROING == 0 {
        // Plain allocation: every block already "exists".
        return Ok(false);
    }
    if read_only {
        return Err(Errno::EROFS);
    }
    // ZERO_RANGE too (C ignores it): reporting success without zeroing would corrupt data.
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
    use std::os::unix::io::AsRawFd;
    use std::sync::mpsc;
    use std::thread::JoinHandle;
    use std::time::Instant;

    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::geometry::BlockId;
    use crate::layer::block_part::testing::ProbeStore;

    const BS: usize = 4096;
    const BLOCKS: u64 = 64;
    const SIZE: u64 = BLOCKS * BS as u64;

    /// A live mount of a memory disk; unmounted (and its serve thread joined) on drop.
    struct Mounted {
        mem: Arc<MemoryBackend>,
        probe: Arc<ProbeStore>,
        thread: Option<JoinHandle<Result<()>>>,
        dir: tempfile::TempDir,
    }

    fn options(mount_point: &Path) -> FuseOptions {
        FuseOptions {
            mount_point: mount_point.to_path_buf(),
            filename: "file".into(),
            stats_filename: Some("stats".into()),
            file_mode: 0o600,
            read_only: false,
            direct_io: false,
            fsname: "memory://test".into(),
            mount_options: vec![],
            threads: 16,
            debug: false,
        }
    }

    fn mount_with(latency: Duration, tweak: impl FnOnce(&mut FuseOptions)) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let geometry = Geometry::new(SIZE, BS as u32).unwrap();
        let mem = Arc::new(MemoryBackend::with_latency(geometry, latency));
        let probe = Arc::new(ProbeStore::new(mem.clone()));
        let mut opts = options(dir.path());
        tweak(&mut opts);
        let (ready_tx, ready_rx) = mpsc::channel();
        let store: Arc<dyn BlockStore> = probe.clone();
        let thread =
            std::thread::spawn(move || serve(store, &opts, move || ready_tx.send(()).unwrap()));
        let mut mounted = Mounted {
            mem,
            probe,
            thread: Some(thread),
            dir,
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let result = mounted.thread.take().unwrap().join().unwrap();
            panic!("mount did not become ready: {result:?}");
        }
        mounted
    }

    fn mount() -> Mounted {
        mount_with(Duration::ZERO, |_| {})
    }

    impl Mounted {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn open_rw(&self) -> File {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path("file"))
                .unwrap()
        }

        /// Unmounts and returns what `serve` returned.
        fn unmount(mut self) -> Result<()> {
            self.unmount_and_join().expect("serve thread")
        }

        fn unmount_and_join(&mut self) -> Option<Result<()>> {
            let thread = self.thread.take()?;
            let path = CString::new(self.dir.path().as_os_str().as_bytes()).unwrap();
            // The kernel may still hold the file briefly after the last close: retry, then
            // detach lazily (bounded).
            for attempt in 0..50 {
                // SAFETY: `path` is a valid C string.
                if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 || thread.is_finished() {
                    break;
                }
                if attempt == 49 {
                    // SAFETY: as above.
                    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !thread.is_finished() {
                eprintln!("serve thread for {:?} did not finish", self.dir.path());
                return None;
            }
            Some(thread.join().unwrap())
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            self.unmount_and_join();
        }
    }

    fn errno_of<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
        result.unwrap_err().raw_os_error().unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
            .collect()
    }

    fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn read_stats(m: &Mounted) -> String {
        std::fs::read_to_string(m.path("stats")).unwrap()
    }

    fn stat_value(stats: &str, name: &str) -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} missing in {stats}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn files_have_spec_attributes() {
        let m = mount();
        let file = std::fs::metadata(m.path("file")).unwrap();
        assert!(file.is_file());
        assert_eq!(file.len(), SIZE);
        assert_eq!(file.permissions().mode() & 0o7777, 0o600);
        assert_eq!(file.blksize(), BS as u64);
        assert_eq!(file.ino(), 2);
        // SAFETY: getuid cannot fail.
        assert_eq!(file.uid(), unsafe { libc::getuid() });

        let stats = std::fs::metadata(m.path("stats")).unwrap();
        assert_eq!(stats.permissions().mode() & 0o7777, 0o444);
        assert_eq!(stats.ino(), 3);
        assert_eq!(stats.len(), read_stats(&m).len() as u64);

        let root = std::fs::metadata(m.dir.path()).unwrap();
        assert_eq!(root.permissions().mode() & 0o7777, 0o755);
        let mut names: Vec<_> = std::fs::read_dir(m.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["file", "stats"]);
        assert_eq!(errno_of(std::fs::metadata(m.path("nope"))), libc::ENOENT);

        let path = CString::new(m.dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs fills the zeroed struct.
        let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut vfs) }, 0);
        assert_eq!(vfs.f_bsize, BS as u64);
        assert_eq!(vfs.f_blocks, BLOCKS);
        assert_eq!(vfs.f_bfree, 0);
        assert_eq!(vfs.f_files, 3);

        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let canonical = m.dir.path().canonicalize().unwrap();
        assert_eq!(
            fuse_mount_at(&mounts, &canonical).as_deref(),
            Some("fuse.s3backer")
        );
        let line = mounts
            .lines()
            .find(|l| l.contains(canonical.to_str().unwrap()))
            .unwrap();
        assert!(line.contains(" - fuse.s3backer memory://test "), "{line}");
        assert!(
            line.contains("allow_other") && line.contains("default_permissions"),
            "{line}"
        );
        m.unmount().unwrap();
    }

    #[test]
    fn unaligned_io_crosses_block_edges_and_stops_at_end() {
        let m = mount();
        let file = m.open_rw();
        let data = pattern(BS + 20, 5);
        let offset = BS as u64 - 10;
        file.write_all_at(&data, offset).unwrap();
        file.sync_all().unwrap();
        // Reached the store: block 0 ends with the first 10 bytes, block 2 holds the last 10.
        assert_eq!(&m.mem.stored(BlockId(0)).unwrap()[BS - 10..], &data[..10]);
        assert_eq!(&m.mem.stored(BlockId(2)).unwrap()[..10], &data[BS + 10..]);
        assert_eq!(
            m.mem.stored(BlockId(2)).unwrap()[10..],
            vec![0u8; BS - 10][..]
        );

        let mut back = vec![0u8; data.len() + 30];
        file.read_exact_at(&mut back, offset - 15).unwrap();
        assert_eq!(&back[15..15 + data.len()], &data[..]);
        assert!(back[..15].iter().all(|&b| b == 0));

        // Crossing the end is truncated; at the end a write reports a full disk.
        assert_eq!(file.write_at(&[9u8; 100], SIZE - 40).unwrap(), 40);
        assert_eq!(errno_of(file.write_at(&[9u8; 10], SIZE)), libc::ENOSPC);
        let mut tail = [0u8; 100];
        assert_eq!(file.read_at(&mut tail, SIZE - 40).unwrap(), 40);
        assert_eq!(&tail[..40], &[9u8; 40]);
        assert_eq!(file.read_at(&mut tail, SIZE).unwrap(), 0);
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn direct_io_reads_past_end_fail_with_espipe() {
        let m = mount_with(Duration::ZERO, |o| o.direct_io = true);
        let file = m.open_rw();
        let mut buf = [0u8; 16];
        assert_eq!(errno_of(file.read_at(&mut buf, SIZE + 4096)), libc::ESPIPE);
        assert_eq!(errno_of(file.write_at(&buf, SIZE + 4096)), libc::ESPIPE);
        assert_eq!(file.read_at(&mut buf, SIZE - 8).unwrap(), 8);
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let m = mount_with(Duration::ZERO, |o| {
            o.read_only = true;
            o.file_mode = 0o400;
        });
        let err = OpenOptions::new().write(true).open(m.path("file"));
        assert_eq!(errno_of(err), libc::EROFS);
        let file = File::open(m.path("file")).unwrap();
        let mut buf = [1u8; 64];
        file.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0u8; 64]);
        assert_eq!(
            errno_of(fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096
            )),
            libc::EBADF, // the kernel checks the descriptor is writable first
        );
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn stats_file_reports_counters_and_unlink_resets_them() {
        let m = mount_with(Duration::ZERO, |o| o.direct_io = true);
        let file = m.open_rw();
        file.write_all_at(&pattern(3 * BS, 1), 0).unwrap();
        let mut buf = vec![0u8; 3 * BS];
        file.read_exact_at(&mut buf, 0).unwrap();

        let stats = read_stats(&m);
        assert_eq!(stat_value(&stats, "memory_writes"), 3);
        assert!(stat_value(&stats, "memory_reads") >= 3);
        assert!(
            stats
                .lines()
                .last()
                .unwrap()
                .starts_with("out_of_memory_errors ")
        );
        assert!(
            stats.lines().all(|l| l.len() > 29 && &l[28..29] == " "),
            "{stats}"
        );

        let stats_rw = OpenOptions::new()
            .write(true)
            .open(m.path("stats"))
            .unwrap();
        assert_eq!(errno_of(stats_rw.write_at(b"x", 0)), libc::EINVAL);
        assert_eq!(errno_of(fallocate(&stats_rw, 0, 0, 10)), libc::EOPNOTSUPP);
        drop(stats_rw);

        std::fs::remove_file(m.path("stats")).unwrap();
        let stats = read_stats(&m);
        assert_eq!(stat_value(&stats, "memory_writes"), 0);
        assert_eq!(stat_value(&stats, "memory_reads"), 0);
        assert_eq!(
            errno_of(std::fs::remove_file(m.path("file"))),
            libc::EOPNOTSUPP
        );
        assert_eq!(m.mem.stored_count(), 3, "data survives");
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn punch_hole_deletes_whole_blocks_and_zeroes_edges() {
        let m = mount();
        let file = m.open_rw();
        let data = pattern(8 * BS, 7);
        file.write_all_at(&data, 0).unwrap();
        assert_eq!(m.mem.stored_count(), 8);

        // Allocation without punching changes nothing.
        fallocate(&file, 0, 0, 8 * BS as u64).unwrap();
        assert_eq!(m.mem.stored_count(), 8);

        let (start, end) = (BS + 100, 5 * BS + 200);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fallocate(&file, mode, start as u64, (end - start) as u64).unwrap();
        for b in 2..5 {
            assert_eq!(m.mem.stored(BlockId(b)), None, "block {b} deleted");
        }
        assert_eq!(m.mem.stored_count(), 5);
        let mut back = vec![0u8; 8 * BS];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..start], &data[..start]);
        assert!(back[start..end].iter().all(|&b| b == 0));
        assert_eq!(&back[end..], &data[end..]);

        assert_eq!(
            errno_of(fallocate(&file, mode, SIZE - 10, 20)),
            libc::ENOSPC
        );
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn fsync_and_close_flush_the_store() {
        let m = mount();
        let file = m.open_rw();
        file.write_all_at(b"hello", 0).unwrap();
        let before = m.probe.flushes.get();
        file.sync_all().unwrap();
        let after_fsync = m.probe.flushes.get();
        assert!(after_fsync > before, "fsync must flush");
        drop(file);
        assert!(m.probe.flushes.get() > after_fsync, "close must flush");

        // A failing flush is reported to fsync, not swallowed.
        m.probe.fail_flush.store(true, Ordering::SeqCst);
        let file = m.open_rw();
        assert_eq!(errno_of(file.sync_all()), libc::EIO);
        m.probe.fail_flush.store(false, Ordering::SeqCst);
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn serve_returns_the_final_flush_error() {
        let m = mount();
        m.probe.fail_flush.store(true, Ordering::SeqCst);
        let err = m.unmount().unwrap_err();
        assert!(err.to_string().contains("injected flush failure"), "{err}");
    }

    #[test]
    fn concurrent_writers_and_readers_stay_consistent() {
        let m = mount_with(Duration::from_millis(1), |o| o.direct_io = true);
        const REGION: usize = 256;
        const WRITERS: usize = 8; // 4 regions in block 0, 4 in distinct blocks
        const ROUNDS: u8 = 10;
        let region_offset = |w: usize| -> u64 {
            if w < 4 {
                (w * REGION) as u64
            } else {
                ((w + 1) * BS + 10) as u64
            }
        };
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let file = m.open_rw();
                s.spawn(move || {
                    for round in 1..=ROUNDS {
                        file.write_all_at(&[round; REGION], region_offset(w))
                            .unwrap();
                    }
                });
            }
            for _ in 0..2 {
                let file = m.open_rw();
                s.spawn(move || {
                    for _ in 0..ROUNDS {
                        for w in 0..WRITERS {
                            let mut buf = [0u8; REGION];
                            file.read_exact_at(&mut buf, region_offset(w)).unwrap();
                            assert!(buf.iter().all(|&b| b == buf[0]), "torn region {w}");
                        }
                    }
                });
            }
        });
        let file = m.open_rw();
        for w in 0..WRITERS {
            let mut buf = [0u8; REGION];
            file.read_exact_at(&mut buf, region_offset(w)).unwrap();
            assert_eq!(buf, [ROUNDS; REGION], "writer {w} final data");
        }
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn parallel_small_reads_overlap_in_the_store() {
        let m = mount_with(Duration::from_millis(20), |o| o.direct_io = true);
        const READERS: usize = 12;
        std::thread::scope(|s| {
            for r in 0..READERS {
                let file = File::open(m.path("file")).unwrap();
                s.spawn(move || {
                    for i in 0..3 {
                        let mut buf = [0u8; BS];
                        file.read_exact_at(&mut buf, ((r * 3 + i) * BS) as u64)
                            .unwrap();
                    }
                });
            }
        });
        let peak = m.probe.max_in_flight();
        assert!(peak >= 6, "only {peak} store requests overlapped");

        // One large request is split into parallel block reads too.
        let file = File::open(m.path("file")).unwrap();
        let mut big = vec![0u8; 32 * BS];
        file.read_exact_at(&mut big, 0).unwrap();
        assert!(m.probe.max_in_flight() >= 16, "{}", m.probe.max_in_flight());
        drop(file);
        m.unmount().unwrap();
    }

    #[test]
    fn bad_mount_points_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlockStore> =
            Arc::new(MemoryBackend::new(Geometry::new(SIZE, BS as u32).unwrap()));
        let missing = options(&dir.path().join("missing"));
        let err = serve(store.clone(), &missing, || panic!("not ready")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");

        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let err = serve(store.clone(), &options(&plain), || panic!("not ready")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        let mut bad_option = options(dir.path());
        bad_option.mount_options = vec!["bogus_option".into()];
        let err = serve(store.clone(), &bad_option, || panic!("not ready")).unwrap_err();
        assert!(err.to_string().contains("bogus_option"), "{err}");

        let m = mount();
        let err = serve(store, &options(m.dir.path()), || panic!("not ready")).unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err}");
        m.unmount().unwrap();
    }

    /// Signals reach every mount of the process, so this runs alone:
    /// `cargo test --lib sigterm_unmounts -- --ignored`.
    #[test]
    #[ignore = "signals the whole test process; run alone"]
    fn sigterm_unmounts_and_flushes() {
        let mut m = mount();
        let file = m.open_rw();
        file.write_all_at(b"data", 0).unwrap();
        let flushes = m.probe.flushes.get();
        let canonical = m.dir.path().canonicalize().unwrap();
        let mounted = || {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            fuse_mount_at(&mounts, &canonical).is_some()
        };
        // SAFETY: serve installed a handler for SIGTERM.
        unsafe { libc::raise(libc::SIGTERM) };
        // The open file makes the unmount busy: the mount is detached at once and
        // served until the file is closed.
        let deadline = Instant::now() + Duration::from_secs(20);
        while mounted() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!mounted(), "still mounted after SIGTERM");
        file.write_all_at(b"more", 4096).unwrap();
        drop(file);
        let thread = m.thread.take().unwrap();
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            thread.is_finished(),
            "serve did not stop after the last close"
        );
        thread.join().unwrap().unwrap();
        assert!(m.probe.flushes.get() > flushes, "final flush");
        assert_eq!(m.mem.stored(BlockId(1)).unwrap()[..4], *b"more");
    }

    #[test]
    fn mount_options_map_to_kernel_and_local_settings() {
        let mut opts = options(Path::new("/mnt"));
        opts.mount_options = vec![
            "allow_root,uid=1234,gid=99".into(),
            "ro,dev,attr_timeout=2.5,kernel_cache,noauto,max_read=65536".into(),
        ];
        let setup = parse_mount_options(&opts).unwrap();
        assert_eq!(setup.acl, SessionACL::RootAndOwner);
        assert_eq!(setup.owner, Owner { uid: 1234, gid: 99 });
        assert_eq!(setup.ttl.attr, Duration::from_millis(2500));
        assert!(setup.options.contains(&MountOption::RO));
        assert!(setup.options.contains(&MountOption::Dev));
        assert!(!setup.options.contains(&MountOption::NoDev));
        assert!(
            setup
                .options
                .contains(&MountOption::CUSTOM("max_read=65536".into()))
        );
        assert!(
            setup
                .options
                .contains(&MountOption::FSName("memory://test".into()))
        );
        assert!(
            setup
                .options
                .contains(&MountOption::CUSTOM("subtype=s3backer".into()))
        );

        opts.mount_options = vec!["uid=abc".into()];
        assert!(parse_mount_options(&opts).is_err());
    }

    #[test]
    fn fallocate_rules_follow_spec() {
        let g = Geometry::new(SIZE, BS as u32).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            fallocate_action(&g, FILE_INO, 0, 10, punch, false),
            Ok(true)
        );
        assert_eq!(
            fallocate_action(&g, FILE_INO, 0, 10, libc::FALLOC_FL_ZERO_RANGE, false),
            Ok(true)
        );
        assert_eq!(fallocate_action(&g, FILE_INO, 0, 10, 0, false), Ok(false));
        assert_eq!(
            fallocate_action(&g, FILE_INO, 0, 10, libc::FALLOC_FL_KEEP_SIZE, true),
            Ok(false)
        );
        assert_eq!(
            fallocate_action(&g, FILE_INO, 0, 10, punch, true),
            Err(Errno::EROFS)
        );
        assert_eq!(
            fallocate_action(&g, FILE_INO, 0, 0, punch, false),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            fallocate_action(&g, FILE_INO, SIZE - 1, 2, punch, false),
            Err(Errno::ENOSPC)
        );
        assert_eq!(
            fallocate_action(&g, FILE_INO, 0, 10, libc::FALLOC_FL_COLLAPSE_RANGE, false),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            fallocate_action(&g, STATS_INO, 0, 10, punch, false),
            Err(Errno::EOPNOTSUPP)
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let line = "36 35 0:40 / /mnt/my\\040disk rw,nosuid - fuse.s3backer memory:// rw\n\
                    37 35 0:41 / /mnt/other rw - ext4 /dev/sda1 rw";
        assert_eq!(
            fuse_mount_at(line, Path::new("/mnt/my disk")).as_deref(),
            Some("fuse.s3backer")
        );
        assert_eq!(fuse_mount_at(line, Path::new("/mnt/other")), None);
        assert_eq!(fuse_mount_at(line, Path::new("/mnt/my")), None);
    }
}
