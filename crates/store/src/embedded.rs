//! The embedded datastore: SQLite in WAL mode holding a revisioned key/value log, the way k3s's
//! kine serves etcd's model from SQL. Several processes (lab agents, the CLI, the CNI plugin) open
//! the same file at once; SQLite's locking serialises writers and WAL lets readers run alongside.
//!
//! Tables: `log` (one row per change; its row id is the revision; a NULL value is a deletion),
//! `current` (each live key's latest revision, pointing into the log, so a value is written
//! once), `meta` (compaction point). Compaction never removes a row `current` points at.
//!
//! Watches are woken at once by writes from this process, and by inotify on the store's
//! directory for commits by other processes (a commit writes the -wal file), with a slow poll
//! of `PRAGMA data_version` as a backstop: an idle store costs nothing.
//!
//! SQLite calls block; on a multi-threaded runtime they run under `block_in_place`, so the
//! runtime moves its other tasks to another worker meanwhile.
//!
//! The file is checked as it is opened and used: a new store is built under a temporary name and
//! linked into place, so a zero-length file is never a store; a file that is not a gingham store
//! is refused; a store deleted or replaced under a running process is reported, not written to
//! blindly; a user who may only read the file can still read it. Every error names the file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, watch};

use crate::{
    Datastore, Event, KeyValue, Listing, Result, Revision, StoreError, TxnOp, Watch, condition_error, prefix_end,
};

/// Exclusive upper key bound for a prefix scan; `None` for the empty prefix (everything).
fn upper_bound(prefix: &str) -> Option<Vec<u8>> {
    (!prefix.is_empty()).then(|| prefix_end(prefix))
}

/// Where the lab and the CLI keep the embedded store unless told otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/gingham/store.db";

/// How much history the store keeps for watches before compacting automatically.
const KEEP_REVISIONS: i64 = 10_000;
/// Automatic compaction runs every this many revisions.
const COMPACT_EVERY: i64 = 1_000;

/// How long the checkpointer lets commits gather before it copies them into the store.
const CHECKPOINT_DELAY: Duration = Duration::from_millis(100);
/// How long to keep looking for the commit a notification announced.
const COMMIT_WAIT: Duration = Duration::from_millis(100);
/// Backstop for missed change notifications from other processes.
const BACKSTOP_POLL: Duration = Duration::from_millis(500);
/// Rows a watcher reads per query.
const WATCH_BATCH: i64 = 512;
/// `PRAGMA application_id` of a gingham store ("gngh").
const APPLICATION_ID: i64 = 0x676e_6768;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    value BLOB,
    create_rev INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS current (
    key TEXT PRIMARY KEY,
    rev INTEGER NOT NULL,
    create_rev INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('compact_rev', 0);
";

/// History between the old compaction point and the new one that no current value needs.
const COMPACT_RANGE: &str = "DELETE FROM log WHERE rev > ?1 AND rev < ?2 \
                             AND NOT EXISTS (SELECT 1 FROM current c WHERE c.key = log.key AND c.rev = log.rev)";

/// A prefix listing. Two statements, not one with `?2 IS NULL OR …`: with the OR, SQLite cannot
/// bound the index range and walks from the prefix to the end of the table.
const LIST_RANGE: &str = "SELECT c.key, c.rev, c.create_rev, l.value FROM current c JOIN log l ON l.rev = c.rev \
                          WHERE c.key >= ?1 AND c.key < CAST(?2 AS TEXT) ORDER BY c.key";
const KEYS_RANGE: &str =
    "SELECT key, rev, create_rev FROM current WHERE key >= ?1 AND key < CAST(?2 AS TEXT) ORDER BY key";
const KEYS_FROM: &str = "SELECT key, rev, create_rev FROM current WHERE key >= ?1 ORDER BY key";
const LIST_FROM: &str = "SELECT c.key, c.rev, c.create_rev, l.value FROM current c JOIN log l ON l.rev = c.rev \
                         WHERE c.key >= ?1 ORDER BY c.key";

fn db_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
        {
            StoreError::Unavailable(format!("locked by another process for too long: {e}"))
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ReadOnly => StoreError::Unavailable(
            format!("read-only for this user: writing needs write access to the file and its directory ({e})"),
        ),
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) =>
        {
            StoreError::Backend(format!("the file is damaged or not a database: {e}"))
        }
        e => StoreError::Backend(format!("sqlite: {e}")),
    }
}

