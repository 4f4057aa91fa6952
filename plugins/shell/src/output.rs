//! A command's output, read to its end but kept within bounds: the start
//! of each stream for the log and the end of stderr for the failed
//! delivery's error, with every other byte read, counted and dropped. A
//! command that prints without end then neither fills the plugin's memory
//! (one plugin process serves every shell endpoint) nor floods the log.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of each stream kept for the log.
const LOGGED_BYTES: usize = 8 * 1024;
/// Lines of each stream logged, within [`LOGGED_BYTES`].
const LOGGED_LINES: usize = 50;
/// Bytes of the end of a stream kept for an error (300 characters of it
/// are quoted).
const TAIL_BYTES: usize = 1200;
/// Characters of stderr's end a failed delivery's error quotes.
const ERROR_CHARS: usize = 300;

/// What was read of one stream.
#[derive(Default)]
pub struct Output {
    head: Vec<u8>,
    tail: Vec<u8>,
    total: u64,
}

impl Output {
    /// Reads `stream` until its end or an error, keeping what it keeps.
    /// What was read stays here when the read is dropped before the end.
    pub async fn read_from(&mut self, stream: Option<&mut (impl AsyncRead + Unpin)>) {
        let Some(stream) = stream else { return };
        let mut buf = [0u8; 8192];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            self.push(&buf[..n]);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = LOGGED_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * TAIL_BYTES {
            self.tail.drain(..self.tail.len() - TAIL_BYTES);
        }
    }

    /// The lines to log: up to [`LOGGED_LINES`] lines of the first
    /// [`LOGGED_BYTES`], then one saying how much more there was.
    pub fn log_lines(&self, stream: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.head);
        let mut lines = Vec::new();
        let mut logged = 0u64;
        for line in text.split_inclusive('\n').take(LOGGED_LINES) {
            logged += line.len() as u64;
            lines.push(line.trim_end_matches(['\n', '\r']).to_string());
        }
        let logged = logged.min(self.head.len() as u64);
        if self.total > logged {
            lines.push(format!(
                "… {} more bytes of {stream} not logged ({} in all)",
                self.total - logged,
                self.total
            ));
        }
        lines
    }

    /// The last [`ERROR_CHARS`] characters, trimmed.
    pub fn end(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let skip = text.chars().count().saturating_sub(ERROR_CHARS);
        text.chars()
            .skip(skip)
            .collect::<String>()
            .trim()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_output_is_logged_by_its_start_and_quoted_by_its_end() {
        let mut o = Output::default();
        for i in 0..100_000 {
            o.push(format!("line {i}\n").as_bytes());
        }
        let lines = o.log_lines("stdout");
        assert_eq!(lines.len(), LOGGED_LINES + 1);
        assert_eq!(lines[0], "line 0");
        assert_eq!(
            lines[LOGGED_LINES - 1],
            format!("line {}", LOGGED_LINES - 1)
        );
        assert!(lines[LOGGED_LINES].contains("in all)"), "{lines:?}");
        assert!(o.head.len() <= LOGGED_BYTES && o.tail.len() <= 2 * TAIL_BYTES);
        assert!(o.end().ends_with("line 99999"), "{}", o.end());
        assert!(o.end().chars().count() <= ERROR_CHARS);
    }

    #[test]
    fn a_short_output_is_logged_whole() {
        let mut o = Output::default();
        o.push(b"one\r\ntwo");
        assert_eq!(o.log_lines("stderr"), ["one", "two"]);
        assert_eq!(o.end(), "one\r\ntwo");
    }
}
