//! Typed resource access over any Datastore: objects in Calico's key layout, the datastore
//! revision exposed as metadata.resourceVersion, and create-or-update with immutable-field checks.

use std::sync::Arc;

use gingham_api::object::check_update;
use gingham_api::{FieldError, Kind, Object};

use crate::{Condition, Datastore, KeyValue, Revision, StoreError, TxnOp};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored object {key} is not readable: {message}")]
    Decode { key: String, message: String },
    #[error("{kind} {name}: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { kind: Kind, name: String, errors: Vec<FieldError> },
    #[error("{name}: kind {kind:?} is not a kind gingham stores")]
    UnknownKind { kind: String, name: String },
    #[error("{kind} {name}: metadata.resourceVersion: {value:?} is not a revision number")]
    BadResourceVersion { kind: Kind, name: String, value: String },
    #[error("{key} appears twice in one batch")]
    Duplicate { key: String },
}

pub type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// How one object of a batch is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Must not exist.
    Create,
    /// Must exist; at its metadata.resourceVersion if given.
    Replace,
    /// Create or replace; at its metadata.resourceVersion if given.
    Apply,
}

/// One change of a batch.
#[derive(Clone, Debug)]
pub enum BatchOp {
    Write(Object, WriteMode),
    Delete { kind: Kind, namespace: Option<String>, name: String },
}

/// A batch that failed: `written` holds how many ops (in order) were committed before it, in
/// whole transactions, and `error` why the rest were not.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BatchError {
    pub written: usize,
    /// Index of the op the error is about, when known.
    pub op: Option<usize>,
    pub error: ResourceError,
}

/// What `apply` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
}

#[derive(Clone)]
pub struct ResourceStore {
    ds: Arc<dyn Datastore>,
}

fn decode(kv: &KeyValue) -> Result<Object> {
    let mut obj: Object = serde_json::from_slice(&kv.value)
        .map_err(|e| ResourceError::Decode { key: kv.key.clone(), message: e.to_string() })?;
    obj.metadata.resource_version = Some(kv.mod_revision.to_string());
    Ok(obj)
}

fn kind_of(obj: &Object) -> Result<Kind> {
    obj.kind().ok_or_else(|| ResourceError::UnknownKind { kind: obj.kind.clone(), name: obj.metadata.name.clone() })
}

fn key_of(kind: Kind, obj: &Object) -> String {
    kind.key(obj.namespace(), obj.name())
}

fn parse_rv(kind: Kind, obj: &Object) -> Result<Option<Revision>> {
    match &obj.metadata.resource_version {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ResourceError::BadResourceVersion {
            kind,
            name: obj.name().into(),
            value: v.clone(),
        }),
    }
}

