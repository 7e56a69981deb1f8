//! The server's write-ahead journal: the one file that makes a write durable.
//!
//! Each record is `len: u32 LE | crc32: u32 LE | payload`. An append is one
//! `write` followed by `fdatasync` when the caller needs durability. On open
//! the journal is read to its first torn or corrupt record and cut there: a
//! crash in the middle of an append loses only that unacknowledged record.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Largest record accepted when reading; anything bigger is corruption.
/// Ordinary records are a few KiB at most; a snapshot (the first record
/// after a rejoin) holds a whole server's state.
const MAX_RECORD: usize = 1 << 30;
const HEADER: usize = 8;

pub struct Journal {
    file: File,
    /// Bytes in the file.
    len: u64,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and returns every intact
    /// record payload, cutting a torn tail.
    pub fn open(path: &Path) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new().read(true).create(true).append(true).open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (records, good) = split_records(&data);
        if good < data.len() {
            tracing::warn!(path = %path.display(), kept = good, dropped = data.len() - good, "journal: cutting a torn tail");
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        let len = file.seek(SeekFrom::End(0))?;
        Ok((Journal { file, len }, records))
    }

    /// Bytes in the journal.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Appends one record; with `durable`, returns only once it is on disk.
    pub fn append(&mut self, payload: &[u8], durable: bool) -> io::Result<()> {
        self.append_all(&[payload], durable)
    }

    /// Appends records in one write and (with `durable`) one fsync: a batch
    /// costs the disk what a single record does.
    pub fn append_all(&mut self, payloads: &[&[u8]], durable: bool) -> io::Result<()> {
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| HEADER + p.len()).sum());
        for payload in payloads {
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            buf.extend_from_slice(payload);
        }
        self.file.write_all(&buf)?;
        self.len += buf.len() as u64;
        if durable {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Splits `data` into record payloads; returns them and the length of the
/// intact prefix.
fn split_records(data: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while data.len() - at >= HEADER {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap_or_default());
        if len > MAX_RECORD || data.len() - at - HEADER < len {
            break;
        }
        let payload = &data[at + HEADER..at + HEADER + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        records.push(payload.to_vec());
        at += HEADER + len;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let (mut j, recs) = Journal::open(&path).unwrap();
        assert!(recs.is_empty());
        j.append(b"one", true).unwrap();
        j.append(b"", false).unwrap();
        j.append(b"three", true).unwrap();
        drop(j);
        let (_, recs) = Journal::open(&path).unwrap();
        assert_eq!(recs, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
    }

    #[test]
    fn torn_and_corrupt_tails_are_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(b"keep", true).unwrap();
        j.append(b"torn-record", true).unwrap();
        drop(j);
        let full = std::fs::read(&path).unwrap();
        for cut in (HEADER + 4)..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (_, recs) = Journal::open(&path).unwrap();
            assert_eq!(recs, vec![b"keep".to_vec()], "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), (HEADER + 4) as u64);
        }
        // A flipped byte in the payload is corruption, not data.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let (mut j, recs) = Journal::open(&path).unwrap();
        assert_eq!(recs.len(), 1);
        j.append(b"after", true).unwrap();
        drop(j);
        let (_, recs) = Journal::open(&path).unwrap();
        assert_eq!(recs, vec![b"keep".to_vec(), b"after".to_vec()]);
    }
}
