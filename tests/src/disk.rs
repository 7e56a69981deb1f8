//! Real disk faults for the suites: a small tmpfs under a server's data
//! directory that a test fills up (ENOSPC from the kernel, not a mock), a
//! loop-mounted ext4 that a test freezes (a hung disk), and bytes flipped
//! in a real journal.
//!
//! Mounting needs root (CI runs as root). Where the kernel refuses, the
//! tests that need a full disk skip, saying so (see `crate::skip`).

use anyhow::{Context, Result, bail};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mounting a test file system was refused (not root, no CAP_SYS_ADMIN,
/// no loop device or no mkfs.ext4).
#[derive(Debug, thiserror::Error)]
#[error("cannot mount {what} at {path}: {reason}")]
pub struct MountRefused {
    /// "a tmpfs", "a loop-mounted ext4".
    pub what: &'static str,
    pub path: String,
    pub reason: String,
}

/// A tmpfs mounted for a test; unmounted (lazily, so a process still
/// holding a file there does not keep it) when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, bytes: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            return Err(MountRefused {
                what: "a tmpfs",
                path: path.display().to_string(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }
            .into());
        }
        Ok(Tmpfs { path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// A small ext4 file system in an image file, loop-mounted for a test. It
/// can be frozen (`fsfreeze`): every write to it then hangs, neither ending
/// nor failing, until it is thawed (a hung disk). Thawed, unmounted
/// (lazily) and its image removed when dropped.
#[derive(Debug)]
pub struct FreezableFs {
    path: PathBuf,
    image: PathBuf,
}

impl FreezableFs {
    /// Makes an ext4 image of `bytes` at `image` and mounts it at `path`.
    pub fn mount(path: &Path, image: &Path, bytes: u64) -> Result<FreezableFs> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let refused =
            |reason: String| MountRefused { what: "a loop-mounted ext4", path: path.display().to_string(), reason };
        std::fs::File::create(image)?.set_len(bytes)?;
        let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image).output();
        match mkfs {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(refused(format!("mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr).trim())).into());
            }
            Err(e) => return Err(refused(format!("mkfs.ext4: {e}")).into()),
        }
        let out = Command::new("mount").args(["-o", "loop"]).arg(image).arg(path).output().context("running mount")?;
        if !out.status.success() {
            let _ = std::fs::remove_file(image);
            return Err(refused(String::from_utf8_lossy(&out.stderr).trim().to_string()).into());
        }
        Ok(FreezableFs { path: path.to_path_buf(), image: image.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on every write to it hangs.
    pub fn freeze(&self) -> Result<()> {
        self.fsfreeze("-f")
    }

    /// The hung writes go on.
    pub fn thaw(&self) -> Result<()> {
        self.fsfreeze("-u")
    }

    fn fsfreeze(&self, flag: &str) -> Result<()> {
        let out = Command::new("fsfreeze").arg(flag).arg(&self.path).output().context("running fsfreeze")?;
        if !out.status.success() {
            bail!("fsfreeze {flag} {}: {}", self.path.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        // A frozen file system cannot be left behind: the processes writing
        // to it could never end.
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.path).output();
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Whether `e` (from starting a deployment) is a refused mount, and why.
pub fn mount_refused(e: &anyhow::Error) -> Option<String> {
    e.downcast_ref::<MountRefused>().map(ToString::to_string)
}

/// The file [`fill`] writes in a directory.
pub fn filler(dir: &Path) -> PathBuf {
    dir.join(".filler")
}

/// Fills the file system holding `dir` until the kernel says it is full
/// (ENOSPC); returns the bytes written. Bounded by the file system's size.
pub fn fill(dir: &Path) -> Result<u64> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(filler(dir))?;
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0u64;
    // Then page by page: the last pages matter.
    for size in [chunk.len(), 4096, 512] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
            if written > 1 << 30 {
                bail!("{} is not filling up: not a small file system?", dir.display());
            }
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

/// Frees what [`fill`] took.
pub fn unfill(dir: &Path) -> Result<()> {
    std::fs::remove_file(filler(dir)).with_context(|| format!("removing the filler in {}", dir.display()))
}

/// Flips `n` bytes (xor 0x5a) at `offset` of the file at `path`.
pub fn flip(path: &Path, offset: u64, n: usize) -> Result<()> {
    let mut data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let at = offset as usize;
    if at + n > data.len() {
        bail!("{} has {} bytes; cannot flip {n} at {offset}", path.display(), data.len());
    }
    for b in &mut data[at..at + n] {
        *b ^= 0x5a;
    }
    std::fs::write(path, &data)?;
    Ok(())
}

/// Where each record of the journal at `path` starts, read with the
/// journal's framing (a 20-byte file header, then records of a 12-byte
/// header, `len | !len | crc`, and `len` bytes of payload).
pub fn journal_records(path: &Path) -> Result<Vec<u64>> {
    const FILE_HEADER: usize = 20;
    const RECORD_HEADER: usize = 12;
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut at, mut starts) = (FILE_HEADER, Vec::new());
    while at + RECORD_HEADER <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into()?) as usize;
        if len == 0 || at + RECORD_HEADER + len > data.len() {
            break;
        }
        starts.push(at as u64);
        at += RECORD_HEADER + len;
    }
    Ok(starts)
}

/// Overwrites the file at `path` with zeros from `offset` to its end,
/// keeping its length: what a disk that acknowledged a flush it never
/// made leaves after a power loss.
pub fn zero_from(path: &Path, offset: u64) -> Result<()> {
    let mut data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let at = usize::try_from(offset)?.min(data.len());
    data[at..].fill(0);
    std::fs::write(path, &data)?;
    Ok(())
}

/// Cuts the file at `path` at `offset`: what a file system that lost the
/// last size updates of a file (its metadata back at an earlier flush)
/// leaves. Cut at a record boundary, a journal ends cleanly and opens
/// whole.
pub fn truncate_at(path: &Path, offset: u64) -> Result<()> {
    let file =
        std::fs::OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(())
}

/// Journal files kept aside as damaged in a server directory.
pub fn damaged_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("journal.log.damaged-")))
        .collect()
}
