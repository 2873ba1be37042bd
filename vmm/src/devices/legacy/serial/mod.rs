//! COM1: a vm-superio 16550 on the port-I/O bus at 0x3f8 (IRQ 4 through an irqfd),
//! its output going to the VMM's stdout and its input coming from stdin through the
//! event loop.
//!
//! The 16550's receive FIFO holds 64 bytes. Input that does not fit waits in `pending`
//! and is moved into the FIFO as the guest reads it, so a pasted or piped command is
//! never cut off.

mod persist;
pub use persist::SerialSnap;

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use crate::stop::{StopNotifier, VmStop};

/// Input kept waiting for FIFO room at most (host input beyond it is dropped).
pub const MAX_PENDING_INPUT: usize = 1 << 20;
/// Receive buffer register offset.
const RBR: u64 = 0;
/// Ctrl-A: the console escape key (Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A).
const ESCAPE: u8 = 0x01;

/// Console output: the VMM's stdout, flushed per write so prompts appear at once.
#[derive(Debug, Default)]
pub struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

type Uart = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// The 16550 with its pending-input queue.
pub struct SerialDevice {
    uart: Uart,
    pending: VecDeque<u8>,
    write_errors: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl SerialDevice {
    /// A 16550 raising its interrupt through `irq` and writing output to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq, out),
            pending: VecDeque::new(),
            write_errors: 0,
        }
    }

    /// Queue host input for the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        if room < bytes.len() {
            log::warn!(
                "serial: input buffer full, dropping {} bytes",
                bytes.len() - room
            );
        }
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.fill_fifo();
    }

    /// The eventfd that raises the serial IRQ (registered with KVM as an irqfd).
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Bytes waiting for FIFO room.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn fill_fifo(&mut self) {
        let n = self.uart.fifo_capacity().min(self.pending.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..n).collect();
        if let Err(e) = self.uart.enqueue_raw_bytes(&chunk) {
            log::debug!("serial: cannot queue input: {e:?}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            *b = self.uart.read(off);
            if offset == RBR {
                self.fill_fifo();
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *b) {
                // Stdout gone (closed pipe): keep the guest running, log rarely.
                self.write_errors += 1;
                if self.write_errors.is_power_of_two() {
                    log::debug!("serial: output error ({} so far): {e:?}", self.write_errors);
                }
            }
        }
    }
}

/// Event-loop subscriber moving stdin into the serial device. EOF on stdin (a closed
/// pipe) only stops input; the VM keeps running. When stdin is a terminal, Ctrl-A x
/// ends the VM.
#[derive(Debug)]
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
    fd: RawFd,
    interactive: bool,
    escape_pending: bool,
    stop: StopNotifier,
}

impl StdinInput {
    /// Read from `fd` (normally 0) into `serial`. `interactive` enables the Ctrl-A
    /// escape.
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        fd: RawFd,
        interactive: bool,
        stop: StopNotifier,
    ) -> Self {
        Self {
            serial,
            fd,
            interactive,
            escape_pending: false,
            stop,
        }
    }

    /// Apply the escape handling; returns the bytes for the guest and whether the user
    /// asked to quit.
    fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        if !self.interactive {
            return (input.to_vec(), false);
        }
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.escape_pending = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            // /dev/null and regular files cannot be polled: no console input then.
            log::debug!("serial: stdin cannot be polled ({e:?}); console input disabled");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is a writable buffer of the given length that outlives the call.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                return;
            }
            log::debug!("serial: stdin read failed: {e}; console input disabled");
        }
        if n <= 0 {
            let _ = ops.remove(events);
            return;
        }
        let (bytes, quit) = self.filter(&buf[..n as usize]);
        if !bytes.is_empty() {
            self.serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(&bytes);
        }
        if quit {
            log::info!("console: Ctrl-A x, stopping the VM");
            self.stop.notify(VmStop::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, EventFd, Shared) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let out = Shared::default();
        let d = SerialDevice::new(
            EventFdTrigger(evt.try_clone().expect("clone")),
            Box::new(out.clone()),
        );
        (d, evt, out)
    }

    #[test]
    fn output_goes_to_the_writer() {
        let (mut d, _evt, out) = device();
        for b in b"hi\n" {
            d.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().expect("lock"), b"hi\n");
    }

    #[test]
    fn long_input_arrives_complete_and_in_order() {
        let (mut d, evt, _) = device();
        // Enable the received-data interrupt (IER bit 0) so input raises the IRQ.
        d.write(0x3f8, 1, &[1]);
        let input: Vec<u8> = (0..200u8).collect();
        d.enqueue_input(&input);
        assert!(d.pending_len() > 0, "more than the FIFO holds is pending");
        assert!(evt.read().expect("irq raised") >= 1);
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut b = [0u8];
            d.read(0x3f8, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(d.pending_len(), 0);
        // Line status: no more data ready.
        let mut lsr = [0u8];
        d.read(0x3f8, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut d, _evt, out) = device();
        d.write(0x3f8, 0, b"ab");
        assert!(out.0.lock().expect("lock").is_empty());
        let mut w = [0xffu8; 2];
        d.read(0x3f8, 5, &mut w);
        assert_eq!(w, [0, 0]);
    }

    #[test]
    fn escape_handling() {
        let (d, _evt, _) = device();
        let (n, _rx) = StopNotifier::new().expect("eventfd");
        let mut s = StdinInput::new(Arc::new(Mutex::new(d)), 0, true, n);
        assert_eq!(s.filter(b"ab"), (b"ab".to_vec(), false));
        assert_eq!(
            s.filter(&[ESCAPE, ESCAPE, b'c']),
            (vec![ESCAPE, b'c'], false)
        );
        assert_eq!(s.filter(&[ESCAPE]), (vec![], false));
        assert_eq!(s.filter(b"q"), (vec![ESCAPE, b'q'], false));
        assert_eq!(s.filter(&[b'z', ESCAPE, b'x', b'y']), (vec![b'z'], true));
        s.interactive = false;
        assert_eq!(s.filter(&[ESCAPE, b'x']), (vec![ESCAPE, b'x'], false));
    }
}
