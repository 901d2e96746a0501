//! One conformance suite, run on both backends: the embedded SQLite store and a real etcd
//! server (the etcd-server package) started on a free loopback port for each test.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gingham_store::embedded::EmbeddedStore;
use gingham_store::testing::{EtcdServer, write_test_certificates};
use gingham_store::{Condition, Datastore, Event, StoreError, TxnOp};

const WAIT: Duration = Duration::from_secs(10);

/// Keeps the temporary directory or the etcd process alive for the test's duration.
#[allow(dead_code)]
enum Backend {
    Embedded(tempfile::TempDir),
    Etcd(EtcdServer),
}

async fn open(kind: &str) -> (Arc<dyn Datastore>, Backend) {
    match kind {
        "embedded" => {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(dir.path().join("store.db")).unwrap();
            (Arc::new(store), Backend::Embedded(dir))
        }
        _ => {
            let base = if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") };
            let server =
                EtcdServer::start_in(base).expect("etcd-server must be installed (the test command installs it)");
            let store = server.connect().await.unwrap();
            (Arc::new(store), Backend::Etcd(server))
        }
    }
}

async fn create_get_and_exists(ds: &dyn Datastore) {
    let rev = ds.create("/t/a", b"1").await.unwrap();
    let kv = ds.get("/t/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision, kv.create_revision), (&b"1"[..], rev, rev));
    assert_eq!(ds.create("/t/a", b"2").await, Err(StoreError::AlreadyExists { key: "/t/a".into() }));
    assert_eq!(ds.get("/t/a").await.unwrap().unwrap().value, b"1", "a failed create changes nothing");
    assert_eq!(ds.get("/t/missing").await.unwrap(), None);
    assert!(ds.revision().await.unwrap() >= rev);
}

async fn compare_and_swap(ds: &dyn Datastore) {
    let r1 = ds.create("/t/cas", b"v1").await.unwrap();
    let r2 = ds.update("/t/cas", b"v2", r1).await.unwrap();
    assert!(r2 > r1);
    match ds.update("/t/cas", b"stale", r1).await {
        Err(StoreError::Conflict { expected, actual, .. }) => assert_eq!((expected, actual), (r1, r2)),
        other => panic!("stale update must conflict, got {other:?}"),
    }
    let kv = ds.get("/t/cas").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision, kv.create_revision), (&b"v2"[..], r2, r1));
    assert_eq!(ds.update("/t/none", b"x", 1).await, Err(StoreError::NotFound { key: "/t/none".into() }));
}

async fn delete_at_revision(ds: &dyn Datastore) {
    let r1 = ds.create("/t/d", b"x").await.unwrap();
    let r2 = ds.update("/t/d", b"y", r1).await.unwrap();
    assert!(matches!(ds.delete("/t/d", Some(r1)).await, Err(StoreError::Conflict { .. })));
    assert!(ds.get("/t/d").await.unwrap().is_some(), "a conflicting delete deletes nothing");
    let r3 = ds.delete("/t/d", Some(r2)).await.unwrap();
    assert!(r3 > r2);
    assert_eq!(ds.get("/t/d").await.unwrap(), None);
    assert_eq!(ds.delete("/t/d", None).await, Err(StoreError::NotFound { key: "/t/d".into() }));
    ds.create("/t/d", b"again").await.unwrap();
    ds.delete("/t/d", None).await.unwrap();
    // Re-created keys start a new life: create_revision moves on.
    let r = ds.create("/t/d", b"third").await.unwrap();
    assert_eq!(ds.get("/t/d").await.unwrap().unwrap().create_revision, r);
}

