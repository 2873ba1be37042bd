//! virtio-vsock (device id 19) with a Firecracker-style host side.
//!
//! - Host to guest: a host program connects to the Unix socket `PATH` given with
//!   `--vsock-sock PATH`, writes `CONNECT <port>\n`, and reads `OK <hostport>\n` once a
//!   guest listener on `<port>` accepted; the stream is closed if the guest refuses.
//! - Guest to host: a guest connection to host port `P` (CID 2) reaches an in-VMM
//!   [`VsockService`] registered on `P`, else the Unix socket `PATH_P` if a host program
//!   listens there, else it is refused with RST.
//!
//! Layout: [`packet`] parses and checks headers (pure), [`connection`] is one
//! connection's state machine and flow control, [`muxer`] the host side of all of them,
//! [`agent_service`] speaks the agent protocol for the snapshot engine,
//! [`device`] moves packets between virtqueues and the muxer, and `event_handler` wires
//! it to event-manager. See docs/vsock.md.

pub mod agent_service;
pub mod connection;
pub mod device;
mod event_handler;
pub mod muxer;
pub mod packet;
mod persist;

pub use agent_service::{AgentBackend, AgentService, AgentServiceFactory};
pub use connection::{VsockService, VsockServiceFactory, CONN_BUF_ALLOC};
pub use device::{Vsock, VsockError, VSOCK_DEVICE_ID};
pub use muxer::{EchoService, VsockMuxer};
pub use packet::{parse_guest_header, PacketError, VsockHeader};

#[cfg(test)]
mod tests;
