//! Choosing the datastore the way calicoctl does: command-line flags, a config file, the
//! environment (DATASTORE_TYPE, ETCD_ENDPOINTS, ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE,
//! KUBECONFIG, GINGHAM_STORE_PATH), and a default.
//!
//! Precedence, highest first: flags; a config file named with `-c`/GINGHAM_CONFIG; the
//! environment; /etc/gingham/gingham.cfg if it exists; the embedded store at
//! /var/lib/gingham/store.db. Each setting is taken from the highest layer that has it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::embedded::{DEFAULT_PATH, EmbeddedStore};
use crate::etcd::{EtcdConfig, EtcdStore};
use crate::kubernetes::{KubeConfig, KubeStore};
use crate::{Datastore, StoreError};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/gingham/gingham.cfg";

/// One layer of settings; every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub datastore_type: Option<String>,
    pub etcd_endpoints: Option<String>,
    pub etcd_ca_cert_file: Option<String>,
    pub etcd_cert_file: Option<String>,
    pub etcd_key_file: Option<String>,
    pub store_path: Option<String>,
    pub kubeconfig: Option<String>,
}

impl Settings {
    fn or(self, lower: Settings) -> Settings {
        Settings {
            datastore_type: self.datastore_type.or(lower.datastore_type),
            etcd_endpoints: self.etcd_endpoints.or(lower.etcd_endpoints),
            etcd_ca_cert_file: self.etcd_ca_cert_file.or(lower.etcd_ca_cert_file),
            etcd_cert_file: self.etcd_cert_file.or(lower.etcd_cert_file),
            etcd_key_file: self.etcd_key_file.or(lower.etcd_key_file),
            store_path: self.store_path.or(lower.store_path),
            kubeconfig: self.kubeconfig.or(lower.kubeconfig),
        }
    }

    /// The environment layer (empty values count as unset).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Settings {
        let v = |k: &str| get(k).filter(|s| !s.is_empty());
        Settings {
            datastore_type: v("DATASTORE_TYPE"),
            etcd_endpoints: v("ETCD_ENDPOINTS"),
            etcd_ca_cert_file: v("ETCD_CA_CERT_FILE"),
            etcd_cert_file: v("ETCD_CERT_FILE"),
            etcd_key_file: v("ETCD_KEY_FILE"),
            store_path: v("GINGHAM_STORE_PATH"),
            kubeconfig: v("KUBECONFIG"),
        }
    }

    /// A calicoctl-style config file (kind CalicoAPIConfig; spec.datastoreType, etcdEndpoints,
    /// etcdCACertFile, etcdCertFile, etcdKeyFile, and gingham's storePath).
    pub fn from_file(path: &Path) -> Result<Settings, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let doc: Value =
            serde_saphyr::from_str(&text).map_err(|e| format!("{}: malformed YAML: {e}", path.display()))?;
        let spec = doc.get("spec").unwrap_or(&doc);
        let known = [
            "datastoreType",
            "etcdEndpoints",
            "etcdCACertFile",
            "etcdCertFile",
            "etcdKeyFile",
            "storePath",
            "etcdUsername",
            "etcdPassword",
            "kubeconfig",
        ];
        if let Some(map) = spec.as_object() {
            if let Some(bad) = map.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(format!("{}: spec.{bad}: unknown field (known: {})", path.display(), known.join(", ")));
            }
        }
        let s = |k: &str| spec.get(k).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_string);
        Ok(Settings {
            datastore_type: s("datastoreType"),
            etcd_endpoints: s("etcdEndpoints"),
            etcd_ca_cert_file: s("etcdCACertFile"),
            etcd_cert_file: s("etcdCertFile"),
            etcd_key_file: s("etcdKeyFile"),
            store_path: s("storePath"),
            kubeconfig: s("kubeconfig"),
        })
    }
}

/// The datastore to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatastoreConfig {
    Embedded { path: PathBuf },
    Etcd(EtcdConfig),
    Kubernetes(KubeConfig),
}