async fn list_by_prefix(ds: &dyn Datastore) {
    for k in ["/p/a/2", "/p/a/1", "/p/ab/1", "/p/b/1", "/q/a/1"] {
        ds.create(k, k.as_bytes()).await.unwrap();
    }
    let l = ds.list("/p/a/").await.unwrap();
    let keys: Vec<&str> = l.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a/1", "/p/a/2"]);
    assert_eq!(l.items[0].value, b"/p/a/1");
    assert!(l.revision >= l.items.iter().map(|kv| kv.mod_revision).max().unwrap());
    assert_eq!(ds.list("/p/").await.unwrap().items.len(), 4);
    assert!(ds.list("/nothing/").await.unwrap().items.is_empty());
    // Keys only: the same keys and revisions, no values.
    let k = ds.list_keys("/p/").await.unwrap();
    let full = ds.list("/p/").await.unwrap();
    let strip = |l: &gingham_store::Listing| -> Vec<(String, i64, i64)> {
        l.items.iter().map(|kv| (kv.key.clone(), kv.mod_revision, kv.create_revision)).collect()
    };
    assert_eq!(strip(&k), strip(&full));
    assert!(k.items.iter().all(|kv| kv.value.is_empty()));
    assert_eq!(k.revision, full.revision);
    assert!(ds.list_keys("/nothing/").await.unwrap().items.is_empty());
}

