//! A console writer that watches the guest's output for one marker line, so the VMM can
//! act when the guest says it is ready (e.g. take a snapshot of the booted guest).

use std::io::Write;
use std::sync::mpsc::Sender;

/// Forwards every byte to `inner` and sends `()` once, the first time `marker` appears.
pub struct MarkerWatch<W> {
    inner: W,
    marker: &'static [u8],
    matched: usize,
    notify: Option<Sender<()>>,
}

impl<W> std::fmt::Debug for MarkerWatch<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkerWatch")
            .field("marker", &String::from_utf8_lossy(self.marker))
            .field("seen", &self.notify.is_none())
            .finish()
    }
}

impl<W: Write> MarkerWatch<W> {
    /// Watch for `marker` in what is written through to `inner`.
    pub fn new(inner: W, marker: &'static [u8], notify: Sender<()>) -> Self {
        Self {
            inner,
            marker,
            matched: 0,
            notify: Some(notify),
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        if self.notify.is_none() || self.marker.is_empty() {
            return;
        }
        for &b in buf {
            if b == self.marker[self.matched] {
                self.matched += 1;
            } else {
                // The marker has no repeated prefix worth a KMP table; restart, letting
                // this byte begin a new match.
                self.matched = usize::from(b == self.marker[0]);
            }
            if self.matched == self.marker.len() {
                if let Some(tx) = self.notify.take() {
                    // The receiver may be gone (VMM shutting down): nothing to tell.
                    let _ = tx.send(());
                }
                return;
            }
        }
    }
}

impl<W: Write> Write for MarkerWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_across_split_writes() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = MarkerWatch::new(Vec::new(), b"guest: ready", tx);
        w.write_all(b"boot... guest: rea").expect("write");
        assert!(rx.try_recv().is_err(), "not yet");
        w.write_all(b"dy\nguest: ready\n").expect("write");
        assert_eq!(rx.try_recv(), Ok(()));
        assert!(rx.try_recv().is_err(), "only once");
        assert_eq!(w.inner, b"boot... guest: ready\nguest: ready\n");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = MarkerWatch::new(Vec::new(), b"ab", tx);
        w.write_all(b"aab").expect("write");
        assert_eq!(
            rx.try_recv(),
            Ok(()),
            "a restart on the marker's first byte"
        );
    }
}