/// Run blocking SQLite work without stalling a multi-threaded runtime's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Whether to create a store where none exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    CreateIfMissing,
    /// Reading commands: a missing store is an error, not a new empty one.
    MustExist,
}

struct Shared {
    path: PathBuf,
    /// (device, inode) of the file when it was opened.
    file_id: (u64, u64),
    read_only: bool,
    conn: Mutex<Connection>,
    /// Latest revision known to this process; watchers wait on changes to it.
    notify: watch::Sender<Revision>,
    poller: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Wakes this process's checkpointer after a commit (started by the first one).
    checkpoints: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
}

impl Shared {
    /// The error, saying which file it is about.
    fn named(&self, e: StoreError) -> StoreError {
        let p = self.path.display();
        match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!("embedded store {p}: {m}")),
            StoreError::Backend(m) => StoreError::Backend(format!("embedded store {p}: {m}")),
            other => other,
        }
    }

    /// The path still names the file this process opened.
    fn check_file(&self) -> Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.file_id => Ok(()),
            Ok(_) => Err(StoreError::Unavailable(
                "was replaced by another file while this process used it: restart this process to use the new file"
                    .into(),
            )),
            Err(_) => Err(StoreError::Unavailable(
                "was deleted while this process used it; nothing more is written to the deleted file: restore it or restart this process".into(),
            )),
        }
    }
}

/// An embedded store handle; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection> {
    let base = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let opened = if read_only {
        Connection::open_with_flags(path, base | OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |_| Ok(())).map(|()| c))
            .or_else(|e| {
                // Nobody has the store open (no -wal file) and this user cannot create the shared
                // memory file: read the file as it is, which is then safe.
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if path.with_file_name(format!("{name}-wal")).exists() {
                    return Err(e);
                }
                Connection::open_with_flags(
                    format!("file:{}?immutable=1", path.display()),
                    base | OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
            })
    } else {
        Connection::open_with_flags(path, base | OpenFlags::SQLITE_OPEN_READ_WRITE)
    };
    let conn = opened.map_err(|e| StoreError::Unavailable(format!("cannot open: {e}")))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
    // Room for every statement this file prepares (about 20; rusqlite keeps 16 by default and
    // would parse the least used again and again).
    conn.set_prepared_statement_cache_capacity(64);
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        // The checkpointer thread copies frames as they come; the writer's own checkpoint, which
        // it waits for, is only a cap for a WAL that writes never paused to let start over
        // (50,000 frames: 200 MiB); a WAL that started over is cut back to 64 MiB.
        conn.pragma_update(None, "wal_autocheckpoint", 50_000).map_err(db_err)?;
        conn.pragma_update(None, "journal_size_limit", 64 << 20).map_err(db_err)?;
    }
    // NORMAL in WAL mode: a crashed process loses nothing committed; only power loss can drop
    // the last transactions, never corrupt the file.
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(db_err)?;
    Ok(conn)
}

/// Build a new, empty store under a temporary name and link it into place (if someone else
/// was quicker, theirs stays): no process ever sees a half-made store at `path`.
fn create_store(path: &Path) -> Result<()> {
    let unavailable = |m: String| StoreError::Unavailable(m);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        gingham_files::ensure_dir(dir, 0o755).map_err(|e| unavailable(format!("cannot create its directory: {e}")))?;
    }
    let tmp = gingham_files::temp_path(path);
    drop(gingham_files::create_exclusive(&tmp, 0o644).map_err(|e| unavailable(e.to_string()))?);
    let built = (|| {
        let conn = open_connection(&tmp, false)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(db_err)?;
        drop(conn);
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(unavailable(format!("cannot create: {e}"))),
        }
    })();
    for suffix in ["", "-wal", "-shm"] {
        let _ = gingham_files::remove_file_if_regular(Path::new(&format!("{}{suffix}", tmp.display())));
    }
    built
}

