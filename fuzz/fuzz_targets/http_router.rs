//! The HTTP routing of the gateway: `route_of` (method and path to a route), `ws_query` and
//! `parse_query` (the `/ws` query string), on raw strings and on what hyper's URI parser passes
//! on. Percent-decoding is checked against a plain reference decoder.
//!
//! Input: one byte choosing the method, then the request target (`/path?query`).

#![no_main]

use std::collections::HashMap;

use chat_node::gateway::http::{Route, parse_query, route_of, ws_query};
use chat_protocol::{RoomId, UserName};
use hyper::{Method, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let method = match m % 4 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::POST,
        _ => Method::DELETE,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    check(&method, path, query);
    if let Ok(uri) = target.parse::<Uri>() {
        check(&method, uri.path(), uri.query().unwrap_or(""));
    }
});

fn check(method: &Method, path: &str, query: &str) {
    let route = route_of(method, path);
    if method != Method::GET && method != Method::HEAD {
        assert_eq!(route, Route::MethodNotAllowed);
        return;
    }
    let room = path.strip_prefix("/cluster/rooms/");
    match &route {
        Route::RoomPlacement(r) => {
            let room = room.expect("placement of /cluster/rooms/ only");
            assert_eq!(r.as_str(), decode(room), "{path:?}");
        }
        Route::InvalidRoom => {
            let room = room.expect("placement of /cluster/rooms/ only");
            assert!(RoomId::new(&decode(room)).is_err(), "{path:?}");
        }
        Route::NotFound => assert!(room.is_none(), "{path:?}"),
        _ => assert!(path.len() <= "/index.html".len(), "{path:?} -> {route:?}"),
    }

    let parsed = parse_query(query);
    assert_eq!(parsed, reference_query(query), "{query:?}");
    match ws_query(query) {
        Ok(ws) => {
            assert_eq!(
                ws.user.as_ref().map(UserName::as_str),
                parsed.get("user").map(String::as_str)
            );
            assert_eq!(ws.token.as_ref(), parsed.get("token"));
        }
        Err(_) => {
            let user = parsed.get("user").expect("only a bad user is an error");
            assert!(UserName::new(user).is_err());
        }
    }
}

fn reference_query(query: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(decode(key)).or_insert_with(|| decode(value));
    }
    out
}

/// `%XX` with two hex digits is a byte, `+` a space, anything else itself; then lossy UTF-8.
fn decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
