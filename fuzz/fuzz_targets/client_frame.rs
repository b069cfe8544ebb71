//! A client's WebSocket text frame: `parse_request`, then the reply the session renders from its
//! result (a `pong` for a ping, an `error` frame for a refused request), which must echo the
//! request's `ref` verbatim.

#![no_main]

use chat_protocol::client::{
    ErrorCode, ErrorFrame, MAX_CLIENT_ID_LEN, MAX_HISTORY_LIMIT, Request, ServerFrame,
    parse_request,
};
use chat_protocol::{RoomId, UserName};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|frame: &str| {
    match parse_request(frame) {
        Ok(request) => {
            match &request.body {
                Request::Join { room, .. } | Request::Leave { room } | Request::Who { room } => {
                    valid_room(room)
                }
                Request::Send {
                    room, client_id, ..
                } => {
                    valid_room(room);
                    if let Some(id) = client_id {
                        assert!(!id.is_empty() && id.len() <= MAX_CLIENT_ID_LEN, "{id:?}");
                    }
                }
                Request::History { room, limit, .. } => {
                    valid_room(room);
                    assert!((1..=MAX_HISTORY_LIMIT).contains(limit), "{limit}");
                }
                Request::Direct { to, .. } => {
                    assert!(UserName::new(to.as_str()).is_ok(), "{to:?}")
                }
                Request::Ping | Request::Refresh { .. } | Request::Auth { .. } => {}
            }
            let reference = request.reference.as_deref();
            if let Some(r) = reference {
                let value: Value = serde_json::from_str(r.get()).expect("a ref is JSON");
                assert!(value.is_string() || value.is_i64() || value.is_u64(), "{r}");
            }
            let pong = ServerFrame::Pong { reference }.to_json();
            echoes(&pong, reference);
        }
        Err(e) => {
            assert!(
                matches!(e.code, ErrorCode::BadRequest | ErrorCode::InvalidRoom),
                "{:?}",
                e.code
            );
            let reference = e.reference.as_deref();
            let rendered = ServerFrame::Error(ErrorFrame {
                reference,
                code: e.code,
                message: &e.message,
            })
            .to_json();
            echoes(&rendered, reference);
        }
    }
});

fn valid_room(room: &RoomId) {
    assert!(RoomId::new(room.as_str()).is_ok(), "{room:?}");
}

/// The rendered frame is JSON and carries exactly the request's `ref`.
fn echoes(rendered: &str, reference: Option<&RawValue>) {
    let frame: Value = serde_json::from_str(rendered).expect("a rendered frame is JSON");
    let echoed = frame.get("ref");
    match reference {
        Some(r) => {
            let sent: Value = serde_json::from_str(r.get()).expect("a ref is JSON");
            assert_eq!(echoed, Some(&sent), "{rendered}");
        }
        None => assert!(echoed.is_none(), "{rendered}"),
    }
}
