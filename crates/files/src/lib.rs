//! Creating files the safe way. Every file gingham writes for others to read (CNI configuration,
//! plugin binaries, the lab's state, the agent's socket) goes through here:
//! - modes are set explicitly after creation, so the umask can neither widen nor narrow them;
//! - content is written to a fresh temporary file opened with `O_CREAT | O_EXCL | O_NOFOLLOW`
//!   in the target's directory, so a symlink planted at a predictable name is never followed,
//!   then renamed over the target, so readers see the old file or the new one, never half;
//! - directories are created with an explicit mode; existing ones are left as they are.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FileError {
    pub path: String,
    pub message: String,
}

impl FileError {
    fn new(path: &Path, message: impl std::fmt::Display) -> Self {
        FileError { path: path.display().to_string(), message: message.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, FileError>;

/// Create `dir` and any missing parents with `mode`. Existing directories keep their mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => return Err(FileError::new(dir, "exists and is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FileError::new(dir, e)),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent, mode)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, Permissions::from_mode(mode)).map_err(|e| FileError::new(dir, e)),
        // Someone else created it meanwhile: theirs, leave it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(FileError::new(dir, e)),
    }
}

/// A fresh, unpredictable name next to `target` for a temporary file.
pub fn temp_path(target: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 8];
    let random = File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut r))
        .map(|()| u64::from_le_bytes(r))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = format!(".{name}.{}.{:x}.{random:016x}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    target.with_file_name(unique)
}

/// Open a new file at `path` for writing: it must not exist (not even as a symlink).
fn create_new(path: &Path, mode: u32) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| FileError::new(path, e))?;
    f.set_permissions(Permissions::from_mode(mode)).map_err(|e| FileError::new(path, e))?;
    Ok(f)
}

/// Put `path` in place by renaming `tmp` over it, removing `tmp` if anything fails.
fn finish(tmp: &Path, path: &Path, f: File, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let mut f = f;
    let done = write(&mut f).and_then(|()| f.sync_all()).map_err(|e| FileError::new(path, e)).and_then(|()| {
        drop(f);
        std::fs::rename(tmp, path).map_err(|e| FileError::new(path, e))
    });
    if done.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    done
}

/// Write `data` to `path` with exactly `mode`, atomically. A symlink at `path` is replaced,
/// never followed.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = temp_path(path);
    let f = create_new(&tmp, mode)?;
    finish(&tmp, path, f, |f| f.write_all(data))
}

/// Copy `src` to `dst` with exactly `mode`, atomically (a running program keeps its old inode).
pub fn copy_atomic(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let mut input = File::open(src).map_err(|e| FileError::new(src, e))?;
    let tmp = temp_path(dst);
    let f = create_new(&tmp, mode)?;
    finish(&tmp, dst, f, |f| std::io::copy(&mut input, f).map(|_| ()))
}

/// Create a new file (it must not exist, not even as a symlink) with exactly `mode`, for
/// appending logs and the like.
pub fn create_exclusive(path: &Path, mode: u32) -> Result<File> {
    create_new(path, mode)
}

/// Remove `path` only if it is a regular file (never what a symlink points at, never a
/// directory); absent is fine.
pub fn remove_file_if_regular(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {
            std::fs::remove_file(path).map(|()| true).map_err(|e| FileError::new(path, e))
        }
        Ok(_) => Err(FileError::new(path, "is not a regular file: left alone")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FileError::new(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_hold_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o000));
        let f = d.path().join("a.conf");
        write_atomic(&f, b"x", 0o644).unwrap();
        let sub = d.path().join("x/y");
        ensure_dir(&sub, 0o755).unwrap();
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let g = d.path().join("b.conf");
        write_atomic(&g, b"y", 0o644).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!((mode(&f), mode(&g), mode(&sub), mode(&d.path().join("x"))), (0o644, 0o644, 0o755, 0o755));
    }

    #[test]
    fn planted_symlinks_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // At the target name: replaced, the victim untouched.
        let target = d.path().join("10-gingham.conflist");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomic(&target, b"{}", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&target).unwrap().file_type().is_file());
        // At a temporary name: refused.
        let tmp = d.path().join("t");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(create_exclusive(&tmp, 0o600).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // Removal: a symlink or directory is left alone.
        assert!(remove_file_if_regular(&tmp).is_err());
        assert!(remove_file_if_regular(d.path()).is_err());
        assert!(remove_file_if_regular(&target).unwrap());
        assert!(!remove_file_if_regular(&target).unwrap());
        // No temporaries are left behind.
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
