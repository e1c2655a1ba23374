//! A disk that can stop answering reads as well as writes: a FUSE filesystem, served from
//! this test process, that passes every operation through to a backing directory on a real
//! disk, until it is frozen. While frozen, every request the kernel sends it (a read that
//! misses the page cache, a write, an fsync, a lookup) waits, as requests to a hung volume
//! do; nothing fails. FIFREEZE (the other hung-disk test) blocks only writes, and reads are
//! served from the page cache, so it cannot show what a hung read does to the vault.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// Attributes and names are cached by the kernel this long.
const TTL: Duration = Duration::from_secs(1);

/// The freeze switch shared by the filesystem and the test.
#[derive(Clone, Default)]
pub struct Switch(Arc<(Mutex<bool>, Condvar)>);

impl Switch {
    fn wait_while_frozen(&self) {
        let (frozen, cv) = &*self.0;
        let mut f = frozen.lock().unwrap_or_else(|e| e.into_inner());
        while *f {
            f = cv.wait(f).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn set(&self, on: bool) {
        let (frozen, cv) = &*self.0;
        *frozen.lock().unwrap_or_else(|e| e.into_inner()) = on;
        cv.notify_all();
    }
}

struct Passthrough {
    root: PathBuf,
    /// Inode -> path under `root` (the root is inode 1).
    paths: HashMap<u64, PathBuf>,
    files: HashMap<u64, File>,
    next_fh: u64,
    switch: Switch,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Answers an operation with nothing to return: `missing` when its inode or handle is
/// unknown (None), else the outcome of the backing call.
fn answer(reply: ReplyEmpty, done: Option<std::io::Result<()>>, missing: i32) {
    match done {
        Some(Ok(())) => reply.ok(),
        Some(Err(e)) => reply.error(errno(&e)),
        None => reply.error(missing),
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let kind = if m.is_dir() {
        FileType::Directory
    } else if m.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino,
        size: m.len(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

impl Passthrough {
    fn path(&self, ino: u64) -> Option<PathBuf> {
        self.paths.get(&ino).cloned()
    }

    fn ino_of(&mut self, rel: PathBuf, m: &std::fs::Metadata) -> u64 {
        let ino = m.ino().max(2);
        self.paths.insert(ino, rel);
        ino
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.path(parent).map(|p| p.join(name))
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn entry(&mut self, rel: PathBuf, reply: ReplyEntry) {
        match std::fs::symlink_metadata(self.full(&rel)) {
            Ok(m) => {
                let ino = self.ino_of(rel, &m);
                reply.entry(&TTL, &attr(ino, &m), 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn add_file(&mut self, f: File) -> u64 {
        self.next_fh += 1;
        self.files.insert(self.next_fh, f);
        self.next_fh
    }
}

impl Filesystem for Passthrough {
    fn lookup(&mut self, _r: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.switch.wait_while_frozen();
        match self.child(parent, name) {
            Some(rel) => self.entry(rel, reply),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _r: &Request<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        self.switch.wait_while_frozen();
        let m = match fh.and_then(|fh| self.files.get(&fh)) {
            Some(f) => f.metadata(),
            None => match self.path(ino) {
                Some(rel) => std::fs::symlink_metadata(self.full(&rel)),
                None => return reply.error(libc::ENOENT),
            },
        };
        match m {
            Ok(m) => reply.attr(&TTL, &attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _r: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        self.switch.wait_while_frozen();
        let Some(full) = self.path(ino).map(|rel| self.full(&rel)) else {
            return reply.error(libc::ENOENT);
        };
        let result = (|| {
            if let Some(mode) = mode {
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&full, uid, gid)?;
            }
            if let Some(size) = size {
                match fh.and_then(|fh| self.files.get(&fh)) {
                    Some(f) => f.set_len(size)?,
                    None => OpenOptions::new().write(true).open(&full)?.set_len(size)?,
                }
            }
            std::fs::symlink_metadata(&full)
        })();
        match result {
            Ok(m) => reply.attr(&TTL, &attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &mut self,
        _r: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.switch.wait_while_frozen();
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        let full = self.full(&rel);
        match std::fs::create_dir(&full).and_then(|()| {
            std::fs::set_permissions(
                &full,
                std::fs::Permissions::from_mode(mode & !umask & 0o7777),
            )
        }) {
            Ok(()) => self.entry(rel, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&mut self, _r: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.switch.wait_while_frozen();
        answer(
            reply,
            self.child(parent, name)
                .map(|rel| std::fs::remove_file(self.full(&rel))),
            libc::ENOENT,
        )
    }

    fn rmdir(&mut self, _r: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.switch.wait_while_frozen();
        answer(
            reply,
            self.child(parent, name)
                .map(|rel| std::fs::remove_dir(self.full(&rel))),
            libc::ENOENT,
        )
    }

    fn rename(
        &mut self,
        _r: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        self.switch.wait_while_frozen();
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname))
        else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::rename(self.full(&from), self.full(&to)) {
            Ok(()) => {
                // Names under the old path now live under the new one.
                for p in self.paths.values_mut() {
                    if let Ok(rest) = p.strip_prefix(&from) {
                        *p = to.join(rest);
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&mut self, _r: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        self.switch.wait_while_frozen();
        let Some(full) = self.path(ino).map(|rel| self.full(&rel)) else {
            return reply.error(libc::ENOENT);
        };
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags & libc::O_TRUNC)
            .open(full)
        {
            Ok(f) => {
                let fh = self.add_file(f);
                reply.opened(fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &mut self,
        _r: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.switch.wait_while_frozen();
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        let full = self.full(&rel);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(flags & (libc::O_EXCL | libc::O_TRUNC))
            .mode(mode & !umask & 0o7777)
            .open(&full)
            .and_then(|f| f.metadata().map(|m| (f, m)));
        match opened {
            Ok((f, m)) => {
                let ino = self.ino_of(rel, &m);
                let fh = self.add_file(f);
                reply.created(&TTL, &attr(ino, &m), 0, fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _r: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        self.switch.wait_while_frozen();
        let Some(f) = self.files.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset as u64 + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..done])
    }

    fn write(
        &mut self,
        _r: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.switch.wait_while_frozen();
        match self
            .files
            .get(&fh)
            .map(|f| f.write_all_at(data, offset as u64))
        {
            Some(Ok(())) => reply.written(data.len() as u32),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(libc::EBADF),
        }
    }

    fn flush(&mut self, _r: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        self.switch.wait_while_frozen();
        reply.ok()
    }

    fn release(
        &mut self,
        _r: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(&fh);
        reply.ok()
    }

    fn fsync(&mut self, _r: &Request<'_>, _ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        self.switch.wait_while_frozen();
        let synced = self.files.get(&fh).map(|f| {
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
        });
        answer(reply, synced, libc::EBADF)
    }

    fn fsyncdir(&mut self, _r: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        self.switch.wait_while_frozen();
        answer(
            reply,
            self.path(ino)
                .map(|rel| File::open(self.full(&rel)).and_then(|d| d.sync_all())),
            libc::ENOENT,
        )
    }

    fn readdir(
        &mut self,
        _r: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        self.switch.wait_while_frozen();
        let Some(rel) = self.path(ino) else {
            return reply.error(libc::ENOENT);
        };
        let entries = match std::fs::read_dir(self.full(&rel)) {
            Ok(rd) => rd.filter_map(|e| e.ok()).collect::<Vec<_>>(),
            Err(e) => return reply.error(errno(&e)),
        };
        let mut all = vec![
            (ino, FileType::Directory, OsStr::new(".").to_owned()),
            (1, FileType::Directory, OsStr::new("..").to_owned()),
        ];
        for e in entries {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                Ok(t) if t.is_symlink() => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            let m = e.metadata().map(|m| m.ino()).unwrap_or(2);
            all.push((m.max(2), kind, e.file_name()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as i64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&mut self, _r: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        self.switch.wait_while_frozen();
        let c = std::ffi::CString::new(self.root.as_os_str().as_bytes()).unwrap();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a zeroed out-parameter of the right type.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(errno(&std::io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        )
    }

    fn access(&mut self, _r: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        self.switch.wait_while_frozen();
        reply.ok()
    }

    fn fallocate(
        &mut self,
        _r: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        use std::os::fd::AsRawFd;
        self.switch.wait_while_frozen();
        let Some(f) = self.files.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        // SAFETY: a valid descriptor; the kernel checks the rest.
        match unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, length) } {
            0 => reply.ok(),
            _ => reply.error(errno(&std::io::Error::last_os_error())),
        }
    }
}

/// A mounted pass-through filesystem (see the module doc). On drop it is thawed, its
/// connection aborted (see [`FuseDisk::abort`]) and then unmounted.
pub struct FuseDisk {
    pub switch: Switch,
    mountpoint: PathBuf,
    /// The kernel's name for the connection under /sys/fs/fuse/connections.
    connection: u64,
    session: Option<fuser::BackgroundSession>,
    _dirs: tempfile::TempDir,
}

impl FuseDisk {
    /// Mounts one in a new temporary directory; the reason where FUSE cannot be mounted
    /// (no /dev/fuse, not root).
    pub fn mount() -> Result<FuseDisk, String> {
        let dirs = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (backing, mountpoint) = (dirs.path().join("backing"), dirs.path().join("mnt"));
        std::fs::create_dir(&backing).map_err(|e| e.to_string())?;
        std::fs::create_dir(&mountpoint).map_err(|e| e.to_string())?;
        let switch = Switch::default();
        let fs = Passthrough {
            root: backing,
            paths: HashMap::from([(1, PathBuf::new())]),
            files: HashMap::new(),
            next_fh: 0,
            switch: switch.clone(),
        };
        let session = fuser::spawn_mount2(
            fs,
            &mountpoint,
            &[
                MountOption::FSName("tokenvault-test".into()),
                MountOption::RW,
            ],
        )
        .map_err(|e| format!("mount: {e}"))?;
        let dev = std::fs::metadata(&mountpoint)
            .map_err(|e| e.to_string())?
            .dev();
        // The kernel's own encoding of the device number, as the connection is named.
        let connection = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
        Ok(FuseDisk {
            switch,
            mountpoint,
            connection,
            session: Some(session),
            _dirs: dirs,
        })
    }

    /// Aborts the connection: every request waiting on it, and every later one, fails at
    /// once. Without this, a test that fails while the vault still has files open here would
    /// leave the process unable to exit: closing a FUSE file waits, uninterruptibly, for the
    /// daemon's answer to its FLUSH, and the daemon is this process.
    fn abort(&self) {
        let root = Path::new("/sys/fs/fuse/connections");
        if !root.join(self.connection.to_string()).exists() {
            let _ = std::process::Command::new("mount")
                .args(["-t", "fusectl", "none"])
                .arg(root)
                .output();
        }
        let _ = std::fs::write(root.join(self.connection.to_string()).join("abort"), "1");
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        self.switch.set(false);
        self.abort();
        drop(self.session.take());
        // After an abort the session may not have unmounted it; detach it in any case.
        if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path; EINVAL when it is no longer mounted.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