/// A random RFC 4122 version-4 UUID for metadata.uid.
fn new_uid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b = (nanos ^ u128::from(std::process::id()) << 64).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Now as RFC 3339 UTC, e.g. `2026-11-22T22:10:00Z`.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-22T22:10:00Z`, fractions and
/// offsets accepted); None if it is not one.
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d, hh, mm, ss) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from civil (inverse of the conversion in now_rfc3339).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    // A numeric offset after optional fractional seconds.
    let rest = t[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(sign @ ('+' | '-')) = rest.chars().next() {
        let off = n(t.len() - rest.len() + 1..t.len() - rest.len() + 3)? * 3600
            + n(t.len() - rest.len() + 4..t.len() - rest.len() + 6)? * 60;
        secs -= if sign == '+' { off } else { -off };
    }
    Some(secs)
}

impl ResourceStore {
    pub fn new(ds: Arc<dyn Datastore>) -> Self {
        ResourceStore { ds }
    }

    pub fn datastore(&self) -> &Arc<dyn Datastore> {
        &self.ds
    }

    pub async fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<Option<Object>> {
        self.ds.get(&kind.key(namespace, name)).await?.as_ref().map(decode).transpose()
    }

    /// Every object of `kind`, in one namespace or (None) in all.
    pub async fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Object>> {
        let listing = self.ds.list(&kind.prefix(namespace)).await?;
        listing.items.iter().map(decode).collect()
    }

    /// Create; fails with AlreadyExists. Sets uid and creationTimestamp.
    pub async fn create(&self, mut obj: Object) -> Result<Object> {
        let kind = kind_of(&obj)?;
        obj.metadata.uid = Some(new_uid());
        obj.metadata.creation_timestamp = Some(now_rfc3339());
        let rev = self.ds.create(&key_of(kind, &obj), &obj.to_stored_json()).await?;
        obj.metadata.resource_version = Some(rev.to_string());
        Ok(obj)
    }

    /// Replace an existing object. With metadata.resourceVersion set, only if it is still current;
    /// without, against whatever is stored now. Immutable fields are checked against the stored copy.
    pub async fn update(&self, mut obj: Object) -> Result<Object> {
        let kind = kind_of(&obj)?;
        let key = key_of(kind, &obj);
        let Some(current_kv) = self.ds.get(&key).await? else {
            return Err(StoreError::NotFound { key }.into());
        };
        let current = decode(&current_kv)?;
        let expected = parse_rv(kind, &obj)?.unwrap_or(current_kv.mod_revision);
        let errors = check_update(&current, &obj);
        if !errors.is_empty() {
            return Err(ResourceError::Invalid { kind, name: obj.name().into(), errors });
        }
        obj.metadata.uid = current.metadata.uid.clone();
        obj.metadata.creation_timestamp = current.metadata.creation_timestamp.clone();
        let rev = self.ds.update(&key, &obj.to_stored_json(), expected).await?;
        obj.metadata.resource_version = Some(rev.to_string());
        Ok(obj)
    }

    /// Create or replace (calicoctl apply). Retries when it races another writer.
    pub async fn apply(&self, obj: Object) -> Result<(Object, Applied)> {
        let kind = kind_of(&obj)?;
        let pinned = parse_rv(kind, &obj)?.is_some();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = match self.get(kind, obj.namespace(), obj.name()).await? {
                None if !pinned => self.create(obj.clone()).await.map(|o| (o, Applied::Created)),
                None => Err(StoreError::NotFound { key: key_of(kind, &obj) }.into()),
                Some(current) => {
                    let mut next = obj.clone();
                    if !pinned {
                        next.metadata.resource_version = current.metadata.resource_version.clone();
                    }
                    self.update(next).await.map(|o| (o, Applied::Updated))
                }
            };
            match result {
                Err(ResourceError::Store(
                    StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } | StoreError::NotFound { .. },
                )) if !pinned && attempts < 10 => {}
                other => return other,
            }
        }
    }

    /// Read-modify-write one resource's typed spec, compare-and-swap, retrying when another
    /// writer got there first. `change` edits metadata and spec and says whether it changed
    /// anything (nothing is written if not). A missing resource is created from defaults when
    /// `create` is set, else it is `NotFound`. A stored resource that does not decode is an
    /// error naming it, never replaced by defaults.
    pub async fn modify<S: gingham_api::object::Spec>(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        create: bool,
        mut change: impl FnMut(&mut gingham_api::ObjectMeta, &mut S) -> bool,
    ) -> Result<Object> {
        let key = kind.key(namespace, name);
        for _ in 0..20 {
            let current = self.get(kind, namespace, name).await?;
            let (mut meta, mut spec) = match &current {
                Some(o) => (
                    o.metadata.clone(),
                    o.spec_as::<S>().map_err(|e| ResourceError::Decode { key: key.clone(), message: e.to_string() })?,
                ),
                None if create => (
                    gingham_api::ObjectMeta {
                        name: name.into(),
                        namespace: namespace.map(str::to_string),
                        ..Default::default()
                    },
                    S::default(),
                ),
                None => return Err(StoreError::NotFound { key }.into()),
            };
            if !change(&mut meta, &mut spec) {
                if let Some(o) = current {
                    return Ok(o);
                }
            }
            let value = serde_json::json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind_name(),
                "metadata": meta,
                "spec": spec,
            });
            let mut obj =
                kind.normalize(&value).map_err(|errors| ResourceError::Invalid { kind, name: name.into(), errors })?;
            obj.metadata.resource_version = current.as_ref().and_then(|c| c.metadata.resource_version.clone());
            let result = match current {
                Some(_) => self.update(obj).await,
                None => self.create(obj).await,
            };
            match result {
                Err(ResourceError::Store(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. })) => continue,
                other => return other,
            }
        }
        Err(StoreError::Unavailable(format!("{key}: too many conflicting writers")).into())
    }

    /// Write every op or none: all are checked against what is stored (existence, the
    /// resourceVersion each one names, immutable fields), then committed in one transaction —
    /// or, beyond the backend's transaction size, in consecutive transactions of validated
    /// chunks, in order. Returns the stored objects (for deletes, what was deleted).
    pub async fn write_batch(&self, ops: &[BatchOp]) -> Result<Vec<Object>, BatchError> {
        let fail = |op: usize, error: ResourceError| BatchError { written: 0, op: Some(op), error };
        let mut txn = Vec::with_capacity(ops.len());
        let mut out = Vec::with_capacity(ops.len());
        let mut keys = std::collections::BTreeSet::new();
        for (i, op) in ops.iter().enumerate() {
            let (kind, key) = match op {
                BatchOp::Write(obj, _) => {
                    let kind = kind_of(obj).map_err(|e| fail(i, e))?;
                    (kind, key_of(kind, obj))
                }
                BatchOp::Delete { kind, namespace, name } => (*kind, kind.key(namespace.as_deref(), name)),
            };
            if !keys.insert(key.clone()) {
                return Err(fail(i, ResourceError::Duplicate { key }));
            }
            let current = match self.ds.get(&key).await.map_err(|e| fail(i, e.into()))? {
                Some(kv) => Some((decode(&kv).map_err(|e| fail(i, e))?, kv.mod_revision)),
                None => None,
            };
            match op {
                BatchOp::Delete { .. } => {
                    let Some((obj, rev)) = current else {
                        return Err(fail(i, StoreError::NotFound { key }.into()));
                    };
                    txn.push(TxnOp::Delete { key, condition: Condition::At(rev) });
                    out.push(obj);
                }
                BatchOp::Write(obj, mode) => {
                    let mut obj = obj.clone();
                    let pinned = parse_rv(kind, &obj).map_err(|e| fail(i, e))?;
                    let condition = match (mode, &current, pinned) {
                        (WriteMode::Create, Some(_), _) => {
                            return Err(fail(i, StoreError::AlreadyExists { key }.into()));
                        }
                        (WriteMode::Replace, None, _) | (WriteMode::Apply, None, Some(_)) => {
                            return Err(fail(i, StoreError::NotFound { key }.into()));
                        }
                        (_, None, _) => {
                            obj.metadata.uid = Some(new_uid());
                            obj.metadata.creation_timestamp = Some(now_rfc3339());
                            Condition::Absent
                        }
                        (_, Some((cur, rev)), pinned) => {
                            let expected = pinned.unwrap_or(*rev);
                            if expected != *rev {
                                return Err(fail(i, StoreError::Conflict { key, expected, actual: *rev }.into()));
                            }
                            let errors = check_update(cur, &obj);
                            if !errors.is_empty() {
                                return Err(fail(i, ResourceError::Invalid { kind, name: obj.name().into(), errors }));
                            }
                            obj.metadata.uid = cur.metadata.uid.clone();
                            obj.metadata.creation_timestamp = cur.metadata.creation_timestamp.clone();
                            Condition::At(expected)
                        }
                    };
                    txn.push(TxnOp::Put { key, value: obj.to_stored_json(), condition });
                    out.push(obj);
                }
            }
        }
        let chunk = self.ds.max_txn_ops().max(1);
        let mut written = 0;
        for ops in txn.chunks(chunk) {
            let revs = self.ds.txn(ops).await.map_err(|e| {
                let op = e.key().and_then(|k| ops.iter().position(|o| o.key() == k)).map(|p| written + p);
                BatchError { written, op, error: e.into() }
            })?;
            for (obj, rev) in out[written..written + ops.len()].iter_mut().zip(revs) {
                obj.metadata.resource_version = Some(rev.to_string());
            }
            written += ops.len();
        }
        Ok(out)
    }

    /// Delete, optionally only at a given resourceVersion; returns the deleted object.
    pub async fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        revision: Option<Revision>,
    ) -> Result<Object> {
        let key = kind.key(namespace, name);
        let Some(kv) = self.ds.get(&key).await? else {
            return Err(StoreError::NotFound { key }.into());
        };
        let obj = decode(&kv)?;
        self.ds.delete(&key, Some(revision.unwrap_or(kv.mod_revision))).await?;
        Ok(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_and_time_shapes() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uid());
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((parse_rfc3339(&t).unwrap() - now).abs() <= 1);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00.5+01:00"), Some(951_865_200));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