async fn transactions_are_all_or_nothing(ds: &dyn Datastore) {
    let r1 = ds.create("/x/block", b"b1").await.unwrap();
    let put = |k: &str, v: &[u8], c| TxnOp::Put { key: k.into(), value: v.to_vec(), condition: c };
    // Block CAS + new handle + delete of another key: one revision, all applied.
    ds.create("/x/old", b"o").await.unwrap();
    let revs = ds
        .txn(&[
            put("/x/block", b"b2", Condition::At(r1)),
            put("/x/handle", b"h", Condition::Absent),
            TxnOp::Delete { key: "/x/old".into(), condition: Condition::Exists },
        ])
        .await
        .unwrap();
    assert_eq!(ds.get("/x/block").await.unwrap().unwrap().value, b"b2");
    assert_eq!(ds.get("/x/handle").await.unwrap().unwrap().value, b"h");
    assert_eq!(ds.get("/x/old").await.unwrap(), None);
    let block_rev = ds.get("/x/block").await.unwrap().unwrap().mod_revision;
    assert_eq!(revs[0], block_rev);
    assert_eq!(revs[1], ds.get("/x/handle").await.unwrap().unwrap().mod_revision);
    assert!(block_rev > r1);
    // One failing condition: nothing is written, and the error names that key.
    let before = ds.revision().await.unwrap();
    let e = ds
        .txn(&[put("/x/block", b"b3", Condition::At(block_rev)), put("/x/handle", b"h2", Condition::Absent)])
        .await
        .unwrap_err();
    assert_eq!(e, StoreError::AlreadyExists { key: "/x/handle".into() });
    match ds.txn(&[put("/x/new", b"n", Condition::Any), put("/x/block", b"b3", Condition::At(r1))]).await.unwrap_err() {
        StoreError::Conflict { key, expected, actual } => {
            assert_eq!((key.as_str(), expected, actual), ("/x/block", r1, block_rev))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ds.txn(&[TxnOp::Delete { key: "/x/none".into(), condition: Condition::Exists }]).await.unwrap_err(),
        StoreError::NotFound { key: "/x/none".into() }
    );
    assert_eq!(ds.get("/x/block").await.unwrap().unwrap().value, b"b2");
    assert_eq!(ds.get("/x/new").await.unwrap(), None);
    assert_eq!(ds.revision().await.unwrap(), before, "a failed transaction does not move the revision");
}

/// Guards write nothing: a Check on a key and an Unchanged on a prefix let a write commit only
/// while what the writer read from its cache still holds.
async fn guards_commit_only_while_they_hold(ds: &dyn Datastore) {
    let pool = ds.create("/g/cfg/pool-a", b"a").await.unwrap();
    let listed = ds.list("/g/cfg/").await.unwrap().revision;
    let write = |v: &[u8]| TxnOp::Put { key: "/g/block".into(), value: v.to_vec(), condition: Condition::Any };
    let check = |c| TxnOp::Check { key: "/g/cfg/pool-a".into(), condition: c };
    let unchanged = |since| TxnOp::Unchanged { prefix: "/g/cfg/".into(), since };
    let revs = ds.txn(&[write(b"1"), check(Condition::At(pool)), unchanged(listed)]).await.unwrap();
    assert_eq!(revs.len(), 3);
    assert_eq!(ds.get("/g/block").await.unwrap().unwrap().value, b"1");
    assert_eq!(ds.get("/g/cfg/pool-a").await.unwrap().unwrap().value, b"a", "a Check writes nothing");
    // An empty range holds; a key outside the prefix does not count.
    ds.create("/g/cfgx", b"outside").await.unwrap();
    ds.txn(&[write(b"2"), TxnOp::Unchanged { prefix: "/g/none/".into(), since: 1 }, unchanged(listed)]).await.unwrap();

    // A key created under the prefix after the listing: refused, nothing written.
    let added = ds.create("/g/cfg/pool-b", b"b").await.unwrap();
    match ds.txn(&[write(b"3"), unchanged(listed)]).await.unwrap_err() {
        StoreError::Conflict { key, expected, actual } => {
            assert_eq!((key.as_str(), expected, actual), ("/g/cfg/", listed, added))
        }
        other => panic!("{other:?}"),
    }
    // A key modified: its Check fails.
    let changed = ds.update("/g/cfg/pool-a", b"a2", pool).await.unwrap();
    match ds.txn(&[write(b"4"), check(Condition::At(pool))]).await.unwrap_err() {
        StoreError::Conflict { key, expected, actual } => {
            assert_eq!((key.as_str(), expected, actual), ("/g/cfg/pool-a", pool, changed))
        }
        other => panic!("{other:?}"),
    }
    // A key deleted: Unchanged does not see it, its Check does.
    ds.delete("/g/cfg/pool-a", None).await.unwrap();
    assert_eq!(
        ds.txn(&[write(b"5"), check(Condition::Exists)]).await.unwrap_err(),
        StoreError::NotFound { key: "/g/cfg/pool-a".into() }
    );
    assert_eq!(ds.get("/g/block").await.unwrap().unwrap().value, b"2", "no refused write landed");
}

/// More objects than one etcd page and more bytes than one gRPC message.
async fn list_large(ds: &dyn Datastore) {
    let value = vec![b'v'; 2048];
    for i in 0..2500 {
        ds.create(&format!("/big/{i:05}"), &value).await.unwrap();
    }
    let l = ds.list("/big/").await.unwrap();
    assert_eq!(l.items.len(), 2500);
    assert!(l.items.windows(2).all(|w| w[0].key < w[1].key), "in key order, no duplicates");
    // Values so large that a page of 1,000 would pass gRPC's 4 MiB limit (IPAM blocks).
    let huge = vec![b'h'; 6000];
    for i in 0..1200 {
        ds.create(&format!("/huge/{i:05}"), &huge).await.unwrap();
    }
    let mut n = 0;
    ds.list_pages("/huge/", 1000, &mut |p| n += p.len()).await.unwrap();
    assert_eq!(n, 1200);
}

async fn watch_from_revision(ds: &dyn Datastore) {
    let start = ds.revision().await.unwrap() + 1;
    let r1 = ds.create("/w/x", b"1").await.unwrap();
    ds.create("/other/x", b"ignored").await.unwrap();
    let r2 = ds.update("/w/x", b"2", r1).await.unwrap();
    let r3 = ds.delete("/w/x", None).await.unwrap();
    let mut w = ds.watch("/w/", start).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(w.next_timeout(WAIT).await.expect("event").unwrap());
    }
    assert!(
        matches!(&got[0], Event::Put(kv) if kv.key == "/w/x" && kv.value == b"1" && kv.mod_revision == r1 && kv.create_revision == r1)
    );
    assert!(matches!(&got[1], Event::Put(kv) if kv.value == b"2" && kv.mod_revision == r2 && kv.create_revision == r1));
    assert_eq!(got[2], Event::Delete { key: "/w/x".into(), revision: r3 });
    // Then live events, still in order, still only the prefix.
    ds.create("/other/y", b"ignored").await.unwrap();
    let r4 = ds.create("/w/y", b"live").await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("live event").unwrap();
    assert_eq!((ev.key(), ev.revision()), ("/w/y", r4));
    assert!(w.next_timeout(Duration::from_millis(200)).await.is_none(), "no event for other prefixes");
}

async fn watch_from_now(ds: &dyn Datastore) {
    ds.create("/n/old", b"before").await.unwrap();
    let mut w = ds.watch("/n/", 0).await.unwrap();
    let r = ds.create("/n/new", b"after").await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("event").unwrap();
    assert_eq!((ev.key(), ev.revision()), ("/n/new", r));
}

