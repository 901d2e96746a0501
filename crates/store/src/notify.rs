//! Change notification for the embedded store: inotify on the store's directory, filtered to the
//! store file and its -wal companion.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The inotify instance, as tokio's reactor wants it.
struct Instance(Inotify);

impl AsRawFd for Instance {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct DirChanges {
    fd: AsyncFd<Instance>,
    names: [OsString; 2],
}

impl DirChanges {
    pub fn new(store: &Path) -> std::io::Result<DirChanges> {
        let dir = store.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = store.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let mut wal = name.clone();
        wal.push("-wal");
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        ino.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CLOSE_WRITE,
        )?;
        // SAFETY: the descriptor is owned by the Instance inside the AsyncFd, so it stays open
        // exactly as long as it is registered.
        let fd = unsafe { AsyncFd::register(Instance(ino))? };
        Ok(DirChanges { fd, names: [name, wal] })
    }

    /// Wait until the store or its WAL changes (or the kernel's event queue overflowed).
    pub async fn next(&mut self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else { return };
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    let ours = events.iter().any(|e| {
                        e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                            || e.name.as_ref().is_some_and(|n| self.names.contains(n))
                    });
                    if ours {
                        return;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(_) => return,
            }
        }
    }
}