/// Refuse what is not a gingham store; a store made before the application id existed gets it.
fn check_store(conn: &Connection, read_only: bool) -> Result<()> {
    let id: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(db_err)?;
    if id == APPLICATION_ID {
        return Ok(());
    }
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('log', 'current', 'meta')",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if id != 0 || tables != 3 {
        return Err(StoreError::Backend(
            "is an SQLite database but not a gingham store (wrong application id or tables): point --store-path at the right file"
                .into(),
        ));
    }
    if !read_only {
        conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(db_err)?;
    }
    Ok(())
}

impl EmbeddedStore {
    /// Open the store at `path`, creating it (and its directory) if there is none.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, OpenMode::CreateIfMissing)
    }

    pub fn open_with(path: impl AsRef<Path>, mode: OpenMode) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let named = |e: StoreError| {
            let p = path.display();
            match e {
                StoreError::Unavailable(m) => StoreError::Unavailable(format!("embedded store {p}: {m}")),
                StoreError::Backend(m) => StoreError::Backend(format!("embedded store {p}: {m}")),
                other => other,
            }
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && mode == OpenMode::MustExist => {
                return Err(named(StoreError::Unavailable(
                    "does not exist: nothing has been stored yet (`gingham apply` creates it), or the path is wrong"
                        .into(),
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_store(&path).map_err(named)?;
                std::fs::metadata(&path).map_err(|e| named(StoreError::Unavailable(e.to_string())))?
            }
            Err(e) => return Err(named(StoreError::Unavailable(e.to_string()))),
        };
        if !meta.is_file() {
            return Err(named(StoreError::Unavailable("is not a regular file".into())));
        }
        if meta.len() == 0 {
            return Err(named(StoreError::Backend(
                "is empty (0 bytes), so it is not a gingham store: remove it, or point --store-path at the right file"
                    .into(),
            )));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let read_only = nix::unistd::access(&path, nix::unistd::AccessFlags::W_OK).is_err()
            || nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err();
        let conn = open_connection(&path, read_only).map_err(named)?;
        check_store(&conn, read_only).map_err(named)?;
        if !read_only {
            conn.execute_batch(SCHEMA).map_err(db_err).map_err(named)?;
        }
        let rev = current_revision(&conn).map_err(db_err).map_err(named)?;
        let (notify, _) = watch::channel(rev);
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                file_id: (meta.dev(), meta.ino()),
                read_only,
                path,
                conn: Mutex::new(conn),
                notify,
                poller: Mutex::new(None),
                checkpoints: Mutex::new(None),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether this handle may only read (the user lacks write access).
    pub fn read_only(&self) -> bool {
        self.shared.read_only
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection itself usable.
        self.shared.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on this handle's connection (blocking work, see the module doc), after checking
    /// that the file is still the one opened; errors name the file.
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        blocking(|| {
            self.shared.check_file()?;
            f(&mut self.conn())
        })
        .map_err(|e| self.shared.named(e))
    }

    /// Run `f` in an IMMEDIATE transaction (takes the write lock up front, so the reads inside
    /// it see the state the write applies to) and wake local watchers.
    fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<(T, Revision)>) -> Result<T> {
        if self.shared.read_only {
            return Err(self.shared.named(StoreError::Unavailable(
                "is read-only for this user: writing needs write access to the file and its directory".into(),
            )));
        }
        let (out, rev) = self.with_conn(|conn| {
            let tx = Tx::begin(conn, true).map_err(db_err)?;
            let (out, rev) = f(&tx)?;
            // A transaction of many writes moves the revision by many: compare, not modulo.
            if rev - compact_rev(&tx).map_err(db_err)? > KEEP_REVISIONS + COMPACT_EVERY {
                compact_tx(&tx, rev - KEEP_REVISIONS)?;
            }
            tx.commit().map_err(db_err)?;
            Ok((out, rev))
        })?;
        self.shared.notify.send_if_modified(|r| {
            let newer = rev > *r;
            *r = (*r).max(rev);
            newer
        });
        self.request_checkpoint();
        Ok(out)
    }

    /// Copy committed WAL frames into the store off the commit path: a checkpoint of thousands
    /// of frames takes a disk flush of 100 ms or more, which a writer left to SQLite's automatic
    /// checkpoint would wait for (it stays, at a size only a checkpointer falling behind reaches).
    /// Durability is unchanged: a commit is in the WAL either way.
    fn request_checkpoint(&self) {
        let mut slot = self.shared.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let Ok(conn) = open_connection(&self.shared.path, false) else { return };
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let started = std::thread::Builder::new().name("store-checkpoint".into()).spawn(move || {
                // Ends when the store is dropped (the sender with it).
                while rx.recv().is_ok() {
                    // A burst of commits gathers into one checkpoint.
                    std::thread::sleep(CHECKPOINT_DELAY);
                    while rx.try_recv().is_ok() {}
                    // PASSIVE: never waits for readers or the writer; what it skips, the next takes.
                    // (A RESTART, which would start the WAL over under steady writes, holds the
                    // writers for its disk flush: 50–180 ms here. The WAL starts over by itself
                    // at the first pause in writes.)
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
            });
            if started.is_err() {
                return;
            }
            *slot = Some(tx);
        }
        if let Some(tx) = slot.as_ref() {
            let _ = tx.try_send(());
        }
    }

    /// Start the one task per store that notices other processes' commits: woken by inotify on
    /// the store's directory (a commit writes the -wal file, a checkpoint the store itself),
    /// with a slow poll as a backstop.
    fn ensure_poller(&self) -> Result<()> {
        let mut slot = self.shared.poller.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        let conn = open_connection(&self.shared.path, self.shared.read_only).map_err(|e| self.shared.named(e))?;
        let changes = crate::notify::DirChanges::new(&self.shared.path).ok();
        let weak = Arc::downgrade(&self.shared);
        *slot = Some(tokio::spawn(async move {
            let mut changes = changes;
            let mut last_version: i64 = -1;
            poll_commit(&conn, &weak, &mut last_version);
            // Set while a notification has not been matched by a visible commit yet.
            let mut until: Option<tokio::time::Instant> = None;
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                let wait = if until.is_some() { Duration::from_millis(1) } else { BACKSTOP_POLL };
                let notified = match changes.as_mut() {
                    Some(c) => tokio::time::timeout(wait, c.next()).await.is_ok(),
                    None => {
                        tokio::time::sleep(wait).await;
                        false
                    }
                };
                if poll_commit(&conn, &weak, &mut last_version) {
                    until = None;
                    continue;
                }
                if notified {
                    // The WAL is written a moment before its index makes the commit visible:
                    // look again within microseconds (off the async workers) ...
                    let seen = blocking(|| {
                        (0..20).any(|_| {
                            std::thread::sleep(Duration::from_micros(50));
                            poll_commit(&conn, &weak, &mut last_version)
                        })
                    });
                    // ... then every millisecond for a while (a long transaction, whose last
                    // write may come with no notification after it).
                    until = (!seen).then(|| tokio::time::Instant::now() + COMMIT_WAIT);
                } else if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                    until = None;
                }
            }
        }));
        Ok(())
    }
}

