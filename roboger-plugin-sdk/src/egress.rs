//! The egress policy of the SDK's HTTP client: which addresses a plugin
//! may connect to, checked on every connection.
//!
//! The server sends the policy in `hello` (its `egress` setting, or the
//! plugin's own); addresses are refused by CIDR. Some are refused unless
//! allowed explicitly: link-local (with the cloud metadata services),
//! unspecified and multicast addresses. An allowed network wins over a
//! denied one, so an operator can deny `10.0.0.0/8` and allow the one host
//! a plugin needs.
//!
//! Two places enforce it, both at connect time: the client's resolver
//! returns only the permitted addresses of a host name (so a name that
//! resolves, or is rebound, to a refused address is never connected to),
//! and a connector layer checks the peer address of every connection made
//! (literal addresses, every redirect hop) before a byte of the request
//! is sent.
//!
//! Invariant: every connection the SDK's client makes was checked
//! against the policy in force.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use hyper_util::client::legacy::connect::{Connection, HttpInfo};
use ipnet::IpNet;

use crate::protocol::Egress;

/// Networks refused unless allowed explicitly, with why.
pub const DEFAULT_DENY: [(&str, &str); 7] = [
    ("169.254.0.0/16", "link-local and cloud metadata"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
];

/// A connection the policy refused; its text names the rule.
#[derive(Debug, Clone, thiserror::Error)]
#[error("egress refused: {addr} is in {net} ({why})")]
pub struct Refused {
    pub addr: IpAddr,
    pub net: IpNet,
    pub why: String,
}

/// Which addresses may be connected to.
#[derive(Debug, Clone)]
pub struct Policy {
    deny: Vec<(IpNet, String)>,
    allow: Vec<IpNet>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(&Egress::default())
    }
}

impl Policy {
    /// The defaults plus what the server sent; unparsable entries (the
    /// server checks them) are skipped.
    pub fn new(e: &Egress) -> Policy {
        let mut deny: Vec<(IpNet, String)> = DEFAULT_DENY
            .iter()
            .filter_map(|(n, why)| Some((n.parse().ok()?, format!("{why}, denied by default"))))
            .collect();
        deny.extend(
            e.deny
                .iter()
                .filter_map(|n| Some((parse_net(n)?, "denied by the egress policy".into()))),
        );
        let allow = e.allow.iter().filter_map(|n| parse_net(n)).collect();
        Policy { deny, allow }
    }

    /// Whether `ip` may be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let ip = canonical(ip);
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match self.deny.iter().find(|(n, _)| n.contains(&ip)) {
            Some((net, why)) => Err(Refused {
                addr: ip,
                net: *net,
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// IPv4 addresses written as IPv6 (`::ffff:a.b.c.d`) are judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

static POLICY: RwLock<Option<Arc<Policy>>> = RwLock::new(None);

/// Sets the policy in force (from the server's `hello`).
pub fn set(e: &Egress) {
    if let Ok(mut p) = POLICY.write() {
        *p = Some(Arc::new(Policy::new(e)));
    }
}

/// The policy in force: the server's, or the defaults before it sent one.
pub fn current() -> Arc<Policy> {
    POLICY
        .read()
        .ok()
        .and_then(|p| p.clone())
        .unwrap_or_else(|| Arc::new(Policy::default()))
}

/// The address a URL names literally, if it does.
pub fn literal(url: &reqwest::Url) -> Option<IpAddr> {
    url.host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse().ok())
}

/// Finds a [`Refused`] among an error's causes.
pub fn refused_in(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's resolver: the system's, keeping only permitted addresses.
#[derive(Debug, Clone, Copy)]
pub struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let policy = current();
            let mut refused = None;
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        refused.get_or_insert(r);
                        false
                    }
                })
                .collect();
            match (kept.is_empty(), refused) {
                (true, Some(r)) => Err(Box::new(r) as BoxError),
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The connector layer that checks each connection's peer address.
#[derive(Debug, Clone, Copy)]
pub struct GuardLayer;

impl<S> tower_layer::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner }
    }
}

/// A connector that refuses a connection to an address the policy refuses
/// (it is dropped before anything is written to it).
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
}

impl<S, R, C> tower_service::Service<R> for Guard<S>
where
    S: tower_service::Service<R, Response = C, Error = BoxError>,
    S::Future: Send + 'static,
    C: Connection + Send + 'static,
{
    type Response = C;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<C, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let connecting = self.inner.call(req);
        Box::pin(async move {
            let conn = connecting.await?;
            let mut extras = http::Extensions::new();
            conn.connected().get_extras(&mut extras);
            match extras.get::<HttpInfo>() {
                Some(info) => current().check(info.remote_addr().ip())?,
                None => return Err("egress refused: the connection's address is unknown".into()),
            }
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_deny_and_allow_wins() {
        let p = Policy::default();
        assert!(p.check(ip("169.254.169.254")).is_err());
        assert!(p.check(ip("::ffff:169.254.169.254")).is_err());
        assert!(p.check(ip("fd00:ec2::254")).is_err());
        assert!(p.check(ip("0.0.0.0")).is_err());
        assert!(p.check(ip("239.1.2.3")).is_err());
        assert!(p.check(ip("127.0.0.1")).is_ok());
        assert!(p.check(ip("10.1.2.3")).is_ok());

        let p = Policy::new(&Egress {
            deny: vec!["127.0.0.0/8".into(), "::1".into()],
            allow: vec!["127.0.0.1/32".into(), "169.254.1.1".into()],
        });
        assert!(p.check(ip("127.0.0.1")).is_ok());
        let e = p.check(ip("127.0.0.2")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "egress refused: 127.0.0.2 is in 127.0.0.0/8 (denied by the egress policy)"
        );
        assert!(p.check(ip("::1")).is_err());
        assert!(p.check(ip("169.254.1.1")).is_ok(), "allowed explicitly");
        assert!(
            p.check(ip("169.254.1.2"))
                .unwrap_err()
                .to_string()
                .contains("denied by default")
        );
    }
}
