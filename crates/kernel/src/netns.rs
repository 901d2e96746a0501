//! Named network namespaces the way iproute2 keeps them (`/run/netns/NAME`, a bind mount of
//! the namespace), so `ip netns` and gingham see the same ones; and commands started inside a
//! namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::{KernelError, Result};

pub const RUN_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

fn err(path: &Path, e: impl std::fmt::Display) -> KernelError {
    KernelError::Netns { path: path.display().to_string(), message: e.to_string() }
}

fn check(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok { Ok(()) } else { Err(err(&path(name), "not a valid namespace name")) }
}

/// `/run/netns` as iproute2 sets it up: a shared mount point, so namespaces mounted later are
/// seen in mount namespaces made earlier.
fn ensure_run_dir() -> Result<()> {
    let dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let shared = |flags| mount(None::<&str>, dir, Some("none"), flags, None::<&str>);
    match shared(MsFlags::MS_SHARED | MsFlags::MS_REC) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some(dir), dir, Some("none"), MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(|e| err(dir, e))?;
            shared(MsFlags::MS_SHARED | MsFlags::MS_REC).map_err(|e| err(dir, e))
        }
        Err(e) => Err(err(dir, e)),
    }
}

/// Create the named namespace (`ip netns add NAME`); an existing one is an error.
pub fn add(name: &str) -> Result<PathBuf> {
    check(name)?;
    ensure_run_dir()?;
    let p = path(name);
    std::fs::OpenOptions::new().write(true).create_new(true).open(&p).map_err(|e| err(&p, e))?;
    let target = p.clone();
    let made = std::thread::spawn(move || -> Result<()> {
        // A thread of its own unshares, so no other thread changes namespace.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(&target, e))?;
        mount(Some("/proc/thread-self/ns/net"), &target, Some("none"), MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| err(&target, e))
    })
    .join()
    .map_err(|_| err(&p, "worker thread panicked"))
    .and_then(|r| r);
    if made.is_err() {
        let _ = std::fs::remove_file(&p);
    }
    made.map(|()| p)
}

/// Remove the named namespace (`ip netns del NAME`); its devices go when nothing else holds it.
/// Absent is fine.
pub fn delete(name: &str) -> Result<()> {
    check(name)?;
    let p = path(name);
    if std::fs::symlink_metadata(&p).is_err() {
        return Ok(());
    }
    match umount2(&p, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(err(&p, e)),
    }
    std::fs::remove_file(&p).map_err(|e| err(&p, e))
}

/// A command that runs `program` inside the namespace `ns` (entered between fork and exec; the
/// calling process never changes namespace).
pub fn command(ns: &File, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let ns = ns.try_clone().map_err(|e| err(Path::new("netns fd"), e))?;
    let mut c = Command::new(program);
    // SAFETY: the closure runs in the child between fork and exec and only calls setns(2),
    // which is async-signal-safe; `ns` is an open descriptor moved into the closure.
    unsafe {
        c.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    Ok(c)
}
