//! Client authentication: HS256 JSON Web Tokens whose `sub` is the user name.
//!
//! Only what the protocol needs: the header must say `"alg":"HS256"` (any other algorithm,
//! `none` included, is refused, so there is no algorithm confusion), the signature is checked in
//! constant time with the configured secret, `exp` is required and `nbf` honoured when present
//! (both with a few seconds of leeway for clock skew), and `sub` must be a valid user name. A
//! connection lives no longer than its token: [`close_in`] says when the session must close it
//! unless a `refresh` brought a newer token. It uses the
//! HMAC-SHA256 already in the dependency tree rather than a general JWT crate, which would bring
//! RSA and elliptic-curve stacks and a second version of the digest crates.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chat_protocol::UserName;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token although the node requires one.
    #[error("a token is required")]
    Missing,
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// The header names another algorithm than HS256.
    #[error("unsupported token algorithm")]
    Algorithm,
    /// The signature does not match the secret.
    #[error("invalid token signature")]
    Signature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// No numeric `exp`: a token that never expires would keep its connection forever.
    #[error("token has no `exp`; tokens must expire")]
    NoExpiry,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `sub` is missing or not a valid user name.
    #[error("token subject is not a valid user name")]
    Subject,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user, the token's `sub`.
    pub user: UserName,
    /// The token's `exp`, in seconds since the Unix epoch (fractions dropped).
    pub exp_secs: u64,
}

/// How long a connection authenticated until `exp_secs` may stay open at `now_ms`
/// (milliseconds since the Unix epoch): until `exp` plus the leeway, zero once past it.
pub fn close_in(exp_secs: u64, now_ms: u64) -> std::time::Duration {
    let deadline_ms = exp_secs.saturating_add(LEEWAY_SECS).saturating_mul(1000);
    std::time::Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// Verifies tokens signed with one secret.
#[derive(Clone)]
pub struct Verifier {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(***)")
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &str) -> Verifier {
        Verifier {
            secret: secret.as_bytes().to_vec(),
        }
    }

    /// Checks `token` at `now_secs` (seconds since the Unix epoch); returns its user and expiry.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Grant, AuthError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header: Header = decode_json(header_b64)?;
        if header.alg != "HS256" {
            return Err(AuthError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature.trim_end_matches('='))
            .map_err(|_| AuthError::Malformed)?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|_| AuthError::Signature)?;
        // The signing input is the first two parts with their dot, exactly as sent.
        mac.update(&token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()]);
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::Signature)?;
        let claims: Claims = decode_json(payload_b64)?;
        let now = now_secs as f64;
        let exp = claims.exp.ok_or(AuthError::NoExpiry)?;
        if now > exp + LEEWAY_SECS as f64 {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claims.nbf
            && now + (LEEWAY_SECS as f64) < nbf
        {
            return Err(AuthError::NotYetValid);
        }
        let sub = claims.sub.ok_or(AuthError::Subject)?;
        let user = UserName::new(&sub).map_err(|_| AuthError::Subject)?;
        // `exp` is finite (JSON has no infinities) and not far past; `as` saturates.
        Ok(Grant {
            user,
            exp_secs: exp.max(0.0) as u64,
        })
    }
}