impl DatastoreConfig {
    /// Merge the layers (see the module doc) into one choice.
    pub fn resolve(flags: Settings, config_file: Option<&Path>, env: Settings) -> Result<DatastoreConfig, String> {
        let explicit = match config_file {
            Some(p) => Settings::from_file(p)?,
            None => Settings::default(),
        };
        let default_file = Path::new(DEFAULT_CONFIG_FILE);
        let fallback = if config_file.is_none() && default_file.exists() {
            Settings::from_file(default_file)?
        } else {
            Settings::default()
        };
        let s = flags.or(explicit).or(env).or(fallback);
        let kind = match s.datastore_type.as_deref() {
            Some(t) => t.to_ascii_lowercase(),
            None if s.etcd_endpoints.is_some() => "etcdv3".into(),
            None => "embedded".into(),
        };
        match kind.as_str() {
            "embedded" => Ok(DatastoreConfig::Embedded {
                path: PathBuf::from(s.store_path.unwrap_or_else(|| DEFAULT_PATH.into())),
            }),
            "etcdv3" | "etcd" => Ok(DatastoreConfig::Etcd(EtcdConfig {
                endpoints: s
                    .etcd_endpoints
                    .unwrap_or_else(|| "http://127.0.0.1:2379".into())
                    .split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect(),
                ca_cert_file: s.etcd_ca_cert_file,
                cert_file: s.etcd_cert_file,
                key_file: s.etcd_key_file,
            })),
            "kubernetes" => Ok(DatastoreConfig::Kubernetes(KubeConfig { kubeconfig: s.kubeconfig.map(PathBuf::from) })),
            other => Err(format!("unknown datastore type {other:?}; use embedded, etcdv3 or kubernetes")),
        }
    }
}

/// Open the chosen datastore (creating an embedded store that does not exist yet).
pub async fn connect(config: &DatastoreConfig) -> Result<Arc<dyn Datastore>, StoreError> {
    connect_with(config, crate::embedded::OpenMode::CreateIfMissing).await
}

/// Open the chosen datastore; `mode` says whether a missing embedded store is created.
pub async fn connect_with(
    config: &DatastoreConfig,
    mode: crate::embedded::OpenMode,
) -> Result<Arc<dyn Datastore>, StoreError> {
    Ok(match config {
        DatastoreConfig::Embedded { path } => Arc::new(EmbeddedStore::open_with(path, mode)?),
        DatastoreConfig::Etcd(c) => Arc::new(EtcdStore::connect(c).await?),
        DatastoreConfig::Kubernetes(c) => Arc::new(KubeStore::connect(c).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Settings {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn precedence() {
        assert_eq!(
            DatastoreConfig::resolve(Settings::default(), None, env(&[("GINGHAM_STORE_PATH", "/tmp/x.db")])).unwrap(),
            DatastoreConfig::Embedded { path: "/tmp/x.db".into() }
        );
        // ETCD_ENDPOINTS alone selects etcd, as calicoctl's default type is etcdv3.
        let c =
            DatastoreConfig::resolve(Settings::default(), None, env(&[("ETCD_ENDPOINTS", "http://a:1, http://b:2")]))
                .unwrap();
        assert_eq!(
            c,
            DatastoreConfig::Etcd(EtcdConfig {
                endpoints: vec!["http://a:1".into(), "http://b:2".into()],
                ..Default::default()
            })
        );
        // Flags beat the environment.
        let flags = Settings {
            datastore_type: Some("embedded".into()),
            store_path: Some("/tmp/f.db".into()),
            ..Default::default()
        };
        let c = DatastoreConfig::resolve(flags, None, env(&[("DATASTORE_TYPE", "etcdv3")])).unwrap();
        assert_eq!(c, DatastoreConfig::Embedded { path: "/tmp/f.db".into() });
        // An explicit config file beats the environment.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.cfg");
        std::fs::write(&file, "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\nspec:\n  datastoreType: etcdv3\n  etcdEndpoints: https://e:2379\n  etcdCACertFile: /ca.pem\n").unwrap();
        let c =
            DatastoreConfig::resolve(Settings::default(), Some(&file), env(&[("DATASTORE_TYPE", "embedded")])).unwrap();
        assert_eq!(
            c,
            DatastoreConfig::Etcd(EtcdConfig {
                endpoints: vec!["https://e:2379".into()],
                ca_cert_file: Some("/ca.pem".into()),
                ..Default::default()
            })
        );
        assert!(
            DatastoreConfig::resolve(Settings::default(), None, env(&[("DATASTORE_TYPE", "mongo")]))
                .unwrap_err()
                .contains("mongo")
        );
        let c = DatastoreConfig::resolve(
            Settings::default(),
            None,
            env(&[("DATASTORE_TYPE", "kubernetes"), ("KUBECONFIG", "/k/config")]),
        )
        .unwrap();
        assert_eq!(c, DatastoreConfig::Kubernetes(KubeConfig { kubeconfig: Some("/k/config".into()) }));
        std::fs::write(&file, "spec:\n  bogus: 1\n").unwrap();
        assert!(
            DatastoreConfig::resolve(Settings::default(), Some(&file), Settings::default())
                .unwrap_err()
                .contains("spec.bogus")
        );
    }
}
