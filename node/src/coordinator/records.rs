//! Where the coordinator keeps its records: nowhere (tests), its state file
//! (one coordinator, the default), or a ConfigMap that replicated
//! coordinators share under Kubernetes.
//!
//! The ConfigMap holds the state file's bytes under one key
//! ([`state::STATE_FILE`], in `binaryData`), plus the leader that wrote
//! them and its epoch. Every write is a replace naming the
//! `resourceVersion` this coordinator last read or wrote (a
//! compare-and-swap): if any other coordinator wrote in between, the write
//! fails with [`Error::StaleRecords`] and this coordinator must stop acting
//! on what it holds. A new leader writes the records it read back at once
//! (its *claim*), so a write the previous leader still had in flight
//! either lands before the claim (and the claim fails, so the new leader
//! reads again and sees it) or after (and fails itself).

pub use super::state::Stored;
use super::state::{self, StateFile};
use super::table::Record;
use crate::error::{Error, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

pub type Records = BTreeMap<u32, Record>;

/// The ConfigMap key of the leader that wrote last (for people).
const WRITER: &str = "leader";
/// The ConfigMap key of that leader's epoch: a new leader's answers must
/// order after its predecessor's even if its clock is behind.
const EPOCH: &str = "epoch";

/// Where the records are written before any change is installed.
pub enum Store {
    /// Not kept (tests).
    Memory,
    File(StateFile),
    Kube(Box<ConfigMapRecords>),
}

impl Store {
    /// Writes `records` durably; `epoch` is the writing coordinator's.
    pub async fn save(&self, records: &Records, epoch: u64) -> Result<()> {
        match self {
            Store::Memory => Ok(()),
            Store::File(file) => {
                let (file, records) = (file.clone(), records.clone());
                tokio::task::spawn_blocking(move || file.save(&records, epoch))
                    .await
                    .map_err(|e| Error::Other(format!("state write task failed: {e}")))?
            }
            Store::Kube(cm) => cm.save(records, epoch).await,
        }
    }
}

/// The records in a ConfigMap, written with compare-and-swap.
pub struct ConfigMapRecords {
    api: Api<ConfigMap>,
    name: String,
    identity: String,
    /// The `resourceVersion` last read or written; None: no ConfigMap
    /// seen (the next write creates it, and fails if another did first).
    version: Mutex<Option<String>>,
}

fn kube_error(what: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 409 => {
            Error::StaleRecords(format!("{what}: another coordinator wrote the records since this one read them"))
        }
        e => Error::Kube(format!("{what}: {e}")),
    }
}

impl ConfigMapRecords {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> ConfigMapRecords {
        ConfigMapRecords {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            version: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> Option<String> {
        self.version.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_version(&self, v: Option<String>) {
        *self.version.lock().unwrap_or_else(PoisonError::into_inner) = v;
    }

    /// Reads the ConfigMap (and remembers its version for the next write);
    /// None when it does not exist or holds no records yet.
    pub async fn load(&self) -> Result<Option<Stored>> {
        let what = format!("reading ConfigMap {}", self.name);
        let cm = self.api.get_opt(&self.name).await.map_err(|e| kube_error(&what, e))?;
        self.set_version(cm.as_ref().and_then(|c| c.metadata.resource_version.clone()));
        let Some(cm) = cm else { return Ok(None) };
        let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get(state::STATE_FILE)) else { return Ok(None) };
        let stored = state::decode(&bytes.0, &format!("ConfigMap {} key {}", self.name, state::STATE_FILE))?;
        let epoch = cm.data.as_ref().and_then(|d| d.get(EPOCH)).and_then(|e| e.parse().ok()).unwrap_or(stored.epoch);
        Ok(Some(Stored { records: stored.records, epoch }))
    }

    /// Replaces the records if nobody wrote them since this coordinator's
    /// last read or write ([`Error::StaleRecords`] otherwise).
    pub async fn save(&self, records: &Records, epoch: u64) -> Result<()> {
        let what = format!("writing ConfigMap {}", self.name);
        let version = self.version();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: version.clone(),
                ..ObjectMeta::default()
            },
            binary_data: Some(BTreeMap::from([(
                state::STATE_FILE.to_string(),
                ByteString(state::encode(records, epoch)),
            )])),
            data: Some(BTreeMap::from([
                (WRITER.to_string(), self.identity.clone()),
                (EPOCH.to_string(), epoch.to_string()),
            ])),
            ..ConfigMap::default()
        };
        let pp = PostParams::default();
        let written = match version {
            None => self.api.create(&pp, &cm).await,
            Some(_) => self.api.replace(&self.name, &pp, &cm).await,
        }
        .map_err(|e| kube_error(&what, e))?;
        self.set_version(written.metadata.resource_version);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::leader::fake::{Shared, client};
    use serde_json::json;