async fn compaction_is_reported(ds: &dyn Datastore) {
    let first = ds.create("/c/k", b"0").await.unwrap();
    let mut rev = first;
    for i in 1..5 {
        rev = ds.update("/c/k", i.to_string().as_bytes(), rev).await.unwrap();
    }
    ds.compact(rev).await.unwrap();
    let mut w = ds.watch("/c/", first).await.unwrap();
    match w.next_timeout(WAIT).await.expect("the watch must report compaction") {
        Err(StoreError::Compacted { .. }) => {}
        other => panic!("expected Compacted, got {other:?}"),
    }
    // Current state is unaffected, and watching from the compaction point works.
    assert_eq!(ds.get("/c/k").await.unwrap().unwrap().value, b"4");
    let mut w = ds.watch("/c/", rev).await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("event at the compaction revision").unwrap();
    assert_eq!(ev.revision(), rev);
}

/// Many writers incrementing one counter by compare-and-swap: no lost update.
async fn concurrent_cas_loses_nothing(ds: Arc<dyn Datastore>) {
    ds.create("/cnt", b"0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let ds = ds.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..25 {
                loop {
                    let kv = ds.get("/cnt").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    match ds.update("/cnt", (n + 1).to_string().as_bytes(), kv.mod_revision).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ds.get("/cnt").await.unwrap().unwrap().value, b"200");
}

async fn list_in_pages_at_one_revision(ds: &dyn Datastore) {
    for i in 0..25 {
        ds.create(&format!("/pg/{i:02}"), b"v").await.unwrap();
    }
    ds.create("/pgx", b"outside").await.unwrap();
    let mut pages = Vec::new();
    let rev = ds
        .list_pages("/pg/", 10, &mut |p| pages.push(p.into_iter().map(|kv| kv.key).collect::<Vec<_>>()))
        .await
        .unwrap();
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let keys: Vec<String> = pages.concat();
    assert_eq!(keys, (0..25).map(|i| format!("/pg/{i:02}")).collect::<Vec<_>>());
    assert_eq!(rev, ds.list("/pg/").await.unwrap().revision);
}

macro_rules! conformance {
    ($($name:ident),* ; $arc:ident) => {
        mod embedded {
            use super::*;
            $( #[tokio::test] async fn $name() { let (ds, _b) = open("embedded").await; super::$name(ds.as_ref()).await; } )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $arc() { let (ds, _b) = open("embedded").await; super::$arc(ds).await; }
        }
        mod etcd {
            use super::*;
            $( #[tokio::test] async fn $name() { let (ds, _b) = open("etcd").await; super::$name(ds.as_ref()).await; } )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $arc() { let (ds, _b) = open("etcd").await; super::$arc(ds).await; }
        }
    };
}

conformance!(
    create_get_and_exists,
    compare_and_swap,
    delete_at_revision,
    list_by_prefix,
    list_large,
    list_in_pages_at_one_revision,
    watch_from_revision,
    watch_from_now,
    compaction_is_reported,
    transactions_are_all_or_nothing,
    guards_commit_only_while_they_hold;
    concurrent_cas_loses_nothing
);

/// Two handles on one file behave like two processes: a watch on one sees the other's commits
/// (through PRAGMA data_version polling, not the in-process wake-up).
#[tokio::test]
async fn embedded_handles_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = EmbeddedStore::open(&path).unwrap();
    let b = EmbeddedStore::open(&path).unwrap();
    let mut w = a.watch("/s/", 0).await.unwrap();
    let r = b.create("/s/k", b"from b").await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("a sees b's write").unwrap();
    assert_eq!((ev.key(), ev.revision()), ("/s/k", r));
    assert_eq!(a.get("/s/k").await.unwrap().unwrap().value, b"from b");
    assert!(matches!(a.update("/s/k", b"x", r - 1).await, Err(StoreError::Conflict { .. })));
}

/// History beyond the retention window is compacted automatically, and a slow watcher that
/// falls behind it is told to re-list.
#[tokio::test]
async fn embedded_compacts_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path().join("c.db")).unwrap();
    let mut rev = s.create("/a/k", b"0").await.unwrap();
    for i in 0..11_000 {
        rev = s.update("/a/k", i.to_string().as_bytes(), rev).await.unwrap();
    }
    let mut w = s.watch("/a/", 2).await.unwrap();
    assert!(matches!(w.next_timeout(WAIT).await, Some(Err(StoreError::Compacted { .. }))));
    let mut w = s.watch("/a/", rev - 100).await.unwrap();
    assert_eq!(w.next_timeout(WAIT).await.unwrap().unwrap().revision(), rev - 100);
}

