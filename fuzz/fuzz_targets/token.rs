//! Client tokens (`gateway::auth::Verifier::verify`) with a fixed secret.
//!
//! Input: one mode byte, then text. Mode even: the text is the token as a client sends it; it
//! must never verify unless its signature is the secret's HMAC of its first two parts (which the
//! fuzzer cannot produce). Mode odd: the text is `header JSON \n claims JSON`, which the target
//! signs with the secret, so that the claim checks behind the signature are reached.

#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chat_node::gateway::auth::{Grant, LEEWAY_SECS, Verifier};
use chat_protocol::UserName;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use sha2::Sha256;

const SECRET: &str = "fuzz-secret";
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let verifier = Verifier::new(SECRET);
    if mode % 2 == 0 {
        if let Ok(grant) = verifier.verify(text, NOW) {
            valid(&grant);
            let (signed, signature) = text.rsplit_once('.').expect("three parts");
            let signature = URL_SAFE_NO_PAD
                .decode(signature.trim_end_matches('='))
                .expect("the signature is base64url");
            assert_eq!(
                signature,
                sign(signed.as_bytes()),
                "forged token accepted: {text}"
            );
        }
    } else {
        let (header, claims) = text.split_once('\n').unwrap_or((text, ""));
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let token = format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(sign(signed.as_bytes()))
        );
        if let Ok(grant) = verifier.verify(&token, NOW) {
            valid(&grant);
            // Parsed as the verifier does: unknown fields are skipped unchecked.
            let header: Header = serde_json::from_str(header).expect("accepted header is JSON");
            assert_eq!(header.alg, "HS256");
            let claims: Claims = serde_json::from_str(claims).expect("accepted claims are JSON");
            assert_eq!(claims.sub, grant.user.as_str());
        }
    }
});

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// An accepted token names a valid user and has not expired (`exp` is required).
fn valid(grant: &Grant) {
    assert!(
        UserName::new(grant.user.as_str()).is_ok(),
        "{:?}",
        grant.user
    );
    assert!(
        grant.exp_secs.saturating_add(LEEWAY_SECS) >= NOW,
        "expired at {}",
        grant.exp_secs
    );
}

fn sign(input: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key");
    mac.update(input);
    mac.finalize().into_bytes().to_vec()
}
