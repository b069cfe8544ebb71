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

    let key = datagram::key("fuzz cookie", None);
    let sealer = datagram::Sealer::new(key);
    // Unsealed (or wrongly sealed) bytes are never heard.
    let me = chat_protocol::NodeName::new("fuzz").expect("a valid name");
    let _ = sealer.opener(&me).open(data, 0);
    // Sealed with the cookie: the stamp is checked and the rest decoded as a heartbeat (opened
    // at the stamp's own send time, so that the fuzzer reaches the decoder).
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key");
    mac.update(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&mac.finalize().into_bytes());
    let sent_ms = data
        .get(8..16)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    // Addressed to nobody in particular (`to` = 0, as a seed ping is): opens if it decodes.
    let unaddressed = data.get(16..24) == Some(&[0; 8]);
    let opened = sealer.opener(&me).open(&sealed, sent_ms).ok();
    let body = data
        .get(24..)
        .and_then(|body| codec::decode::<Heartbeat>(body).ok());
    if unaddressed {
        assert_eq!(opened, body);
    }
    if let Some(heartbeat) = opened {
        let resealed = sealer
            .seal(&heartbeat, Some(&me), 7)
            .expect("a decoded heartbeat encodes");
        let mut opener = sealer.opener(&me);
        assert_eq!(
            opener.open(&resealed, 7).expect("resealed opens"),
            heartbeat
        );
        assert!(opener.open(&resealed, 7).is_err(), "a replay opens");
    }
});