/// Whether another connection committed since `last` (then local watchers are told the new
/// revision). A notification can come a moment before the commit it announces is visible: the
/// WAL is written before its index.
fn poll_commit(conn: &Connection, weak: &std::sync::Weak<Shared>, last: &mut i64) -> bool {
    let Some(shared) = weak.upgrade() else { return false };
    let Ok(version) = blocking(|| conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))) else {
        return false;
    };
    if version == *last {
        return false;
    }
    *last = version;
    if let Ok(rev) = blocking(|| current_revision(conn)) {
        shared.notify.send_if_modified(|r| {
            let newer = rev > *r;
            *r = (*r).max(rev);
            newer
        });
    }
    true
}

fn current_revision(conn: &Connection) -> rusqlite::Result<Revision> {
    conn.prepare_cached("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'log'), 0)")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
}

fn compact_rev(conn: &Connection) -> rusqlite::Result<Revision> {
    conn.prepare_cached("SELECT value FROM meta WHERE name = 'compact_rev'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
}

/// A transaction begun and ended through cached statements (rusqlite's own parses its BEGIN and
/// COMMIT every time: a measurable part of a small write); rolled back if dropped unfinished.
struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Tx<'c> {
    /// `immediate`: take the write lock up front (BEGIN IMMEDIATE), else when first needed.
    fn begin(conn: &'c Connection, immediate: bool) -> rusqlite::Result<Tx<'c>> {
        conn.prepare_cached(if immediate { "BEGIN IMMEDIATE" } else { "BEGIN DEFERRED" })?.execute([])?;
        Ok(Tx { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
        }
    }
}

/// Forget history below `rev`. Every row at or below the compaction point is one `current`
/// points at (`append` drops such a row as soon as it is superseded), so only the rows between
/// the old point and `rev` are looked at: the cost is the history dropped, not the store's size.
fn compact_tx(tx: &Connection, rev: Revision) -> Result<()> {
    let from = compact_rev(tx).map_err(db_err)?;
    tx.execute(COMPACT_RANGE, params![from, rev]).map_err(db_err)?;
    tx.execute("UPDATE meta SET value = MAX(value, ?1 - 1) WHERE name = 'compact_rev'", params![rev])
        .map_err(db_err)?;
    Ok(())
}

fn current_row(tx: &Connection, key: &str) -> Result<Option<(Revision, Revision)>> {
    // Cached statements: a transaction asks this once per operation, and parsing SQL is a
    // good part of a small transaction's cost.
    tx.prepare_cached("SELECT rev, create_rev FROM current WHERE key = ?1")
        .and_then(|mut s| s.query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_err)
}

/// The newest revision of any key under `prefix` (0 if none).
fn newest_under(tx: &Connection, prefix: &str) -> Result<Revision> {
    let q = match upper_bound(prefix) {
        Some(end) => tx
            .prepare_cached("SELECT COALESCE(MAX(rev), 0) FROM current WHERE key >= ?1 AND key < CAST(?2 AS TEXT)")
            .and_then(|mut s| s.query_row(params![prefix, end], |r| r.get(0))),
        None => tx
            .prepare_cached("SELECT COALESCE(MAX(rev), 0) FROM current")
            .and_then(|mut s| s.query_row([], |r| r.get(0))),
    };
    q.map_err(db_err)
}

/// Append a change to the log and apply it to `current`; returns the new revision.
fn append(tx: &Connection, key: &str, value: Option<&[u8]>, create_rev: Option<Revision>) -> Result<Revision> {
    let run = |sql: &str, p: &[&dyn rusqlite::ToSql]| tx.prepare_cached(sql).and_then(|mut s| s.execute(p));
    // The value being replaced is history; below the compaction point nobody can watch it.
    run(
        "DELETE FROM log WHERE rev = (SELECT rev FROM current WHERE key = ?1) \
         AND rev <= (SELECT value FROM meta WHERE name = 'compact_rev')",
        params![key],
    )
    .map_err(db_err)?;
    run("INSERT INTO log (key, value, create_rev) VALUES (?1, ?2, ?3)", params![key, value, create_rev.unwrap_or(0)])
        .map_err(db_err)?;
    let rev = tx.last_insert_rowid();
    match value {
        Some(_) => {
            let create = create_rev.unwrap_or(rev);
            run(
                "INSERT INTO current (key, rev, create_rev) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET rev = excluded.rev",
                params![key, rev, create],
            )
            .map_err(db_err)?;
        }
        None => {
            run("DELETE FROM current WHERE key = ?1", params![key]).map_err(db_err)?;
        }
    }
    Ok(rev)
}

#[async_trait]
impl Datastore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.shared.path.display())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.with_conn(|conn| {
            conn.prepare_cached(
                "SELECT c.rev, c.create_rev, l.value FROM current c JOIN log l ON l.rev = c.rev WHERE c.key = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![key], |r| {
                    Ok(KeyValue {
                        key: key.to_string(),
                        mod_revision: r.get(0)?,
                        create_revision: r.get(1)?,
                        value: r.get(2)?,
                    })
                })
                .optional()
            })
            .map_err(db_err)
        })
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let mut items = Vec::new();
        let revision = self.list_pages(prefix, usize::MAX, &mut |page| items.extend(page)).await?;
        Ok(Listing { items, revision })
    }

    async fn list_keys(&self, prefix: &str) -> Result<Listing> {
        self.with_conn(|conn| {
            let tx = Tx::begin(conn, false).map_err(db_err)?;
            let end = upper_bound(prefix);
            let items = {
                let mut stmt = tx.prepare_cached(if end.is_some() { KEYS_RANGE } else { KEYS_FROM }).map_err(db_err)?;
                let row = |r: &rusqlite::Row<'_>| {
                    Ok(KeyValue {
                        key: r.get(0)?,
                        mod_revision: r.get(1)?,
                        create_revision: r.get(2)?,
                        value: Vec::new(),
                    })
                };
                match &end {
                    Some(end) => stmt.query_map(params![prefix, end], row),
                    None => stmt.query_map(params![prefix], row),
                }
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(db_err)?
            };
            let revision = current_revision(&tx).map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(Listing { items, revision })
        })
    }

    async fn list_pages(
        &self,
        prefix: &str,
        page: usize,
        visit: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        self.with_conn(|conn| {
            // One read transaction: every page and the revision are one consistent snapshot.
            let tx = Tx::begin(conn, false).map_err(db_err)?;
            let end = upper_bound(prefix);
            {
                let mut stmt = tx.prepare_cached(if end.is_some() { LIST_RANGE } else { LIST_FROM }).map_err(db_err)?;
                let mut rows = match &end {
                    Some(end) => stmt.query(params![prefix, end]),
                    None => stmt.query(params![prefix]),
                }
                .map_err(db_err)?;
                let mut batch = Vec::new();
                while let Some(r) = rows.next().map_err(db_err)? {
                    batch.push(KeyValue {
                        key: r.get(0).map_err(db_err)?,
                        mod_revision: r.get(1).map_err(db_err)?,
                        create_revision: r.get(2).map_err(db_err)?,
                        value: r.get(3).map_err(db_err)?,
                    });
                    if batch.len() >= page {
                        visit(std::mem::take(&mut batch));
                    }
                }
                if !batch.is_empty() {
                    visit(batch);
                }
            }
            let revision = current_revision(&tx).map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(revision)
        })
    }

    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.write(|tx| {
            if current_row(tx, key)?.is_some() {
                return Err(StoreError::AlreadyExists { key: key.into() });
            }
            let rev = append(tx, key, Some(value), None)?;
            Ok((rev, rev))
        })
    }

    async fn update(&self, key: &str, value: &[u8], revision: Revision) -> Result<Revision> {
        self.write(|tx| {
            let Some((rev, create)) = current_row(tx, key)? else {
                return Err(StoreError::NotFound { key: key.into() });
            };
            if rev != revision {
                return Err(StoreError::Conflict { key: key.into(), expected: revision, actual: rev });
            }
            let rev = append(tx, key, Some(value), Some(create))?;
            Ok((rev, rev))
        })
    }

    async fn delete(&self, key: &str, revision: Option<Revision>) -> Result<Revision> {
        self.write(|tx| {
            let Some((rev, create)) = current_row(tx, key)? else {
                return Err(StoreError::NotFound { key: key.into() });
            };
            if let Some(expected) = revision.filter(|e| *e != rev) {
                return Err(StoreError::Conflict { key: key.into(), expected, actual: rev });
            }
            let rev = append(tx, key, None, Some(create))?;
            Ok((rev, rev))
        })
    }

    async fn txn(&self, ops: &[TxnOp]) -> Result<Vec<Revision>> {
        self.write(|tx| {
            let mut current = Vec::with_capacity(ops.len());
            for op in ops {
                if let TxnOp::Unchanged { prefix, since } = op {
                    let newest = newest_under(tx, prefix)?;
                    if let Some(e) = crate::unchanged_error(prefix, *since, newest) {
                        return Err(e);
                    }
                    current.push(Some((newest, 0)));
                    continue;
                }
                let row = current_row(tx, op.key())?;
                if let Some(e) = condition_error(op.key(), op.condition(), row.map(|(r, _)| r)) {
                    return Err(e);
                }
                current.push(row);
            }
            // Each log row has its own revision; readers never see part of the transaction, as
            // all rows commit together.
            let mut revs = Vec::with_capacity(ops.len());
            for (op, row) in ops.iter().zip(current) {
                revs.push(match op {
                    TxnOp::Put { key, value, .. } => append(tx, key, Some(value), row.map(|(_, c)| c))?,
                    TxnOp::Delete { key, .. } if row.is_some() => append(tx, key, None, row.map(|(_, c)| c))?,
                    TxnOp::Delete { .. } => current_revision(tx).map_err(db_err)?,
                    // Guards write nothing: the revision they saw.
                    TxnOp::Check { .. } | TxnOp::Unchanged { .. } => row.map_or(0, |(r, _)| r),
                });
            }
            let last = revs.iter().copied().max().unwrap_or_default();
            Ok((revs, last))
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        self.ensure_poller()?;
        let named = |e| self.shared.named(e);
        let conn = blocking(|| open_connection(&self.shared.path, self.shared.read_only)).map_err(named)?;
        let start =
            if from > 0 { from } else { blocking(|| current_revision(&conn)).map_err(db_err).map_err(named)? + 1 };
        let compacted = blocking(|| compact_rev(&conn)).map_err(db_err).map_err(named)?;
        let (tx, rx) = mpsc::channel(1024);
        if start <= compacted {
            let _ = tx.try_send(Err(StoreError::Compacted { requested: start, compacted }));
            return Ok(Watch::new(rx, tokio::spawn(async {})));
        }
        let mut wake = self.shared.notify.subscribe();
        let prefix = prefix.to_string();
        let end = upper_bound(&prefix);
        let task = tokio::spawn(async move {
            let mut next = start;
            loop {
                // Drain everything up to the newest revision, a batch at a time.
                loop {
                    let batch = blocking(|| read_log(&conn, &prefix, &end, next));
                    let batch = match batch {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    let Some(&(last_rev, _)) = batch.last() else {
                        break;
                    };
                    let full = batch.len() as i64 == WATCH_BATCH;
                    for (_, ev) in batch {
                        if let Some(ev) = ev {
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                    }
                    next = last_rev + 1;
                    if !full {
                        break;
                    }
                }
                // History we have not read yet may have been compacted away meanwhile.
                if let Ok(c) = blocking(|| compact_rev(&conn)) {
                    if next <= c {
                        let _ = tx.send(Err(StoreError::Compacted { requested: next, compacted: c })).await;
                        return;
                    }
                }
                if wake.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch::new(rx, task))
    }

    async fn revision(&self) -> Result<Revision> {
        self.with_conn(|conn| current_revision(conn).map_err(db_err))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.with_conn(|conn| {
            let tx = Tx::begin(conn, true).map_err(db_err)?;
            let current = current_revision(&tx).map_err(db_err)?;
            if revision > current {
                return Err(StoreError::Backend(format!(
                    "cannot compact to {revision}: the store is only at {current}"
                )));
            }
            compact_tx(&tx, revision)?;
            tx.commit().map_err(db_err)
        })
    }
}

/// Log rows with rev ≥ `from`, in order. Rows outside the prefix come back as `None` so the
/// caller still advances past them (the scan is by revision, not by key).
fn read_log(
    conn: &Connection,
    prefix: &str,
    end: &Option<Vec<u8>>,
    from: Revision,
) -> Result<Vec<(Revision, Option<Event>)>> {
    let mut stmt = conn
        .prepare_cached("SELECT rev, key, value, create_rev FROM log WHERE rev >= ?1 ORDER BY rev LIMIT ?2")
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![from, WATCH_BATCH], |r| {
            let rev: Revision = r.get(0)?;
            let key: String = r.get(1)?;
            let value: Option<Vec<u8>> = r.get(2)?;
            let create: Revision = r.get(3)?;
            Ok((rev, key, value, create))
        })
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (rev, key, value, create) = row.map_err(db_err)?;
        let inside = key.as_bytes() >= prefix.as_bytes() && end.as_ref().is_none_or(|e| key.as_bytes() < e.as_slice());
        // A create is logged with create_rev 0: it was created at its own revision.
        let create = if create == 0 { rev } else { create };
        let ev = inside.then(|| match value {
            Some(value) => Event::Put(KeyValue { key, value, mod_revision: rev, create_revision: create }),
            None => Event::Delete { key, revision: rev },
        });
        out.push((rev, ev));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prefix listing reads only its key range: SQLite's plan bounds the index on both sides.
    #[test]
    fn prefix_listing_is_a_bounded_index_range() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {LIST_RANGE}"))
            .unwrap()
            .query_map(params!["/a/", b"/a0".to_vec()], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(plan.iter().any(|p| p.contains("key>? AND key<?")), "the listing scans beyond its prefix: {plan:?}");
    }

    fn log_revs(conn: &Connection) -> Vec<Revision> {
        conn.prepare("SELECT rev FROM log ORDER BY rev")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    /// Compaction keeps every current value and all history above its point, drops the rest,
    /// and a value superseded below the point goes at once (so the next compaction need not
    /// look there).
    #[test]
    fn compaction_drops_only_unwatchable_history() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let tx = conn.transaction().unwrap();
        let a1 = append(&tx, "/a", Some(b"1"), None).unwrap();
        let b1 = append(&tx, "/b", Some(b"1"), None).unwrap();
        let a2 = append(&tx, "/a", Some(b"2"), Some(a1)).unwrap();
        let c1 = append(&tx, "/c", Some(b"1"), None).unwrap();
        let c_del = append(&tx, "/c", None, None).unwrap();
        let d1 = append(&tx, "/d", Some(b"1"), None).unwrap();
        compact_tx(&tx, d1).unwrap();
        // a1 superseded, c gone: only current rows below the point, and the point's own row.
        assert_eq!(log_revs(&tx), vec![b1, a2, d1]);
        assert!(c1 < c_del);
        // b's value is below the point: replacing it removes the old row at once.
        let b2 = append(&tx, "/b", Some(b"2"), Some(b1)).unwrap();
        assert_eq!(log_revs(&tx), vec![a2, d1, b2]);
        // d's value is above the point: it stays as history until the next compaction.
        let d2 = append(&tx, "/d", Some(b"2"), Some(d1)).unwrap();
        assert_eq!(log_revs(&tx), vec![a2, d1, b2, d2]);
        compact_tx(&tx, d2 + 1).unwrap();
        assert_eq!(log_revs(&tx), vec![a2, b2, d2]);
        assert_eq!(compact_rev(&tx).unwrap(), d2);
    }

    /// Compaction reads the log only between the old and new points, and looks rows up in
    /// `current` by key: its cost does not grow with the store.
    #[test]
    fn compaction_is_a_bounded_range() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {COMPACT_RANGE}"))
            .unwrap()
            .query_map(params![1, 2], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(plan.iter().any(|p| p.contains("rowid>? AND rowid<?")), "{plan:?}");
        assert!(plan.iter().any(|p| p.contains("PRIMARY KEY (key=?)")), "{plan:?}");
    }
}
