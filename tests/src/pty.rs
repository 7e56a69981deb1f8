//! A process on a pseudo-terminal, as a user at a keyboard runs it: stdin,
//! stdout and stderr are the terminal, which is the process's controlling
//! terminal, so line editors switch to raw mode and Ctrl-C is a key.
//! Everything it prints (echo included) is collected as text.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::DEADLINE;

/// A child process whose terminal is the slave side of a pty.
pub struct Pty {
    child: Child,
    master: File,
    screen: Arc<(Mutex<(String, bool)>, Condvar)>,
    /// Bytes of the screen already matched by [`Pty::expect`].
    cursor: usize,
}

impl Pty {
    /// Starts `command` on a new 24x120 terminal.
    pub fn spawn(mut command: Command) -> Result<Pty> {
        let (master, slave) = open_pty()?;
        command
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        #[allow(unsafe_code, reason = "setsid(2) and ioctl(2) have no safe wrapper in std")]
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // A session of its own, with the pty (now stdin) as its
                // controlling terminal: what a shell gives a command.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("starting a process on a pty")?;
        // The command's copies of the slave are closed with `command`.
        drop(command);
        let mut reader = master.try_clone()?;
        let screen: Arc<(Mutex<(String, bool)>, Condvar)> = Arc::default();
        let filled = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                // EIO once every holder of the slave side is gone.
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*filled;
                let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    g.1 = true;
                    cv.notify_all();
                    return;
                }
                g.0.push_str(&String::from_utf8_lossy(&buf[..n]));
                cv.notify_all();
            }
        });
        Ok(Pty { child, master, screen, cursor: 0 })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types `keys` (raw bytes: `\r` is Enter, `\x03` Ctrl-C, `\x04` Ctrl-D).
    pub fn type_keys(&mut self, keys: &str) -> Result<()> {
        self.master.write_all(keys.as_bytes())?;
        self.master.flush()?;
        Ok(())
    }

    /// Everything shown so far.
    pub fn screen(&self) -> String {
        self.screen.0.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// Waits until `text` is shown after what was matched before, and moves
    /// past it.
    pub fn expect(&mut self, text: &str) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        let (lock, cv) = &*self.screen;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(at) = g.0.get(self.cursor..).and_then(|rest| rest.find(text)) {
                self.cursor += at + text.len();
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline || g.1 {
                bail!("{text:?} never shown after byte {}; screen:\n{}", self.cursor, g.0);
            }
            g = cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits for the process to exit; its exit code (128 + signal if killed).
    pub fn wait_exit(&mut self) -> Result<i32> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                use std::os::unix::process::ExitStatusExt;
                return Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            }
            if Instant::now() > deadline {
                bail!("process on the pty did not exit; screen:\n{}", self.screen());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new pty pair (master, slave), 24 rows by 120 columns.
fn open_pty() -> Result<(File, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: 24, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    #[allow(unsafe_code, reason = "openpty(3) has no safe wrapper in std")]
    // SAFETY: the out-pointers are valid; a null name and termios are allowed.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("openpty");
    }
    for fd in [master, slave] {
        // Not inherited as such: the child gets the slave as 0, 1 and 2 only.
        #[allow(unsafe_code, reason = "fcntl(2) has no safe wrapper in std")]
        // SAFETY: fd is an open descriptor.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    #[allow(unsafe_code, reason = "taking ownership of the descriptors openpty returned")]
    // SAFETY: both descriptors are open and owned by nobody else.
    let fds = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    Ok(fds)
}
