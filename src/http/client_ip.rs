//! The client's address: the TCP peer, unless the peer is one of
//! `server.trusted_proxies`; then the rightmost `X-Forwarded-For` entry that is
//! not a trusted proxy. Entries left of that are whatever the client sent and
//! are never believed, so a spoofed header gains nothing.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use super::state::AppState;

/// An address or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    network: IpAddr,
    prefix_len: u8,
}

impl Block {
    fn parse(text: &str) -> Option<Self> {
        let (addr, len) = match text.trim().split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text.trim(), None),
        };
        let network: IpAddr = addr.parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(len) => len.parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Self {
            network,
            prefix_len,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `server.trusted_proxies`, parsed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    blocks: Vec<Block>,
}

impl TrustedProxies {
    /// The error names the entry that is neither an address nor a CIDR block.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let blocks = entries
            .iter()
            .map(|e| {
                Block::parse(e).ok_or_else(|| format!("{e:?} is not an IP address or CIDR block"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { blocks })
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|b| b.contains(ip))
    }

    /// The client behind `peer`, given the request's `X-Forwarded-For` values
    /// in order. `None` without a peer (no socket, e.g. in-process tests).
    pub fn client_ip<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let mut client = peer?.to_canonical();
        if !self.trusts(client) {
            return Some(client);
        }
        let hops: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).collect();
        for hop in hops.iter().rev() {
            // Something unparseable was not written by a proxy we trust: stop at
            // the last address a trusted hop vouched for.
            let Some(ip) = parse_hop(hop) else {
                return Some(client);
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        Some(client)
    }
}

/// One `X-Forwarded-For` entry: an address, possibly bracketed or with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// The request's client address, when known. Never rejects.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        Ok(ClientIp(state.trusted_proxies.client_ip(peer, forwarded)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_match() {
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "0.0.0.0/0"]);
        assert!(p.trusts(ip("10.200.3.4")));
        assert!(
            p.trusts(ip("::ffff:10.1.1.1")),
            "IPv4-mapped peers count as IPv4"
        );
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]);
        assert!(!p.trusts(ip("11.0.0.1")));
        assert!(p.trusts(ip("192.168.1.7")) && !p.trusts(ip("192.168.1.8")));
        assert!(p.trusts(ip("2001:db8:ffff::1")) && !p.trusts(ip("2001:db9::1")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            let err = TrustedProxies::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_forward() {
        let p = proxies(&["10.0.0.0/8"]);
        let spoofed = ["1.2.3.4"];
        assert_eq!(
            p.client_ip(Some(ip("203.0.113.9")), spoofed.into_iter()),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(p.client_ip(None, spoofed.into_iter()), None);
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer = Some(ip("10.0.0.2"));
        // The client claimed 1.2.3.4; the proxies saw 198.51.100.7 and then 10.0.0.1.
        let xff = ["1.2.3.4, 198.51.100.7", "10.0.0.1"];
        assert_eq!(p.client_ip(peer, xff.into_iter()), Some(ip("198.51.100.7")));
        assert_eq!(
            p.client_ip(peer, ["[2001:db8::5]:4711"].into_iter()),
            Some(ip("2001:db8::5"))
        );
        assert_eq!(
            p.client_ip(peer, ["203.0.113.1:80"].into_iter()),
            Some(ip("203.0.113.1"))
        );
        // No header: the proxy itself is all there is.
        assert_eq!(p.client_ip(peer, [].into_iter()), Some(ip("10.0.0.2")));
        // Only trusted hops: the leftmost of them.
        assert_eq!(
            p.client_ip(peer, ["10.9.9.9, 10.0.0.1"].into_iter()),
            Some(ip("10.9.9.9"))
        );
        // Garbage where a trusted proxy should have written an address.
        assert_eq!(
            p.client_ip(peer, ["198.51.100.7, garbage"].into_iter()),
            Some(ip("10.0.0.2"))
        );
    }
}
