//! The coordinator's durable state: one small file holding every cluster's
//! [`Record`] (term, master, in-sync servers), rewritten whole (aside,
//! fsync, rename, directory fsync) before any change to it is acted on.
//!
//! The file also keeps the epoch of the coordinator run that wrote it: a
//! node ignores an answer ordered before the last it adopted, so the next
//! run must order its answers above this one's, whatever its clock says.
//!
//! Layout: `SNSCOORD`, a CRC32 of the body (u32 LE), then the body, a
//! protobuf `CoordinatorState`. A file that fails its checksum stops the
//! coordinator with a message: guessing the records could promote a
//! server that lacks acknowledged writes.

use super::table::Record;
use crate::error::{Error, Result};
use prost::Message as _;
use sns_proto::internal as pb;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SNSCOORD";
pub const STATE_FILE: &str = "coordinator.state";

/// What a state file (or a ConfigMap) holds: the records and the epoch of
/// the coordinator run that wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub records: BTreeMap<u32, Record>,
    pub epoch: u64,
}

/// Where the coordinator keeps its records.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file in `dir` (created if missing).
    pub fn in_dir(dir: &Path) -> Result<StateFile> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(StateFile { path: dir.join(STATE_FILE) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records on disk; None when there is no file yet (a new
    /// deployment).
    pub fn load(&self) -> Result<Option<Stored>> {
        let data = match fs::read(&self.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&self.path, e)),
        };
        decode(&data, &self.path.display().to_string()).map(Some)
    }

    /// Writes `records` and the writer's `epoch`, durably, replacing the
    /// file atomically.
    pub fn save(&self, records: &BTreeMap<u32, Record>, epoch: u64) -> Result<()> {
        let data = encode(records, epoch);
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| Error::io(&self.path, e))
    }
}

/// The records in the state file's format (also the ConfigMap's value).
pub fn encode(records: &BTreeMap<u32, Record>, epoch: u64) -> Vec<u8> {
    let state = pb::CoordinatorState { clusters: records.iter().map(|(c, r)| record_to_pb(*c, r)).collect(), epoch };
    let body = state.encode_to_vec();
    let mut data = Vec::with_capacity(12 + body.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    data.extend_from_slice(&body);
    data
}

/// Records [`encode`]d, read from `source` (named in errors).
pub fn decode(data: &[u8], source: &str) -> Result<Stored> {
    let damaged = |why: &str| {
        Error::Config(format!(
            "{source}: {why}. The coordinator's records (which servers hold every acknowledged write) cannot be trusted; restore them from a backup, or move them away to start without records (servers that hold data then wait for `sns-node promote`)"
        ))
    };
    if data.len() < 12 || !data.starts_with(MAGIC) {
        return Err(damaged("not a coordinator state file"));
    }
    let crc = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
    let body = &data[12..];
    if crc32fast::hash(body) != crc {
        return Err(damaged("checksum mismatch"));
    }
    let state = pb::CoordinatorState::decode(body).map_err(|e| damaged(&format!("does not decode: {e}")))?;
    Ok(Stored { records: state.clusters.iter().map(|c| (c.cluster, record_from_pb(c))).collect(), epoch: state.epoch })
}

fn record_to_pb(cluster: u32, r: &Record) -> pb::ClusterRecord {
    pb::ClusterRecord {
        cluster,
        term: r.term,
        master: r.master.unwrap_or(0),
        in_sync: r
            .in_sync
            .iter()
            .map(|(id, incarnation)| pb::InSyncMember { id: *id, incarnation: *incarnation })
            .collect(),
        seq_floor: r.seq_floor,
        override_server: r.override_server.unwrap_or(0),
    }
}

fn record_from_pb(c: &pb::ClusterRecord) -> Record {
    Record {
        term: c.term,
        master: (c.master != 0).then_some(c.master),
        in_sync: c.in_sync.iter().map(|m| (m.id, m.incarnation)).collect(),
        seq_floor: c.seq_floor,
        override_server: (c.override_server != 0).then_some(c.override_server),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(&dir.path().join("coord")).unwrap();
        assert_eq!(file.load().unwrap(), None, "no file: a new deployment");
        let records = BTreeMap::from([
            (
                1,
                Record {
                    term: 3,
                    master: Some(2),
                    in_sync: BTreeMap::from([(2, 77)]),
                    seq_floor: 40,
                    override_server: None,
                },
            ),
            (2, Record { term: 1, master: Some(1), in_sync: BTreeMap::from([(1, 5), (2, 6)]), ..Record::default() }),
        ]);
        file.save(&records, 1_700_000_000_000).unwrap();
        assert_eq!(file.load().unwrap(), Some(Stored { records: records.clone(), epoch: 1_700_000_000_000 }));
        let mut data = fs::read(file.path()).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        fs::write(file.path(), &data).unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("checksum mismatch") && err.contains("coordinator.state"), "{err}");
    }
}
