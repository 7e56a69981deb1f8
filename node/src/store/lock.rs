//! One process per data directory (a server's, or a coordinator's).
//!
//! Two servers on one directory would each append to the journal from
//! their own idea of where it ends, and a replay would then meet records
//! in an order no server ever applied. It happens more easily than it
//! sounds: a server killed while its disk hangs cannot exit until the disk
//! answers (its last write is still in the kernel), so a replacement
//! started meanwhile would open the directory beside it, and the old
//! write lands in the middle of the new server's journal once the disk
//! comes back.
//!
//! [`lock`] takes an exclusive lock (`flock`) on `<dir>/lock` and holds it as long
//! as the returned [`DirLock`] lives. The kernel releases it when the
//! holder's last file descriptor closes, whatever way the process ends, so
//! there is nothing stale to clean up after a crash; a second process is
//! refused with the holder's pid instead of waiting.

use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::Path;

pub const LOCK_FILE: &str = "lock";

/// The data directory's lock, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Locks `dir` (created if missing) for this process, or says which process
/// holds it.
pub fn lock(dir: &Path) -> Result<DirLock> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        Err(TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
            let who = holder.map(|pid| format!("process {pid}")).unwrap_or_else(|| "another process".into());
            return Err(Error::InUse(format!(
                "the data directory {} is in use by {who}: a node stopped earlier has not exited yet (one \
                 killed while its disk hangs exits only once the disk answers); start this one when it has",
                dir.display()
            )));
        }
    }
    // Who holds it, for the message above; not needed for the lock itself.
    let pid = format!("{}\n", std::process::id());
    file.set_len(0).and_then(|()| file.write_all(pid.as_bytes())).map_err(|e| Error::io(&path, e))?;
    Ok(DirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        // flock locks belong to the open file, so a second open in this
        // process is refused like another process would be.
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("in use by process {}", std::process::id())), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(first);
        let again = lock(dir.path());
        assert!(again.is_ok(), "released with its holder: {again:?}");
    }

    #[test]
    fn the_directory_is_made_if_missing() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let _held = lock(&nested).unwrap();
        assert!(nested.join(LOCK_FILE).exists());
    }
}
