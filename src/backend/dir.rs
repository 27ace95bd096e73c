//! Test-mode backend (`--test`): block n is the file `DIR/PREFIX[HASH-]HEX8(n)` holding the raw
//! block bytes, exactly C s3backer's test-mode layout (spec 8.3), so either program reads the other's.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::naming::Naming;
use crate::stats::{Counter, StatsReport, TimeCounter};
use crate::store::{Block, BlockStore, ReadInfo, SizeMeta, Volume, WriteInfo};

#[derive(Default)]
struct DirStats {
    reads: Counter,
    zero_reads: Counter,
    writes: Counter,
    deletes: Counter,
    read_time: TimeCounter,
    write_time: TimeCounter,
}

pub struct DirBackend {
    dir: PathBuf,
    naming: Naming,
    geometry: Geometry,
    temp_counter: AtomicU64,
    stats: DirStats,
}

impl DirBackend {
    pub fn new(dir: PathBuf, naming: Naming, geometry: Geometry) -> Result<Self> {
        let meta = fs::metadata(&dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(DirBackend {
            dir,
            naming,
            geometry,
            temp_counter: AtomicU64::new(0),
            stats: DirStats::default(),
        })
    }

    fn path(&self, block: BlockId) -> PathBuf {
        self.dir.join(self.naming.block_key(block))
    }

    fn check(&self, block: BlockId) -> Result<()> {
        if self.geometry.contains(block) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "block {block} is beyond the end of the disk"
            )))
        }
    }

    fn store(&self, path: &Path, data: &[u8]) -> Result<()> {
        // Temp file + rename: a crash never leaves a half-written block under the real name.
        let temp = path.with_extension(format!(
            "{}.{}.tmp",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let result = File::create(&temp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| fs::rename(&temp, path));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(|e| Error::io(format!("write {}", path.display()), e))
    }
}

impl BlockStore for DirBackend {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        self.check(block)?;
        let start = Instant::now();
        let path = self.path(block);
        let result = match File::open(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                buf.fill(0);
                self.stats.zero_reads.inc();
                Ok(ReadInfo {
                    zero: true,
                    etag: None,
                })
            }
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
            Ok(mut file) => match file.read_exact(buf) {
                Ok(()) => {
                    self.stats.reads.inc();
                    Ok(ReadInfo {
                        zero: false,
                        etag: None,
                    })
                }
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(Error::corrupt(
                    block,
                    format!("file {} is truncated", path.display()),
                )),
                Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
            },
        };
        self.stats.read_time.add(start.elapsed());
        result
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.check(block)?;
        let start = Instant::now();
        let path = self.path(block);
        let result = match data {
            Block::Zero => {
                self.stats.deletes.inc();
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => {
                        Err(Error::io(format!("delete {}", path.display()), e))
                    }
                    _ => Ok(()),
                }
            }
            Block::Data(bytes) => {
                self.stats.writes.inc();
                self.store(&path, bytes)
            }
        };
        self.stats.write_time.add(start.elapsed());
        result.map(|()| WriteInfo::default())
    }

    /// syncfs(2) of the store's file system: data and renames of every earlier write are durable.
    fn flush(&self) -> Result<()> {
        let dir =
            File::open(&self.dir).map_err(|e| Error::io(format!("{}", self.dir.display()), e))?;
        // SAFETY: the descriptor is valid for the duration of the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io(
                format!("sync {}", self.dir.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn survey_non_zero(&self, _threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        // A prefix with '/' names a subdirectory; the rest is the start of each file name.
        let (subdir, _) = self.naming.prefix.rsplit_once('/').unwrap_or(("", ""));
        let scan_dir = self.dir.join(subdir);
        let entries = fs::read_dir(&scan_dir)
            .map_err(|e| Error::io(format!("list {}", scan_dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("list {}", scan_dir.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let key = if subdir.is_empty() {
                name.to_string()
            } else {
                format!("{subdir}/{name}")
            };
            if let Some(block) = self.naming.parse_key(&key, self.geometry.num_blocks()) {
                found(block);
            }
        }
        Ok(())
    }

    fn stats(&self, report: &mut StatsReport) {
        let s = &self.stats;
        report.add("test_normal_blocks_read", s.reads.get());
        report.add("test_zero_blocks_read", s.zero_reads.get());
        report.add("test_normal_blocks_written", s.writes.get());
        report.add("test_zero_blocks_written", s.deletes.get());
        let reads = s.reads.get() + s.zero_reads.get();
        let writes = s.writes.get() + s.deletes.get();
        report.add_secs("test_avg_read_time", s.read_time.average_secs(reads));
        report.add_secs("test_avg_write_time", s.write_time.average_secs(writes));
    }

    fn reset_stats(&self) {
        let s = &self.stats;
        for c in [&s.reads, &s.zero_reads, &s.writes, &s.deletes] {
            c.reset();
        }
        s.read_time.reset();
        s.write_time.reset();
    }
}

impl Volume for DirBackend {
    fn description(&self) -> String {
        format!("file://{}/{}", self.dir.display(), self.naming.prefix)
    }

    fn detect_size(&self) -> Result<Option<SizeMeta>> {
        Ok(None)
    }

    fn read_mount_token(&self) -> Result<Option<u32>> {
        Ok(None)
    }

    fn write_mount_token(&self, _token: Option<u32>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    fn backend(dir: &Path, prefix: &str, hash: bool) -> DirBackend {
        DirBackend::new(
            dir.to_path_buf(),
            Naming::new(prefix, hash),
            Geometry::new(64 * 512, 512).unwrap(),
        )
        .unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn blocks_are_raw_files_named_like_c_test_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let b = backend(tmp.path(), "", false);
        let data = vec![0xabu8; 512];
        b.write_block(BlockId(0x12), Block::Data(&data)).unwrap();
        assert_eq!(names(tmp.path()), vec!["00000012"]);
        assert_eq!(fs::read(tmp.path().join("00000012")).unwrap(), data);
        let mut buf = vec![0u8; 512];
        assert!(!b.read_block(BlockId(0x12), &mut buf).unwrap().zero);
        assert_eq!(buf, data);
        b.write_block(BlockId(0x12), Block::Zero).unwrap();
        assert!(
            names(tmp.path()).is_empty(),
            "zero block unlinked, no temp files left"
        );
        assert!(b.read_block(BlockId(0x12), &mut buf).unwrap().zero);
        assert!(buf.iter().all(|&x| x == 0));
        b.write_block(BlockId(0x13), Block::Zero).unwrap();
        b.flush().unwrap();
    }

    #[test]
    fn prefix_subdirectory_and_hash_prefix_names() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("vm1")).unwrap();
        let data = vec![1u8; 512];
        backend(tmp.path(), "vm1/", false)
            .write_block(BlockId(2), Block::Data(&data))
            .unwrap();
        assert_eq!(names(&tmp.path().join("vm1")), vec!["00000002"]);
        let hashed = backend(tmp.path(), "", true);
        hashed.write_block(BlockId(2), Block::Data(&data)).unwrap();
        assert!(tmp.path().join("7183baa1-00000002").exists());
        let found = Mutex::new(Vec::new());
        hashed
            .survey_non_zero(1, &|b| found.lock().push(b))
            .unwrap();
        assert_eq!(*found.lock(), vec![BlockId(2)]);
        let found = Mutex::new(Vec::new());
        backend(tmp.path(), "vm1/", false)
            .survey_non_zero(1, &|b| found.lock().push(b))
            .unwrap();
        assert_eq!(*found.lock(), vec![BlockId(2)]);
    }

    #[test]
    fn truncated_file_is_an_error_naming_the_block() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("00000005"), [1u8; 100]).unwrap();
        let mut buf = vec![0u8; 512];
        let err = backend(tmp.path(), "", false)
            .read_block(BlockId(5), &mut buf)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(
            err.to_string().contains("00000005") && err.to_string().contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn survey_ignores_foreign_files_and_blocks_past_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        for name in [
            "00000001",
            "0000003f",
            "00000040",
            "0000000A",
            "notes.txt",
            "00000002.1.tmp",
        ] {
            fs::write(tmp.path().join(name), [1u8; 512]).unwrap();
        }
        let found = Mutex::new(Vec::new());
        backend(tmp.path(), "", false)
            .survey_non_zero(4, &|b| found.lock().push(b))
            .unwrap();
        let mut found = found.into_inner();
        found.sort();
        assert_eq!(found, vec![BlockId(1), BlockId(0x3f)]);
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = DirBackend::new(
            "/nonexistent/s3b".into(),
            Naming::new("", false),
            Geometry::new(4096, 512).unwrap(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/s3b"), "{err}");
    }

    #[test]
    fn concurrent_writers_of_distinct_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let b = backend(tmp.path(), "", false);
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let b = &b;
                s.spawn(move || {
                    for i in 0..8u32 {
                        let block = BlockId(u32::from(t) * 8 + i);
                        b.write_block(block, Block::Data(&[t + 1; 512])).unwrap();
                        let mut buf = vec![0u8; 512];
                        b.read_block(block, &mut buf).unwrap();
                        assert!(buf.iter().all(|&x| x == t + 1));
                    }
                });
            }
        });
        assert_eq!(names(tmp.path()).len(), 64);
    }
}
