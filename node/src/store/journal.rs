//! The server's write-ahead journal: the one file that makes a write durable.
//!
//! Layout: a 20-byte header (`SNSJRNL\x02`, the journal's incarnation as a
//! u64 LE, and a CRC32 of both), then records `len: u32 LE | !len: u32 LE |
//! crc32: u32 LE | payload`, the CRC taken over the length bytes and the
//! payload. An append is one `write` followed by `fdatasync` when the
//! caller needs durability.
//!
//! The incarnation is a random number chosen when the file is created and
//! kept when it is rewritten (a snapshot install, a compaction): it names
//! this disk's history, so a server whose journal was deleted or replaced
//! is never taken for the one that held every acknowledged write.
//!
//! On open, a record that fails its checks is either a **torn tail** or
//! **damage**. A crash in the middle of an append leaves the file short
//! (it ends inside the last record) or, after a power loss, padded with
//! zeros: that record was never acknowledged, and it is cut. Anything else
//! is damage: a complete header whose length disagrees with its complement,
//! or a complete record whose checksum fails, wherever it is in the file,
//! means bytes that were written changed. Damage is never repaired by
//! deletion: the journal is opened read-only with the records before it,
//! and the server decides what to do. (The redundant length is what tells
//! the two apart: without it a flipped length would read as a record that
//! runs past the end of the file, i.e. as a torn tail.)
//!
//! A failed append (a full disk, an I/O error) is cut back to the last good
//! record before anything else is written, so a failure leaves no trace and
//! the next append never lands behind half a record. A failed fsync (not a
//! full disk) also poisons the journal: what the kernel holds for the file
//! can no longer be trusted, and only a restart reads it afresh.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Largest record accepted when reading; anything bigger is corruption.
/// Ordinary records are a few KiB at most; a snapshot (the first record
/// after a rejoin) holds a whole server's state.
const MAX_RECORD: usize = 1 << 30;
const RECORD_HEADER: usize = 12;
const MAGIC: &[u8; 8] = b"SNSJRNL\x02";
/// Magic, incarnation, CRC of both.
const FILE_HEADER: usize = 20;

pub struct Journal {
    file: File,
    /// Bytes in the file.
    len: u64,
    incarnation: u64,
    /// Why appends are refused: damage found on open, or an append that
    /// could not be cut back. None = writable.
    refused: Option<String>,
}

/// Acknowledged data is missing or changed in the middle of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Where the first bad record starts.
    pub offset: u64,
    pub file_len: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the record at offset {} fails its checks; {} bytes from there on cannot be read",
            self.offset,
            self.file_len - self.offset
        )
    }
}

/// What [`Journal::open`] found.
pub struct Opened {
    pub journal: Journal,
    /// Every intact record payload, in order (up to the damage, if any).
    pub records: Vec<Vec<u8>>,
    /// Set when the file is damaged; the journal then refuses appends.
    pub damage: Option<Damage>,
}

