//! `chat-healthcheck`: asks a node's `GET /healthz` whether it serves clients, for container
//! health checks where no `curl` exists (the image is `FROM scratch`).
//!
//! Usage: `chat-healthcheck [PORT | HOST:PORT]`. Without an argument the port comes from
//! `CHAT_HEALTHCHECK_PORT`, else is 8080; the host is `127.0.0.1` unless given. Exits 0 when the
//! node answers HTTP 200, else prints one line to stderr and exits 1. Connecting, sending and
//! reading each give up after [`TIMEOUT`], so a hung node fails the check instead of hanging it.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long connecting, then sending the request, then reading the status line may each take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The port asked when neither the argument nor `CHAT_HEALTHCHECK_PORT` gives one.
const DEFAULT_PORT: &str = "8080";

/// The host asked when the target is a bare port.
const DEFAULT_HOST: &str = "127.0.0.1";

/// Largest response read; the status line is all that matters, the rest is skipped.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

fn main() -> ExitCode {
    let spec = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("CHAT_HEALTHCHECK_PORT").ok())
        .unwrap_or_else(|| DEFAULT_PORT.to_owned());
    let target = target_addr(&spec);
    match check(&target) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("chat-healthcheck: http://{target}/healthz: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Turns the command-line target into `host:port`: a bare port means `127.0.0.1:PORT`; an
/// `http://` prefix and a trailing `/` are tolerated.
fn target_addr(spec: &str) -> String {
    let spec = spec.trim();
    let spec = spec.strip_prefix("http://").unwrap_or(spec);
    let spec = spec.trim_end_matches('/');
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        format!("{DEFAULT_HOST}:{spec}")
    } else {
        spec.to_owned()
    }
}

/// Sends `GET /healthz` to `target` (`host:port`) and succeeds only on status 200.
fn check(target: &str) -> Result<(), String> {
    let addrs = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?;
    let mut last_error = String::from("no address");
    let mut stream = None;
    // A host name may resolve to several addresses (IPv6 and IPv4): the first that accepts wins.
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(e) => last_error = format!("cannot connect to {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| format!("cannot set the write timeout: {e}"))?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let response = read_head(&mut stream)?;
    match status_code(&response) {
        Some(200) => Ok(()),
        Some(code) => Err(format!("HTTP {code}")),
        None => Err(String::from("not an HTTP response")),
    }
}

/// Reads until the status line is complete, the peer closes, or [`MAX_RESPONSE_BYTES`] arrived;
/// gives up when [`TIMEOUT`] has passed in all, so a peer that trickles bytes cannot stall it.
fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut response = Vec::new();
    let mut chunk = [0_u8; 1024];
    while !response.contains(&b'\n') && response.len() < MAX_RESPONSE_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(no_answer());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("cannot set the read timeout: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(no_answer());
            }
            Err(e) => return Err(format!("cannot read the response: {e}")),
        }
    }
    Ok(response)
}

/// The failure reported when the node accepted the connection but did not answer in time.
fn no_answer() -> String {
    format!("no answer within {} s", TIMEOUT.as_secs())
}

/// The status code of an HTTP/1.x response, from its status line (`HTTP/1.1 200 OK`); `None`
/// when the bytes do not start with one.
fn status_code(response: &[u8]) -> Option<u16> {
    let line_end = response.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(response.get(..line_end)?).ok()?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_response_gives_200() {
        let response =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"status\":\"ok\"}";
        assert_eq!(status_code(response), Some(200));
    }

    #[test]
    fn unavailable_response_gives_503() {
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.0 503\r\n"), Some(503));
    }

    #[test]
    fn garbage_and_truncated_responses_give_none() {
        assert_eq!(status_code(b""), None);
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), None, "no end of line yet");
        assert_eq!(status_code(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_code(b"HTTP/2 200\r\n"), None);
    }

    #[test]
    fn bare_port_targets_localhost() {
        assert_eq!(target_addr("8080"), "127.0.0.1:8080");
        assert_eq!(target_addr("probe-a:8080"), "probe-a:8080");
        assert_eq!(target_addr("http://probe-a:8080/"), "probe-a:8080");
        assert_eq!(target_addr("[::1]:8080"), "[::1]:8080");
    }
}
