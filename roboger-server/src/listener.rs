//! The server's listening socket: a TCP port, or a Unix socket for a
//! proxy on the same host (what a `roboger.yml` of the original names with
//! gunicorn's `unix:PATH`).
//!
//! A Unix socket is made at start: a socket file left by a server that
//! died is replaced, one that a running server still answers on is not
//! (the start fails), and anything else at the path is refused. The file
//! is made connectable by every local user, as a loopback TCP port is
//! (the directory's permissions restrict it further), and is removed when
//! the listener is dropped. A client of the Unix socket is on this host,
//! so the routes see it as `127.0.0.1` ([`UNIX_PEER`]); behind a proxy,
//! `ip-header` names the real client as it does over TCP.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::Listen;

/// The peer address the routes see for a client of the Unix socket.
pub const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

/// A listening Unix socket whose file is removed when it is dropped.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

/// One accepted connection.
pub enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// Binds `listen`.
    pub async fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp),
            Listen::Unix(path) => bind_unix(path).await.map(Listener::Unix),
        }
    }

    /// Where it listens, as a client would reach it (a TCP port chosen
    /// by the system is resolved).
    pub fn local(&self) -> io::Result<Listen> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| Listen::Tcp(a.to_string())),
            Listener::Unix(u) => Ok(Listen::Unix(u.path.clone())),
        }
    }

    /// The next connection, with the peer address the routes see.
    pub async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // A 202 is one small write: send it at once.
                let _ = s.set_nodelay(true);
                Ok((Accepted::Tcp(s), peer))
            }
            Listener::Unix(u) => {
                let (s, _) = u.listener.accept().await?;
                Ok((Accepted::Unix(s), UNIX_PEER))
            }
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file");
        }
    }
}

async fn bind_unix(path: &Path) -> io::Result<UnixSocket> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process listens on this socket",
                ));
            }
            // Nobody listens: a socket file left by a server that died.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
                tracing::info!(path = %path.display(), "replacing a socket file nobody listened on");
            }
            Err(e) => return Err(e),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    let socket = UnixSocket {
        listener,
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(socket)
}
