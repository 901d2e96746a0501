//! The agent's unix socket for the CNI plugin: created with mode 0660 whatever the umask, one
//! bounded request line per connection (with the pod's namespace passed as a descriptor), and a
//! bounded number of connections at once.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use gingham_cni::proto::{MAX_REQUEST, Message, recv_with_fds};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// A request line must arrive within this long of connecting.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// Bind the socket at `path`: a fresh socket is bound under a temporary name, given mode 0660,
/// then renamed into place. Whatever is at `path` must be a socket (an old agent's): anything
/// else is refused rather than replaced.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        gingham_files::ensure_dir(dir, 0o755).map_err(|e| e.to_string())?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => return Err("exists and is not a socket: remove it or choose another --socket".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    let tmp = gingham_files::temp_path(path);
    let listener = UnixListener::bind(&tmp).map_err(|e| e.to_string())?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.to_string());
    }
    Ok(listener)
}

/// Remove our socket on exit, if it is still a socket.
pub fn remove(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the request is longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("no complete request within {READ_TIMEOUT:?}")]
    Timeout,
    #[error("the request is not readable: {0}")]
    Decode(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Read one request line and the descriptors sent with it.
pub async fn read_request(stream: &UnixStream) -> Result<(Message, Vec<File>), ReadError> {
    let read = async {
        let mut line = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let (n, more) = stream.async_io(Interest::READABLE, || recv_with_fds(stream.as_raw_fd(), &mut buf)).await?;
            fds.extend(more);
            if n == 0 {
                return Err(ReadError::Decode("the connection closed before the request ended".into()));
            }
            let chunk = &buf[..n];
            if let Some(end) = chunk.iter().position(|b| *b == b'\n') {
                line.extend_from_slice(&chunk[..end]);
                break;
            }
            line.extend_from_slice(chunk);
            if line.len() > MAX_REQUEST {
                return Err(ReadError::TooLong);
            }
        }
        if line.len() > MAX_REQUEST {
            return Err(ReadError::TooLong);
        }
        let msg: Message = serde_json::from_slice(&line).map_err(|e| ReadError::Decode(e.to_string()))?;
        Ok((msg, fds.into_iter().map(File::from).collect()))
    };
    tokio::time::timeout(READ_TIMEOUT, read).await.map_err(|_| ReadError::Timeout)?
}

/// Whether the caller has closed its end (it gave up, or was killed).
pub fn peer_gone(stream: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        nix::sys::socket::recv(
            stream.as_raw_fd(),
            &mut b,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
        ),
        Ok(0) | Err(nix::errno::Errno::ECONNRESET)
    )
}
