//! Packet captures on loopback with tcpdump (root only), for tests that check what crosses the
//! wire: that chat text never crosses a TLS link in clear, that a replayed datagram is refused.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::skip;

/// tcpdump writing every packet on loopback that matches a filter to a file.
pub struct Capture {
    child: Child,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Starts capturing what matches `filter` (tcpdump's syntax); `None` (and the test is
    /// reported skipped) without root or without tcpdump.
    pub fn start(filter: &str) -> Option<Capture> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            skip("capturing packets needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("capture.pcap");
        let child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            skip("tcpdump is not installed");
            return None;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // tcpdump creates the file before its filter is attached.
        std::thread::sleep(Duration::from_millis(500));
        Some(Capture {
            child,
            file,
            _dir: dir,
        })
    }

    /// Stops the capture; the pcap file's bytes.
    pub fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("read the capture")
    }
}

/// The UDP payloads of an Ethernet-framed IPv4 pcap file (what tcpdump writes for `lo`), in
/// order.
pub fn udp_payloads(pcap: &[u8]) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut at = 24; // the global header
    while at + 16 <= pcap.len() {
        let captured = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().expect("4 bytes"));
        let start = at + 16;
        let end = start + captured as usize;
        let Some(frame) = pcap.get(start..end) else {
            break;
        };
        at = end;
        // Ethernet (14 bytes), IPv4 with its header length, UDP (8 bytes).
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
            continue;
        }
        let ip_header = usize::from(frame[14] & 0x0f) * 4;
        let udp = 14 + ip_header;
        if let Some(payload) = frame.get(udp + 8..) {
            payloads.push(payload.to_vec());
        }
    }
    payloads
}
