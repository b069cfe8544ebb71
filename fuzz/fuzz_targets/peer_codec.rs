//! Bytes from another node: the envelopes the router decodes (`net::wire::decode`) and the
//! heartbeat datagrams of the membership service (`net::datagram::open`), including datagrams
//! sealed with the right cookie so that the fuzzer reaches the decoder behind the seal.
//! Whatever decodes must encode again and decode to the same value.

#![no_main]

use chat_node::net::{datagram, wire};
use chat_protocol::codec;
use chat_protocol::peer::Heartbeat;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = wire::decode(data) {
        let _ = envelope.message.kind();
        let again = wire::encode(&envelope.from, envelope.message.clone())
            .expect("a decoded envelope encodes");
        assert_eq!(wire::decode(&again).expect("re-encoded decodes"), envelope);
    }

    let key = datagram::key("fuzz cookie");
    // Unsealed (or wrongly sealed) bytes are never heard.
    let _ = datagram::open(&key, data);
    // Sealed with the cookie: the payload is decoded as a heartbeat.
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key");
    mac.update(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&mac.finalize().into_bytes());
    let opened = datagram::open(&key, &sealed).ok();
    assert_eq!(opened, codec::decode::<Heartbeat>(data).ok());
    if let Some(heartbeat) = opened {
        let resealed = datagram::seal(&key, &heartbeat).expect("a decoded heartbeat encodes");
        assert_eq!(
            datagram::open(&key, &resealed).expect("resealed opens"),
            heartbeat
        );
    }
});
