//! Agent protocol frames from an untrusted peer: decoding must never panic, a decoded
//! request must re-encode to the same bytes' meaning, and validation must not panic.
#![no_main]

use guest_agent::protocol::{AppRequest, FrameBuffer, FrameHeader, FrameKind, GuestRequest, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_frame(data);
    // The same bytes as the payload behind a valid header, so the fuzzer spends its time
    // in the payload decoder instead of rediscovering the magic.
    if let Ok(len) = u32::try_from(data.len()) {
        for kind in [FrameKind::Request, FrameKind::Reply] {
            let mut f = FrameHeader { kind, len }.to_bytes().to_vec();
            f.extend_from_slice(data);
            check_frame(&f);
        }
    }
});

fn check_frame(data: &[u8]) {
    if let Ok(req) = GuestRequest::decode(data) {
        let _ = req.validate(65_536);
        let again = req.encode().expect("a decoded request re-encodes");
        assert_eq!(GuestRequest::decode(&again).expect("re-decodes"), req);
    }
    // What applications send the agent.
    if let Ok(req) = AppRequest::decode(data) {
        let _ = req.validate();
        let again = req.encode().expect("a decoded app request re-encodes");
        assert_eq!(AppRequest::decode(&again).expect("re-decodes"), req);
    }
    if let Ok(rep) = Reply::decode(data) {
        let again = rep.encode().expect("a decoded reply re-encodes");
        assert_eq!(Reply::decode(&again).expect("re-decodes"), rep);
    }
    // The same bytes as a stream, in uneven pieces.
    let mut fb = FrameBuffer::new();
    for chunk in data.chunks(7) {
        if fb.push(chunk).is_err() {
            break;
        }
        while let Ok(Some(frame)) = fb.next_frame() {
            let _ = GuestRequest::decode(&frame);
        }
    }
}