    fn records(term: u64) -> Records {
        BTreeMap::from([(
            1,
            Record { term, master: Some(2), in_sync: BTreeMap::from([(2, 7), (3, 8)]), ..Record::default() },
        )])
    }

    #[tokio::test]
    async fn writes_are_compare_and_swap_and_a_conflict_is_stale() {
        let server = Shared::default();
        let a = ConfigMapRecords::new(client(&server), "ops", "sns-coordinator-records", "coord-0");
        assert_eq!(a.load().await.unwrap(), None, "no ConfigMap yet");
        a.save(&records(1), 5).await.unwrap();
        a.save(&records(2), 5).await.unwrap();
        // Another coordinator reads them back exactly.
        let b = ConfigMapRecords::new(client(&server), "ops", "sns-coordinator-records", "coord-1");
        assert_eq!(b.load().await.unwrap(), Some(Stored { records: records(2), epoch: 5 }));
        let cm = server.lock().unwrap().configmaps["sns-coordinator-records"].clone();
        assert_eq!(cm["data"]["leader"], "coord-0");
        // b writes: a's next write names an old version and is refused.
        b.save(&records(3), 6).await.unwrap();
        let err = a.save(&records(4), 5).await.unwrap_err();
        assert!(matches!(err, Error::StaleRecords(_)), "{err}");
        assert_eq!(b.load().await.unwrap().unwrap().records, records(3), "the refused write left nothing");
        // After a re-read, a may write again.
        assert_eq!(a.load().await.unwrap().unwrap().records, records(3));
        a.save(&records(4), 7).await.unwrap();
        assert_eq!(b.load().await.unwrap(), Some(Stored { records: records(4), epoch: 7 }));
    }

    #[tokio::test]
    async fn two_first_writers_cannot_both_create_it() {
        let server = Shared::default();
        let a = ConfigMapRecords::new(client(&server), "ops", "r", "a");
        let b = ConfigMapRecords::new(client(&server), "ops", "r", "b");
        assert_eq!(a.load().await.unwrap(), None);
        assert_eq!(b.load().await.unwrap(), None);
        a.save(&records(1), 1).await.unwrap();
        assert!(matches!(b.save(&records(1), 1).await, Err(Error::StaleRecords(_))));
    }

    #[tokio::test]
    async fn damaged_records_are_refused_not_guessed() {
        let server = Shared::default();
        server.lock().unwrap().configmap_written("r", json!({"epoch": "1"}));
        let mut cm = server.lock().unwrap().configmaps["r"].clone();
        cm["binaryData"] = json!({"coordinator.state": "U05TQ09PUkQBAAAA"});
        server.lock().unwrap().configmaps.insert("r".into(), cm);
        let a = ConfigMapRecords::new(client(&server), "ops", "r", "a");
        let err = a.load().await.unwrap_err().to_string();
        assert!(err.contains("ConfigMap r") && err.contains("checksum"), "{err}");
    }
}
