//! The server's log writer: each event the tracing formatter makes (the
//! server's own, and its plugins' lines through `plugin_log`) reaches
//! stderr as one line, with secrets masked ([`crate::secrets::scrub`]).
//!
//! What a line quotes may come from outside: a plugin's error (a shell
//! command's stderr, and with it an event's message), a plugin's `log`
//! call. The formatter escapes terminal controls in what it quotes, but
//! not a line break or a carriage return: a pusher could put a line of
//! its own making into the log, timestamp, level and all, which journald
//! and whatever reads the log took for the server's, and a carriage
//! return hid the start of a line on a terminal. Inside a line they are
//! written `\n` and `\r`.
//!
//! Invariant: every log line goes out through [`LogWriter`], and each
//! event it is handed is written as one line.

use std::borrow::Cow;
use std::io::Write;

use crate::secrets::scrub;

/// The tracing writer: stderr, one line per event, secrets masked.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter
    }
}

/// One event's write to stderr (the formatter writes each event whole).
#[derive(Debug)]
pub struct EventWriter;

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        // Masked first: a secret with a line break is then still found.
        let masked = scrub(&text);
        std::io::stderr().write_all(one_line(&masked).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `event` (a formatted event, ending with its line break) with every
/// line break and carriage return before its end escaped.
fn one_line(event: &str) -> Cow<'_, str> {
    let (line, end) = match event.strip_suffix('\n') {
        Some(line) => (line, "\n"),
        None => (event, ""),
    };
    if !line.contains(['\n', '\r']) {
        return Cow::Borrowed(event);
    }
    let mut out = String::with_capacity(event.len() + 16);
    for c in line.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push_str(end);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line() {
        assert!(matches!(one_line("INFO plain x=1\n"), Cow::Borrowed(_)));
        assert_eq!(
            one_line("WARN failed: a\nERROR b\r\n x=1\n"),
            "WARN failed: a\\nERROR b\\r\\n x=1\n"
        );
        assert_eq!(one_line("no end\r"), "no end\\r");
    }
}