/// Signs `claims` with `secret` as an HS256 token (`{"alg":"HS256","typ":"JWT"}` header), as an
/// issuer would; load generators and tools use it to mint tokens for a node's `--auth-secret`.
pub fn sign(secret: &str, claims: &serde_json::Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    // HMAC accepts a key of any length, so `new_from_slice` cannot fail here.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with PyJWT 2 (`jwt.encode(claims, "s3cret", algorithm=...)`): a third-party issuer.
    const VALID: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.qRlbyNdlm8NKK6qruixbCq_HGTQfHHpTaGzC9JqMqVM";
    const EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTAwMDAwMDAwMH0.8HGcEhlWVAdW2pEW-hcgTmXAyy9Uh9dkiJnGt0WD36U";
    const HS384: &str = "eyJhbGciOiJIUzM4NCIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.uf2cy4ydoAybFAc7LmGe6S1Lq9QWVHjMjL8XTC-H3h9e12s1nyRwsKSTYDyDaOBE";
    const BAD_SUB: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJiYWQgbmFtZSIsImV4cCI6NDEwMjQ0NDgwMH0.ZIx6W9reovgmf-5sXRMN6DpNiGwWW0WxXuOUTX7DhPA";
    const NO_EXP: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.iG4X-JVfvYJy3rzsCErGO9LGFikv8Egjz-G6NhqV50k";
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn accepts_a_token_from_a_standard_issuer() {
        let v = Verifier::new("s3cret");
        let grant = v.verify(VALID, NOW).unwrap();
        assert_eq!(grant.user.as_str(), "alice");
        assert_eq!(grant.exp_secs, 4_102_444_800);
    }

    #[test]
    fn signed_tokens_verify_with_the_same_secret_only() {
        let claims = serde_json::json!({"sub": "alice", "exp": 4_102_444_800u64});
        let token = sign("s3cret", &claims);
        // The header is byte for byte a standard issuer's.
        assert_eq!(token.split('.').next(), VALID.split('.').next());
        assert_eq!(
            Verifier::new("s3cret").verify(&token, NOW),
            Verifier::new("s3cret").verify(VALID, NOW)
        );
        assert_eq!(
            Verifier::new("other").verify(&token, NOW),
            Err(AuthError::Signature)
        );
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let v = Verifier::new("s3cret");
        assert_eq!(v.verify(NO_EXP, NOW), Err(AuthError::NoExpiry));
    }

    #[test]
    fn a_connection_closes_at_exp_plus_the_leeway() {
        let exp = 1_800_000_000;
        let at_exp_ms = exp * 1000;
        assert_eq!(
            close_in(exp, at_exp_ms - 2_500),
            std::time::Duration::from_millis(2_500 + LEEWAY_SECS * 1000)
        );
        assert_eq!(
            close_in(exp, at_exp_ms + LEEWAY_SECS * 1000),
            std::time::Duration::ZERO
        );
        assert_eq!(close_in(exp, u64::MAX), std::time::Duration::ZERO);
        assert!(close_in(u64::MAX, at_exp_ms) > std::time::Duration::from_secs(1 << 40));
    }

    #[test]
    fn refuses_forged_expired_and_foreign_tokens() {
        let v = Verifier::new("s3cret");
        assert_eq!(
            Verifier::new("other").verify(VALID, NOW),
            Err(AuthError::Signature)
        );
        assert_eq!(v.verify(EXPIRED, NOW), Err(AuthError::Expired));
        assert_eq!(v.verify(HS384, NOW), Err(AuthError::Algorithm));
        assert_eq!(v.verify(BAD_SUB, NOW), Err(AuthError::Subject));
        assert_eq!(v.verify("abc", NOW), Err(AuthError::Malformed));
        assert_eq!(v.verify("a.b.c.d", NOW), Err(AuthError::Malformed));
        // The payload swapped for another user's keeps the old signature: refused.
        let (header, rest) = VALID.split_once('.').unwrap();
        let signature = rest.rsplit('.').next().unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":4102444800}"#);
        let forged = format!("{header}.{forged_payload}.{signature}");
        assert_eq!(v.verify(&forged, NOW), Err(AuthError::Signature));
        // alg "none" with an empty signature is refused.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#)
        );
        assert_eq!(v.verify(&none, NOW), Err(AuthError::Algorithm));
    }

    #[test]
    fn expiry_allows_a_little_clock_skew() {
        let v = Verifier::new("s3cret");
        assert!(v.verify(EXPIRED, 1_000_000_000 + LEEWAY_SECS).is_ok());
        assert_eq!(
            v.verify(EXPIRED, 1_000_000_001 + LEEWAY_SECS),
            Err(AuthError::Expired)
        );
    }
}
