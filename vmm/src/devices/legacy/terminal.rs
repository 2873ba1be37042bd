//! Raw mode for the host terminal while the guest console is attached, restored when the
//! guard is dropped (normal exit, error return or unwinding panic).

use std::os::fd::RawFd;

/// Puts a terminal into raw mode and restores the saved settings on drop.
#[derive(Debug)]
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

/// True when `fd` is a terminal.
pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawModeGuard {
    /// Switch `fd` to raw mode (no echo, no line editing, no signals from Ctrl-C, so
    /// everything goes to the guest). Returns None when `fd` is not a terminal.
    pub fn new(fd: RawFd) -> std::io::Result<Option<Self>> {
        if !is_terminal(fd) {
            return Ok(None);
        }
        let mut saved = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: `saved` is a writable termios that outlives the call.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: tcgetattr returned 0 and filled the struct.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side log lines still start at column 0.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: `raw` is a valid termios for this fd.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same fd in `new`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_terminal_is_left_alone() {
        use std::os::fd::AsRawFd;
        let f = tempfile::tempfile().expect("tempfile");
        assert!(!is_terminal(f.as_raw_fd()));
        assert!(RawModeGuard::new(f.as_raw_fd())
            .expect("no error")
            .is_none());
    }
}