/// How a failed append left the journal.
#[derive(Debug)]
pub struct AppendError {
    pub source: io::Error,
    /// The journal refuses appends from now on (it could not be cut back,
    /// or an fsync failed for another reason than a full disk).
    pub poisoned: bool,
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path`: returns its intact records,
    /// cutting a torn tail, and reports damage without cutting it. A journal
    /// of the previous format (no header) is converted in place.
    pub fn open(path: &Path) -> io::Result<Opened> {
        Journal::open_noting_cuts(path, |_| Ok(()))
    }

    /// [`Journal::open`], calling `note` with the number of bytes about to
    /// be cut as a torn tail before cutting them (so a record of the cut
    /// can be made durable first: once cut, the file no longer shows it).
    /// A crash cuts only an append that was never acknowledged; a disk
    /// that acknowledged a flush it never made looks the same, so whoever
    /// may hold more (an in-sync peer) must be asked before the tail is
    /// taken as unwritten.
    pub fn open_noting_cuts(path: &Path, note: impl FnOnce(u64) -> io::Result<()>) -> io::Result<Opened> {
        let mut file = OpenOptions::new().read(true).create(true).append(true).open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        if data.is_empty() || (data.len() < FILE_HEADER && MAGIC.starts_with(&data[..data.len().min(MAGIC.len())])) {
            // New, or its header was torn while it was being created (then
            // it held no record yet).
            return Ok(Opened {
                journal: Journal::create(path, random_incarnation()?)?,
                records: vec![],
                damage: None,
            });
        }
        if !data.starts_with(MAGIC) {
            return Journal::convert_legacy(path, &data);
        }
        let incarnation = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
        let header_crc = u32::from_le_bytes(data[16..20].try_into().unwrap_or_default());
        if crc32fast::hash(&data[..16]) != header_crc {
            let damage = Damage { offset: 0, file_len: data.len() as u64 };
            let len = data.len() as u64;
            let journal = Journal { file, len, incarnation: 0, refused: Some(format!("damaged: {damage}")) };
            return Ok(Opened { journal, records: vec![], damage: Some(damage) });
        }
        let parsed = parse(&data, FILE_HEADER, Format::Current);
        let mut journal = Journal { file, len: data.len() as u64, incarnation, refused: None };
        match parsed.bad {
            None => {}
            Some(Bad::Torn) => {
                tracing::warn!(path = %path.display(), kept = parsed.good, dropped = data.len() - parsed.good, "journal: cutting a torn tail (an append a crash interrupted)");
                note((data.len() - parsed.good) as u64)?;
                journal.file.set_len(parsed.good as u64)?;
                journal.file.sync_all()?;
                journal.len = parsed.good as u64;
            }
            Some(Bad::Damaged(damage)) => {
                journal.refused = Some(format!("damaged: {damage}"));
                return Ok(Opened { journal, records: parsed.records, damage: Some(damage) });
            }
        }
        journal.file.seek(SeekFrom::End(0))?;
        Ok(Opened { journal, records: parsed.records, damage: None })
    }

    /// Creates a journal at `path` holding only its header (replacing any
    /// file there), durably: the file and its directory entry are synced.
    fn create(path: &Path, incarnation: u64) -> io::Result<Journal> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        let mut header = Vec::with_capacity(FILE_HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&incarnation.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        sync_dir(path)?;
        drop(file);
        let file = OpenOptions::new().read(true).append(true).open(path)?;
        Ok(Journal { file, len: FILE_HEADER as u64, incarnation, refused: None })
    }

    /// Writes a fresh journal at `path` holding `payloads`, under
    /// `incarnation` (0: a new one), durably (written aside, then renamed
    /// over `path`).
    pub fn replace(path: &Path, incarnation: u64, payloads: &[&[u8]]) -> io::Result<Journal> {
        let incarnation = if incarnation == 0 { random_incarnation()? } else { incarnation };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("journal");
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let mut fresh = Journal::create(&tmp, incarnation)?;
        fresh.append_all(payloads, true).map_err(|e| e.source)?;
        drop(fresh);
        std::fs::rename(&tmp, path)?;
        sync_dir(path)?;
        let file = OpenOptions::new().read(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Journal { file, len, incarnation, refused: None })
    }

    /// Reads a journal written before the header existed (CRC over the
    /// payload only) and rewrites it in the current format.
    fn convert_legacy(path: &Path, data: &[u8]) -> io::Result<Opened> {
        let parsed = parse(data, 0, Format::Legacy);
        if let Some(Bad::Damaged(damage)) = parsed.bad {
            let file = OpenOptions::new().read(true).append(true).open(path)?;
            let refused = Some(format!("damaged: {damage}"));
            let journal = Journal { file, len: data.len() as u64, incarnation: 0, refused };
            return Ok(Opened { journal, records: parsed.records, damage: Some(damage) });
        }
        let slices: Vec<&[u8]> = parsed.records.iter().map(Vec::as_slice).collect();
        let journal = Journal::replace(path, random_incarnation()?, &slices)?;
        tracing::info!(path = %path.display(), records = parsed.records.len(), "journal converted to the current format");
        Ok(Opened { journal, records: parsed.records, damage: None })
    }

    /// Bytes in the journal.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Why appends are refused (None: they are not).
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Appends one record; with `durable`, returns only once it is on disk.
    pub fn append(&mut self, payload: &[u8], durable: bool) -> Result<(), AppendError> {
        self.append_all(&[payload], durable)
    }

    /// Appends records in one write and (with `durable`) one fsync: a batch
    /// costs the disk what a single record does. On failure nothing of the
    /// batch stays in the file.
    pub fn append_all(&mut self, payloads: &[&[u8]], durable: bool) -> Result<(), AppendError> {
        if let Some(why) = &self.refused {
            return Err(AppendError {
                source: io::Error::other(format!("journal refuses appends: {why}")),
                poisoned: true,
            });
        }
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| RECORD_HEADER + p.len()).sum());
        for payload in payloads {
            let len = payload.len() as u32;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&len.to_le_bytes());
            crc.update(payload);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&(!len).to_le_bytes());
            buf.extend_from_slice(&crc.finalize().to_le_bytes());
            buf.extend_from_slice(payload);
        }
        if let Err(source) = self.file.write_all(&buf) {
            return Err(self.cut_back(source, false));
        }
        if durable && let Err(source) = self.file.sync_data() {
            // A full disk can surface at fsync (delayed allocation); other
            // fsync errors leave the page cache untrustworthy.
            let poison = !is_disk_full(&source);
            return Err(self.cut_back(source, poison));
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Cuts the file back to the last good record after a failed append.
    fn cut_back(&mut self, source: io::Error, poison: bool) -> AppendError {
        let cut = self.file.set_len(self.len).and_then(|()| self.file.sync_all());
        let poisoned = match cut {
            Ok(()) if !poison => false,
            Ok(()) => {
                self.refused = Some(format!("an fsync failed: {source}"));
                true
            }
            Err(e) => {
                self.refused = Some(format!("a failed append ({source}) could not be cut back: {e}"));
                true
            }
        };
        AppendError { source, poisoned }
    }
}

/// Whether an I/O error means the disk (or a quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) || e.kind() == io::ErrorKind::StorageFull
}

fn random_incarnation() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)
        .map_err(|e| io::Error::other(format!("no randomness for the journal's incarnation: {e}")))?;
    // 0 means "unknown" on the wire.
    Ok(u64::from_le_bytes(bytes).max(1))
}

/// Syncs the directory holding `path`, so a created or renamed file's
/// entry is durable too.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// 12-byte record headers: length, its complement, CRC over both.
    Current,
    /// 8-byte record headers: length, CRC over the payload only (journals
    /// written before the file header existed).
    Legacy,
}

enum Bad {
    Torn,
    Damaged(Damage),
}

struct Parsed {
    records: Vec<Vec<u8>>,
    /// End of the last intact record before the first bad one.
    good: usize,
    bad: Option<Bad>,
}

/// What is at offset `at`.
enum At<'a> {
    Record(&'a [u8]),
    /// The file ends inside this record, or only zeros follow: an append
    /// a crash cut short.
    Torn,
    Damaged,
}

fn read_record(data: &[u8], at: usize, format: Format) -> At<'_> {
    let rest = &data[at..];
    if rest.iter().all(|b| *b == 0) {
        return At::Torn;
    }
    let header = match format {
        Format::Current => RECORD_HEADER,
        Format::Legacy => 8,
    };
    let Some(head) = rest.get(..header) else { return At::Torn };
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
    let len = word(0);
    if format == Format::Current && word(4) != !len {
        return At::Damaged;
    }
    let len = len as usize;
    if len > MAX_RECORD {
        // Without a redundant length (legacy), a huge one is a torn header.
        return if format == Format::Current { At::Damaged } else { At::Torn };
    }
    let Some(payload) = rest.get(header..header + len) else { return At::Torn };
    let sum = match format {
        Format::Current => {
            let mut h = crc32fast::Hasher::new();
            h.update(&head[..4]);
            h.update(payload);
            h.finalize()
        }
        Format::Legacy => crc32fast::hash(payload),
    };
    let crc = word(header - 4);
    if sum == crc { At::Record(payload) } else { At::Damaged }
}

/// Reads records from `start`; classifies the first bad one, if any.
fn parse(data: &[u8], start: usize, format: Format) -> Parsed {
    let mut records = Vec::new();
    let mut at = start;
    while at < data.len() {
        let bad = match read_record(data, at, format) {
            At::Record(payload) => {
                records.push(payload.to_vec());
                at += payload.len() + if format == Format::Current { RECORD_HEADER } else { 8 };
                continue;
            }
            At::Torn => Bad::Torn,
            // A legacy journal cannot tell a flipped last record from a
            // torn one; only what follows the bad record can.
            At::Damaged if format == Format::Legacy && !legacy_record_follows(data, at) => Bad::Torn,
            At::Damaged => Bad::Damaged(Damage { offset: at as u64, file_len: data.len() as u64 }),
        };
        return Parsed { records, good: at, bad: Some(bad) };
    }
    Parsed { records, good: at, bad: None }
}

/// Whether a valid legacy record starts anywhere after `bad`.
fn legacy_record_follows(data: &[u8], bad: usize) -> bool {
    (bad + 1..data.len()).any(|at| matches!(read_record(data, at, Format::Legacy), At::Record(p) if !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> Opened {
        Journal::open(path).unwrap()
    }

    /// Opens the journal at `path`, with the bytes it noted as cut (0: none).
    fn open_cut(path: &Path) -> (Opened, u64) {
        let mut cut = 0;
        let opened = Journal::open_noting_cuts(path, |bytes| {
            cut = bytes;
            Ok(())
        })
        .unwrap();
        (opened, cut)
    }

    #[test]
    fn records_and_the_incarnation_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let o = open(&path);
        assert!(o.records.is_empty() && o.damage.is_none());
        let inc = o.journal.incarnation();
        assert_ne!(inc, 0);
        let mut j = o.journal;
        j.append(b"one", true).unwrap();
        j.append(b"two", false).unwrap();
        j.append_all(&[b"three", b"four"], true).unwrap();
        drop(j);
        let o = open(&path);
        assert_eq!(o.records, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec(), b"four".to_vec()]);
        assert_eq!(o.journal.incarnation(), inc);
        // A new file is a new history.
        let other = open(&dir.path().join("other.log"));
        assert_ne!(other.journal.incarnation(), inc);
    }

    #[test]
    fn a_torn_tail_is_cut_wherever_the_crash_hit_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let mut j = open(&path).journal;
        j.append(b"keep", true).unwrap();
        let kept = j.bytes() as usize;
        j.append_all(&[b"torn-record", b"and another"], true).unwrap();
        drop(j);
        let full = std::fs::read(&path).unwrap();
        for cut in kept + 1..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (o, noted) = open_cut(&path);
            assert!(o.damage.is_none(), "cut at {cut} is a torn tail, not damage");
            let rest = if cut >= kept + RECORD_HEADER + 11 { kept + RECORD_HEADER + 11 } else { kept };
            assert_eq!(noted, (cut - rest) as u64, "cut at {cut}: the bytes cut are reported");
            let expected: Vec<Vec<u8>> = if cut >= kept + RECORD_HEADER + 11 {
                vec![b"keep".to_vec(), b"torn-record".to_vec()]
            } else {
                vec![b"keep".to_vec()]
            };
            assert_eq!(o.records, expected, "cut at {cut}");
        }
        // Zeros after the last record (a crash after the size grew but
        // before the data landed) are a torn tail too.
        let mut zeros = full[..kept].to_vec();
        zeros.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &zeros).unwrap();
        let (o, noted) = open_cut(&path);
        assert!(o.damage.is_none());
        assert_eq!(o.records, vec![b"keep".to_vec()]);
        assert_eq!(noted, 4096);
        let mut j = o.journal;
        j.append(b"after", true).unwrap();
        drop(j);
        let (o, noted) = open_cut(&path);
        assert_eq!(o.records, vec![b"keep".to_vec(), b"after".to_vec()]);
        assert_eq!(noted, 0, "a whole journal reports nothing cut");
    }

    #[test]
    fn flipped_bytes_anywhere_are_damage_never_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let mut j = open(&path).journal;
        let payloads: Vec<Vec<u8>> = (0..20).map(|i| format!("record number {i}").into_bytes()).collect();
        for p in &payloads {
            j.append(p, false).unwrap();
        }
        drop(j);
        let good = std::fs::read(&path).unwrap();
        // Four bytes flipped at every offset past the file header: in
        // lengths, their complements, checksums and payloads alike, and in
        // the last record too (a flipped length must not pass for a record
        // running past the end of the file).
        for at in FILE_HEADER..good.len() - 3 {
            let mut bad = good.clone();
            for b in &mut bad[at..at + 4] {
                *b ^= 0x5a;
            }
            std::fs::write(&path, &bad).unwrap();
            let o = open(&path);
            let damage = o.damage.unwrap_or_else(|| panic!("flip at {at} not detected"));
            assert!(damage.offset as usize <= at, "flip at {at}: {damage:?}");
            assert!(o.records.len() < 20);
            assert_eq!(std::fs::read(&path).unwrap(), bad, "a damaged journal is left as it is");
            let mut j = o.journal;
            assert!(j.append(b"x", true).is_err(), "a damaged journal refuses appends");
        }
        // A damaged header is damage too.
        let mut bad = good.clone();
        bad[10] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(open(&path).damage.map(|d| d.offset), Some(0));
    }

    #[test]
    fn a_failed_append_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let mut j = open(&path).journal;
        j.append(b"before", true).unwrap();
        let len = j.bytes();
        // Simulate a write that got halfway: bytes past the last good record.
        j.file.write_all(b"half a record").unwrap();
        let e = j.cut_back(io::Error::from_raw_os_error(libc::ENOSPC), false);
        assert!(!e.poisoned && is_disk_full(&e.source));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        j.append(b"after", true).unwrap();
        // An fsync failure for another reason poisons the journal.
        let e = j.cut_back(io::Error::from_raw_os_error(libc::EIO), true);
        assert!(e.poisoned && j.refused().is_some());
        assert!(j.append(b"refused", true).is_err());
        drop(j);
        assert_eq!(open(&path).records, vec![b"before".to_vec(), b"after".to_vec()]);
    }

    #[test]
    fn a_legacy_journal_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let mut old = Vec::new();
        for p in [&b"alpha"[..], b"beta"] {
            old.extend_from_slice(&(p.len() as u32).to_le_bytes());
            old.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            old.extend_from_slice(p);
        }
        old.extend_from_slice(&[1, 2, 3]); // a torn tail
        std::fs::write(&path, &old).unwrap();
        let o = open(&path);
        assert_eq!(o.records, vec![b"alpha".to_vec(), b"beta".to_vec()]);
        assert!(std::fs::read(&path).unwrap().starts_with(MAGIC));
        drop(o);
        assert_eq!(open(&path).records.len(), 2);
    }

    #[test]
    fn replace_keeps_the_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.log");
        let mut j = open(&path).journal;
        let inc = j.incarnation();
        j.append(b"old", true).unwrap();
        let mut j = Journal::replace(&path, inc, &[b"snapshot"]).unwrap();
        j.append(b"next", true).unwrap();
        let o = open(&path);
        assert_eq!(o.records, vec![b"snapshot".to_vec(), b"next".to_vec()]);
        assert_eq!(o.journal.incarnation(), inc);
    }
}
