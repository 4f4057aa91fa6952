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
//! Under systemd socket activation the listeners are the sockets systemd
//! passed ([`Listener::from_systemd`]), each of either kind (a `.socket`
//! unit may name a TCP port and a Unix socket for a local proxy); systemd
//! made them and keeps them (connections wait in their backlogs while the
//! server restarts), so the server never removes their files. The accept
//! loop takes connections from all of them ([`Listeners`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

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

/// Where a bound listener is reached: the TCP address it was given (a
/// port chosen by the system resolved) or its socket file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Local {
    /// As `listen` names it: `host:port` or `unix:PATH`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Local::Tcp(a) => write!(f, "{a}"),
            Local::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How many connections the kernel completes and holds for the server
/// to accept: systemd's default for a `.socket` unit (and what the kernel
/// caps it at, `net.core.somaxconn`, by default). The standard library's
/// and tokio's 128 overflowed under a burst of clients connecting at once
/// (robots pushing on the minute): the kernel dropped the connections
/// past it, which the clients sent again a second later, then three.
pub const BACKLOG: u32 = 4096;

impl Listener {
    /// Binds `listen`, with a backlog of [`BACKLOG`].
    pub async fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Tcp(addr) => bind_tcp(addr).await.map(Listener::Tcp),
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

    /// Where it listens (a TCP port chosen by the system is resolved).
    pub fn local(&self) -> io::Result<Local> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Local::Tcp),
            Listener::Unix(u) => Ok(Local::Unix(u.path.clone())),
        }
    }

    /// The next connection, with the peer address the routes see, if one
    /// waits; else `cx` is woken when one does.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Accepted, SocketAddr)>> {
        match self {
            Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, peer)| {
                // A 202 is one small write: send it at once.
                let _ = s.set_nodelay(true);
                (Either::Left(s), peer)
            }),
            Listener::Unix(u) => u
                .listener
                .poll_accept(cx)
                .map_ok(|(s, _)| (Either::Right(s), UNIX_PEER)),
        }
    }
}

/// The listeners one accept loop serves: the one `listen` names, or every
/// socket systemd passed.
pub struct Listeners {
    each: Vec<Listener>,
    /// Where the next accept starts looking, so that a busy listener
    /// does not keep the others' connections waiting.
    next: usize,
}

impl Listeners {
    /// Where each listens, in the order given.
    pub fn local(&self) -> io::Result<Vec<Local>> {
        self.each.iter().map(Listener::local).collect()
    }

    /// The next connection on any of them, with the peer address the
    /// routes see.
    pub async fn accept(&mut self) -> io::Result<(Accepted, SocketAddr)> {
        std::future::poll_fn(|cx| {
            let n = self.each.len();
            for i in 0..n {
                let at = (self.next + i) % n;
                if let Poll::Ready(r) = self.each[at].poll_accept(cx) {
                    self.next = (at + 1) % n;
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Every listening socket systemd passed (socket activation), in its
    /// order; an error names the socket that cannot be served.
    pub fn from_systemd(fds: Vec<OwnedFd>) -> io::Result<Listeners> {
        let n = fds.len();
        let each = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                Listener::from_systemd(fd).map_err(|e| {
                    let which = match n {
                        1 => "the socket systemd passed".to_string(),
                        _ => format!("socket {} of the {n} systemd passed", i + 1),
                    };
                    io::Error::new(e.kind(), format!("cannot serve {which}: {e}"))
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Listeners { each, next: 0 })
    }
}

impl From<Vec<Listener>> for Listeners {
    fn from(each: Vec<Listener>) -> Self {
        Listeners { each, next: 0 }
    }
}

impl From<Listener> for Listeners {
    fn from(l: Listener) -> Self {
        vec![l].into()
    }
}

impl From<TcpListener> for Listeners {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l).into()
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

/// Listens on the first address `addr` resolves to that can be bound,
/// as [`TcpListener::bind`] does, but with a backlog of [`BACKLOG`].
async fn bind_tcp(addr: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for at in tokio::net::lookup_host(addr).await? {
        let socket = match at {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std's and tokio's bind do, so that a restarted server binds
        // at once past its predecessor's connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(at) {
            Ok(()) => return socket.listen(BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to no address",
        )
    }))
}

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
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(i32::try_from(BACKLOG).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    let listener = UnixListener::from_std(socket.into())?;
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
    async fn sockets_from_systemd_are_served_as_what_they_are() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut l = Listeners::from(vec![
            Listener::from_systemd(OwnedFd::from(tcp)).unwrap(),
            Listener::from_systemd(OwnedFd::from(unix)).unwrap(),
        ]);
        assert_eq!(
            l.local().unwrap(),
            [Local::Tcp(addr), Local::Unix(path.clone())]
        );

        // A client of either is accepted, the Unix one seen as 127.0.0.1.
        let client = tokio::spawn(UnixStream::connect(path.clone()));
        let (s, peer) = l.accept().await.unwrap();
        assert!(client.await.unwrap().is_ok());
        assert!(matches!(s, Either::Right(_)));
        assert_eq!(peer, UNIX_PEER);
        let client = tokio::spawn(TcpStream::connect(addr));
        let (s, peer) = l.accept().await.unwrap();
        let client = client.await.unwrap().unwrap();
        assert!(matches!(s, Either::Left(_)));
        assert_eq!(peer, client.local_addr().unwrap());

        // Both waiting: the one not served last goes first, then the other.
        let t = TcpStream::connect(addr).await.unwrap();
        let u = UnixStream::connect(path.clone()).await.unwrap();
        let (first, _) = l.accept().await.unwrap();
        let (second, _) = l.accept().await.unwrap();
        assert!(
            matches!(first, Either::Right(_)),
            "the TCP one went first twice"
        );
        assert!(matches!(second, Either::Left(_)));
        drop((t, u));

        // systemd made the file and keeps it: dropping does not remove it.
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

        // Among several, the error names which one.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        match Listeners::from_systemd(vec![OwnedFd::from(tcp), OwnedFd::from(udp)]) {
            Ok(_) => panic!("served a datagram socket"),
            Err(e) => assert_eq!(
                e.to_string(),
                "cannot serve socket 2 of the 2 systemd passed: not a listening stream \
                 socket (the .socket unit needs Accept=no, the default, and ListenStream=)"
            ),
        }
    }
}