#[tokio::test]
async fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let tls = write_test_certificates(dir.path()).unwrap();
    let server = EtcdServer::start_tls(&tls).unwrap();
    let store = server.connect().await.unwrap();
    let r = store.create("/tls/k", b"v").await.unwrap();
    assert_eq!(store.get("/tls/k").await.unwrap().unwrap().mod_revision, r);
    // Without the client certificate the server refuses us.
    let mut no_cert = server.config.clone();
    no_cert.cert_file = None;
    no_cert.key_file = None;
    assert!(gingham_store::etcd::EtcdStore::connect(&no_cert).await.is_err());
}

/// A store is never a file that merely exists: empty files, other files and other SQLite
/// databases are refused with the file's name; a reader never creates a store.
#[tokio::test]
async fn embedded_refuses_what_is_not_a_store() {
    use gingham_store::embedded::OpenMode;
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &std::path::Path| EmbeddedStore::open(p).err().map(|e| e.to_string()).unwrap_or_default();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    assert!(err(&empty).contains(&format!("{}: is empty (0 bytes)", empty.display())), "{}", err(&empty));
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    assert!(
        err(&junk).contains(&junk.display().to_string()) && err(&junk).contains("not a database"),
        "{}",
        err(&junk)
    );
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x);").unwrap();
    assert!(err(&other).contains("not a gingham store"), "{}", err(&other));
    let missing = dir.path().join("sub/missing.db");
    let e = EmbeddedStore::open_with(&missing, OpenMode::MustExist).err().unwrap().to_string();
    assert!(e.contains("does not exist") && e.contains("missing.db"), "{e}");
    assert!(!missing.exists() && !dir.path().join("sub").exists(), "a reader created nothing");
    // A fresh store is whole the moment it appears, with its mode and no temporaries left.
    let fresh = dir.path().join("fresh.db");
    EmbeddedStore::open(&fresh).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o644);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    EmbeddedStore::open_with(&fresh, OpenMode::MustExist).unwrap();
}

/// A store deleted or replaced under a running process is reported on the next use, naming
/// the file, instead of being written to blindly.
#[tokio::test]
async fn embedded_notices_its_file_deleted_or_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.db");
    let s = EmbeddedStore::open(&path).unwrap();
    s.create("/k/1", b"v").await.unwrap();
    std::fs::remove_file(&path).unwrap();
    let e = s.create("/k/2", b"v").await.unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("was deleted"), "{e}");
    assert!(s.get("/k/1").await.unwrap_err().to_string().contains("was deleted"));
    // A new store at the same path is a different file: still refused by the old handle.
    let other = EmbeddedStore::open(&path).unwrap();
    other.create("/k/3", b"v").await.unwrap();
    let e = s.list("/k/").await.unwrap_err().to_string();
    assert!(e.contains("was replaced"), "{e}");
}

/// Another process's commit reaches a watcher through the change notification, well before
/// the slow backstop poll (500 ms) would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_cross_handle_watch_is_woken_by_notification() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.db");
    let a = EmbeddedStore::open(&path).unwrap();
    let b = EmbeddedStore::open(&path).unwrap();
    let mut w = a.watch("/n/", 0).await.unwrap();
    let mut slow = 0;
    for i in 0..10 {
        let t = std::time::Instant::now();
        b.create(&format!("/n/{i}"), b"v").await.unwrap();
        w.next_timeout(WAIT).await.expect("delivered").unwrap();
        if t.elapsed() > Duration::from_millis(250) {
            slow += 1;
        }
    }
    assert!(slow <= 1, "{slow} of 10 deliveries waited for the backstop poll");
}
