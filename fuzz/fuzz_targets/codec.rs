//! Feeds arbitrary bytes to every decoder an agent or the control plane runs on untrusted
//! input. The codec must return an error, never panic or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensei_shared::codec::{decode, frame_len, FRAME_HEADER_LEN};
use sensei_shared::protocol::{AgentMessage, ControlMessage, EnrollRequest, EnrollResponse};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<EnrollRequest>(data);
    let _ = decode::<EnrollResponse>(data);
    let _ = decode::<AgentMessage>(data);
    let _ = decode::<ControlMessage>(data);
    if let Some(header) = data.get(..FRAME_HEADER_LEN) {
        let header: [u8; FRAME_HEADER_LEN] = header.try_into().unwrap_or_default();
        if let Ok(len) = frame_len(header) {
            let body = &data[FRAME_HEADER_LEN..];
            if body.len() >= len {
                let _ = decode::<EnrollRequest>(&body[..len]);
            }
        }
    }
});
