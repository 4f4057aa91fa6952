//! A child process's stdout and stderr, read into one text a test can
//! search while the child runs.
//!
//! Reading it first takes in every byte the child has written so far:
//! a line the server logged before it answered a request is in the text
//! a test reads after the answer. A thread of its own still reads the
//! pipes as the child writes (so that a child never blocks on a full
//! pipe, and a start-up's "listening on" line is seen); but it was the
//! only reader once, and on a busy machine it could be scheduled
//! milliseconds after the answer had arrived, so that a test which
//! looked at once missed a line that was there.
//!
//! Invariant: bytes leave a pipe only while the text's lock is held, and
//! are in the text when it is let go.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::event::{PollFd, PollFlags, poll};

/// The live log of one child process.
pub struct LiveLog {
    state: Mutex<State>,
}

struct State {
    text: String,
    pipes: Vec<Pipe>,
    /// Gets the address of the first "listening on" line.
    listening: Option<Sender<String>>,
}

struct Pipe {
    file: File,
    /// The start of a line whose end is still to come.
    partial: Vec<u8>,
    closed: bool,
}

impl LiveLog {
    /// Reads `pipes` (the child's stdout and stderr) from now on; the
    /// address of a "listening on" line goes to `listening`.
    pub fn start(pipes: Vec<OwnedFd>, listening: Sender<String>) -> Arc<LiveLog> {
        let polled: Vec<OwnedFd> = pipes.iter().filter_map(|p| p.try_clone().ok()).collect();
        let log = Arc::new(LiveLog {
            state: Mutex::new(State {
                text: String::new(),
                pipes: pipes
                    .into_iter()
                    .map(|fd| Pipe {
                        file: File::from(fd),
                        partial: Vec::new(),
                        closed: false,
                    })
                    .collect(),
                listening: Some(listening),
            }),
        });
        let reader = log.clone();
        std::thread::spawn(move || reader.follow(&polled));
        log
    }

    /// Everything the child wrote so far.
    pub fn text(&self) -> String {
        self.read().text.clone()
    }

    /// Whether what the child wrote so far contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.read().text.contains(needle)
    }

    /// The text, with every byte written so far taken in.
    fn read(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        state.take_in();
        state
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reading thread: waits for bytes (or the end) on the pipes not
    /// closed yet, and takes them in.
    fn follow(&self, polled: &[OwnedFd]) {
        loop {
            let open: Vec<usize> = {
                let state = self.lock();
                (0..polled.len())
                    .filter(|&i| state.pipes.get(i).is_some_and(|p| !p.closed))
                    .collect()
            };
            if open.is_empty() {
                return;
            }
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .map(|&i| PollFd::new(&polled[i], PollFlags::IN))
                .collect();
            if poll(&mut fds, None).is_err() {
                continue;
            }
            let ended: Vec<usize> = open
                .iter()
                .zip(&fds)
                .filter(|(_, fd)| {
                    fd.revents()
                        .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
                })
                .map(|(&i, _)| i)
                .collect();
            let mut state = self.lock();
            state.take_in();
            for i in ended {
                state.end_if_empty(i);
            }
        }
    }
}

impl State {
    /// Takes in every byte waiting in the pipes.
    fn take_in(&mut self) {
        let mut lines = Vec::new();
        for pipe in self.pipes.iter_mut().filter(|p| !p.closed) {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(waiting) = rustix::io::ioctl_fionread(pipe.file.as_fd())
                && waiting > 0
            {
                // As many bytes as are there: the read does not block.
                let want = buf.len().min(usize::try_from(waiting).unwrap_or(buf.len()));
                match pipe.file.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => pipe.partial.extend_from_slice(&buf[..n]),
                }
            }
            while let Some(end) = pipe.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pipe.partial.drain(..=end).collect();
                lines.push(String::from_utf8_lossy(&line[..end]).into_owned());
            }
        }
        for line in lines {
            self.add(&line);
        }
    }

    /// Closes pipe `i` if the child's end is closed and nothing is left
    /// in it; an unfinished last line is kept.
    fn end_if_empty(&mut self, i: usize) {
        let Some(pipe) = self.pipes.get_mut(i) else {
            return;
        };
        if rustix::io::ioctl_fionread(pipe.file.as_fd()).is_ok_and(|n| n > 0) {
            return;
        }
        pipe.closed = true;
        if !pipe.partial.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut pipe.partial)).into_owned();
            self.add(&line);
        }
    }

    fn add(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
        if let Some(i) = line.find("listening on ") {
            let addr: String = line[i + "listening on ".len()..]
                .chars()
                .take_while(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '.' | ':' | '[' | ']' | '/' | '-' | '_')
                })
                .collect();
            if let Some(tx) = self.listening.take() {
                let _ = tx.send(addr);
            }
        }
    }
}
