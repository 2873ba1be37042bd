//! The serial port's saved state: the 16550's registers and receive FIFO (vm-superio's
//! `SerialState`, in a serializable copy). rust-vmm's `vm-superio-ser` has the same
//! copy, but its newest release (0.4.1) pins `vm-superio = "=0.8.1"` (we use 0.8.2) and
//! brings `versionize`; the ten fields are mirrored here instead.

use std::io::Write;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::SerialDevice;
use crate::devices::legacy::EventFdTrigger;
use crate::state::{DeviceStateError, Persist};

impl SerialDevice {
    /// The UART's registers and receive FIFO, for VM snapshots.
    pub fn uart_state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// Put saved UART registers and FIFO back (VM restore). Host input not yet moved
    /// into the FIFO is dropped: it was typed after the snapshot.
    pub fn restore_uart_state(
        &mut self,
        state: &vm_superio::serial::SerialState,
    ) -> Result<(), DeviceStateError> {
        let clone_irq = || {
            self.irq_eventfd()
                .try_clone()
                .map_err(|e| DeviceStateError::new("serial", e))
        };
        let trigger = EventFdTrigger(clone_irq()?);
        let placeholder = Serial::new(
            EventFdTrigger(clone_irq()?),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let out = old.into_writer();
        match Serial::from_state(state, trigger, NoEvents, out) {
            Ok(u) => {
                self.uart = u;
                self.pending.clear();
                Ok(())
            }
            Err(e) => Err(DeviceStateError::new(
                "serial",
                format!("serial state refused: {e:?}"),
            )),
        }
    }
}

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`, serializable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnap {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Receive FIFO content.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnap {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnap> for SerialState {
    fn from(s: &SerialSnap) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Persist for Mutex<SerialDevice> {
    type State = SerialSnap;
    type Error = DeviceStateError;

    fn save(&self) -> Result<SerialSnap, DeviceStateError> {
        Ok(self
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .uart_state()
            .into())
    }

    fn restore(&self, s: &SerialSnap) -> Result<(), DeviceStateError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_uart_state(&s.into())
    }
}
