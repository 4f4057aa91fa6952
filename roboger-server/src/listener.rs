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
//!
//! Under systemd socket activation the listener is the socket systemd
//! passed ([`Listener::from_systemd`]), of either kind; systemd made it and
//! keeps it (connections wait in its backlog while the server restarts),
//! so the server never removes its file.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::either::Either;

use crate::config::Listen;

/// The peer address the routes see for a client of the Unix socket.
pub const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

/// A listening Unix socket.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The server made the socket file, and removes it when dropped.
    made: bool,
}

/// One accepted connection, read and written alike over either kind
/// (tokio-util's `Either` passes each call on to the stream it holds).
pub type Accepted = Either<TcpStream, UnixStream>;

impl Listener {
    /// Binds `listen`.
    pub async fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp),
            Listen::Unix(path) => bind_unix(path).await.map(Listener::Unix),
        }
    }

    /// The listening socket systemd passed to the server (socket
    /// activation, `LISTEN_FDS`), a TCP or a Unix one.
    pub fn from_systemd(fd: OwnedFd) -> io::Result<Listener> {
        let socket = socket2::Socket::from(fd);
        if socket.r#type()? != socket2::Type::STREAM || !socket.is_listener()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a listening stream socket (the .socket unit needs Accept=no, \
                 the default, and ListenStream=)",
            ));
        }
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        let fd = OwnedFd::from(socket);
        if local.as_socket().is_some() {
            return TcpListener::from_std(std::net::TcpListener::from(fd)).map(Listener::Tcp);
        }
        let Some(path) = local.as_pathname().map(Path::to_path_buf) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a TCP socket nor a Unix socket with a path (abstract sockets are not served)",
            ));
        };
        let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))?;
        Ok(Listener::Unix(UnixSocket {
            listener,
            path,
            made: false,
        }))
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
                Ok((Either::Left(s), peer))
            }
            Listener::Unix(u) => {
                let (s, _) = u.listener.accept().await?;
                Ok((Either::Right(s), UNIX_PEER))
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
        if !self.made {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file");
        }
    }
}

fn in_use() -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        "another process listens on this socket",
    )
}

/// How long the check of an existing socket file waits for a connection.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn bind_unix(path: &Path) -> io::Result<UnixSocket> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
                Ok(Ok(_)) => return Err(in_use()),
                // A process whose backlog is full holds it too.
                Err(_) => return Err(in_use()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Err(in_use()),
                // Nobody listens: a socket file left by a server that died.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    tracing::info!(path = %path.display(), "replacing a socket file nobody listened on");
                }
                Ok(Err(e)) => return Err(e),
            }
        }
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
        made: true,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_from_systemd_is_served_as_what_it_is() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let l = Listener::from_systemd(OwnedFd::from(tcp)).unwrap();
        assert_eq!(l.local().unwrap(), Listen::Tcp(addr.to_string()));
        let client = tokio::spawn(TcpStream::connect(addr));
        let (_, peer) = l.accept().await.unwrap();
        assert!(client.await.unwrap().is_ok());
        assert!(peer.ip().is_loopback());

        // systemd made the file and keeps it: dropping does not remove it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let l = Listener::from_systemd(OwnedFd::from(unix)).unwrap();
        assert_eq!(l.local().unwrap(), Listen::Unix(path.clone()));
        let client = tokio::spawn(UnixStream::connect(path.clone()));
        let (_, peer) = l.accept().await.unwrap();
        assert!(client.await.unwrap().is_ok());
        assert_eq!(peer, UNIX_PEER);
        drop(l);
        assert!(path.exists());
    }

    #[tokio::test]
    async fn a_socket_from_systemd_that_cannot_be_served_is_refused() {
        use socket2::{Domain, Socket, Type};
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let unlistened = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        use std::os::linux::net::SocketAddrExt;
        let abstract_name = std::os::unix::net::SocketAddr::from_abstract_name(format!(
            "roboger-test-{}",
            std::process::id()
        ))
        .unwrap();
        let abstract_listener =
            std::os::unix::net::UnixListener::bind_addr(&abstract_name).unwrap();
        for (fd, why) in [
            (OwnedFd::from(udp), "not a listening stream socket"),
            (OwnedFd::from(unlistened), "not a listening stream socket"),
            (
                OwnedFd::from(abstract_listener),
                "abstract sockets are not served",
            ),
        ] {
            match Listener::from_systemd(fd) {
                Ok(_) => panic!("served: {why}"),
                Err(e) => assert!(e.to_string().contains(why), "{e}"),
            }
        }
    }
}
