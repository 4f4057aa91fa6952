//! Who may use the management API: the master key (header `X-Auth-Key` or
//! body field `k`, compared in constant time) and the `master.allow`
//! networks, checked against the client's real IP: the socket peer's, or
//! what `ip-header` says when the peer is a proxy `ip-header-from` names
//! (any peer when it names none, as in the original). Refusals are
//! counted by reason for `/metrics`, and logged within
//! [`log_budget::REFUSED`]: a client refused in a loop does not fill the
//! log.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::log_budget;
use crate::metrics::ManagementRefused;

/// The checks made before any management request runs.
#[derive(Debug)]
pub struct MasterAuth {
    key_digest: [u8; 32],
    allow: Vec<IpNet>,
    ip_header: Option<HeaderName>,
    /// The peers whose `ip_header` is believed (empty: every peer).
    proxies: Vec<IpNet>,
    wrong_key: AtomicU64,
    not_allowed: AtomicU64,
    waiting: AtomicU64,
}

impl MasterAuth {
    /// From the configured key, allowed networks, real-IP header and the
    /// proxies it is believed from.
    pub fn new(key: &str, allow: Vec<IpNet>, ip_header: Option<&str>, proxies: Vec<IpNet>) -> Self {
        MasterAuth {
            key_digest: Sha256::digest(key.as_bytes()).into(),
            allow,
            ip_header: ip_header.and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            proxies,
            wrong_key: AtomicU64::new(0),
            not_allowed: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    /// The master key's SHA-256 (what sessions signed in with it are
    /// bound to; `api::console::session`).
    pub fn key_digest(&self) -> &[u8; 32] {
        &self.key_digest
    }

    /// The refusals so far.
    pub fn refused(&self) -> ManagementRefused {
        ManagementRefused {
            wrong_key: self.wrong_key.load(Ordering::Relaxed),
            not_allowed: self.not_allowed.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Counts a request refused because its address gave too many wrong
    /// keys (`api::guessing` decides that).
    pub fn count_waiting(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// The client's IP: the configured header's first address when present
    /// and valid and the socket peer is a proxy it is believed from, else
    /// the socket peer.
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let believed =
            self.proxies.is_empty() || peer.is_some_and(|p| within(&self.proxies, p.ip()));
        if let Some(h) = self.ip_header.as_ref().filter(|_| believed) {
            let from_header = headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse::<IpAddr>().ok());
            if from_header.is_some() {
                return from_header;
            }
        }
        peer.map(|p| p.ip())
    }

    /// Passes when the client is in an allowed network (if any are set)
    /// and `key` is the master key: no key is 401, anything else 403.
    pub fn check(&self, ip: Option<IpAddr>, key: Option<&str>) -> Result<(), ApiError> {
        self.allowed(ip)?;
        let Some(key) = key else {
            return Err(ApiError::Unauthorized);
        };
        let given: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if bool::from(given.ct_eq(&self.key_digest)) {
            Ok(())
        } else {
            if log_budget::REFUSED.logged() {
                tracing::warn!(?ip, "management access with a wrong key");
            }
            self.wrong_key.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::Forbidden("forbidden: invalid key"))
        }
    }

    /// Passes when the client is in an allowed network, or when no
    /// networks are set (403 otherwise).
    pub fn allowed(&self, ip: Option<IpAddr>) -> Result<(), ApiError> {
        if !self.allow.is_empty() && !ip.is_some_and(|ip| within(&self.allow, ip)) {
            if log_budget::REFUSED.logged() {
                tracing::warn!(?ip, "management access from an address not in master.allow");
            }
            self.not_allowed.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Forbidden(
                "forbidden: client address is not allowed",
            ));
        }
        Ok(())
    }
}

/// Whether `ip` is in one of `nets` (an IPv4 client of a dual-stack
/// socket as its IPv4 address).
pub fn within(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// IPv4 clients on a dual-stack socket appear as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_networks() {
        let a = MasterAuth::new(
            "secret",
            vec!["10.0.0.0/8".parse().unwrap()],
            Some("X-Real-IP"),
            Vec::new(),
        );
        let inside = Some("10.1.2.3".parse().unwrap());
        assert!(a.check(inside, Some("secret")).is_ok());
        assert!(matches!(a.check(inside, None), Err(ApiError::Unauthorized)));
        assert!(matches!(
            a.check(inside, Some("nope")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            a.check(Some("192.168.0.1".parse().unwrap()), Some("secret")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(
            a.check(Some("::ffff:10.0.0.1".parse().unwrap()), Some("secret"))
                .is_ok()
        );
        assert_eq!(
            a.refused(),
            ManagementRefused {
                wrong_key: 1,
                not_allowed: 1,
                waiting: 0
            }
        );
        a.count_waiting();
        assert_eq!(a.refused().waiting, 1);

        let mut h = HeaderMap::new();
        h.insert("x-real-ip", "10.9.9.9, 1.1.1.1".parse().unwrap());
        let peer = Some("127.0.0.1:5".parse().unwrap());
        assert_eq!(a.client_ip(peer, &h), Some("10.9.9.9".parse().unwrap()));
        assert_eq!(
            a.client_ip(peer, &HeaderMap::new()),
            Some("127.0.0.1".parse().unwrap())
        );

        // Believed only from the proxies named, a dual-stack one too.
        let a = MasterAuth::new(
            "secret",
            Vec::new(),
            Some("X-Real-IP"),
            vec!["127.0.0.1/32".parse().unwrap()],
        );
        assert_eq!(a.client_ip(peer, &h), Some("10.9.9.9".parse().unwrap()));
        let mapped = Some("[::ffff:127.0.0.1]:5".parse().unwrap());
        assert_eq!(a.client_ip(mapped, &h), Some("10.9.9.9".parse().unwrap()));
        let other = Some("192.0.2.1:5".parse().unwrap());
        assert_eq!(a.client_ip(other, &h), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(a.client_ip(None, &h), None);
    }
}
