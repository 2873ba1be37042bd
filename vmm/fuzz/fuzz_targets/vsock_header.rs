//! The vsock packet header as the guest writes it: parsing and validation must never
//! panic, must accept only what the checks allow, and must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::packet::{
    parse_guest_header, VsockHeader, HDR_LEN, HOST_CID, MAX_PKT_PAYLOAD, TYPE_STREAM,
};

const CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    match parse_guest_header(data, CID) {
        Ok((hdr, op)) => {
            assert_eq!(hdr.src_cid, CID);
            assert_eq!(hdr.dst_cid, HOST_CID);
            assert_eq!(hdr.type_, TYPE_STREAM);
            assert_eq!(hdr.op, op as u16);
            assert!(hdr.len <= MAX_PKT_PAYLOAD);
            assert_eq!(&hdr.to_bytes()[..], &data[..HDR_LEN]);
        }
        Err(_) => {
            if let Ok(raw) = VsockHeader::parse(data) {
                // Refused headers still answer with an RST unless they are one.
                let rst = raw.rst_reply(CID);
                assert_eq!(rst.is_none(), raw.op == 3);
            }
        }
    }
});
