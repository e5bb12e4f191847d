//! Where the server may send requests on a tenant's behalf: the outgoing `wasi:http`
//! requests of its functions and its batches' report hooks.
//!
//! Three lists decide, and a destination must pass all of them:
//! - the **function's** `allowed_outbound_hosts` (set by the tenant);
//! - the **account's** egress policy (set by the admin: the most the account's
//!   functions may ask for; the admin account itself may go anywhere);
//! - the **operator's** [`EgressConfig`]: loopback, private, link-local, unique-local,
//!   unspecified, multicast and other non-public addresses (cloud metadata services
//!   among them) are refused unless a CIDR of `--allow-internal-outbound` allows them.
//!
//! Names are checked, then resolved, then every address is checked, and the caller
//! connects only to the addresses that passed ([`Egress::resolve`]): a DNS answer
//! that changes between the check and the connection (rebinding) cannot move a
//! request onto an internal address. Redirects are never followed by the server:
//! every hop is a new request, checked again.
//!
//! # Patterns
//! `*` (anywhere), `host` (any port), `host:port`, `*.domain` (its subdomains),
//! `*.domain:port`, an IP literal (`10.1.2.3`, `[::1]:8080`), or a CIDR block
//! (`203.0.113.0/24`, `2001:db8::/32`), which matches the resolved address whatever
//! the name. Case-insensitive.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// A block of addresses, `10.0.0.0/8` or `fd00::/8`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// True when `ip` is in the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
    /// is its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }

    /// True when every address of `other` is in this block.
    fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.net)
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (bytes, bits) = ((prefix / 8) as usize, prefix % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    bits == 0 || (a[bytes] ^ b[bytes]) >> (8 - bits) == 0
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address or a CIDR block (e.g. 10.0.0.0/8, fd00::/8)");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let net: IpAddr =
            addr.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        // `::ffff:10.0.0.0/104` is `10.0.0.0/8`, as addresses are compared canonical.
        Ok(match (net, net.to_canonical()) {
            (IpAddr::V6(_), IpAddr::V4(v4)) if prefix >= 96 => {
                Cidr { net: IpAddr::V4(v4), prefix: prefix - 96 }
            }
            _ => Cidr { net, prefix },
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// True for an address that is not a public internet destination: loopback,
/// unspecified, private (RFC 1918), shared (CGNAT, where some clouds put their
/// metadata service), link-local (169.254.169.254 is there), unique-local (fd00:ec2::254
/// is there), multicast, broadcast, documentation, benchmarking and reserved blocks,
/// and IPv6 forms that carry such an IPv4 address (mapped, NAT64, 6to4).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space, RFC 6598
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| {
        is_internal_v4(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8))
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] == 0) // Teredo: tunnels to anywhere
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard
        || s[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] && embedded_v4(s[6], s[7]))
        || (s[0] == 0x2002 && embedded_v4(s[1], s[2])) // 6to4
}

/// The operator's egress settings (`--allow-internal-outbound`). One per process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressConfig {
    /// Internal addresses that requests may reach all the same.
    pub allow_internal: Vec<Cidr>,
}

impl EgressConfig {
    /// Parses a comma-separated list of CIDR blocks.
    pub fn parse_internal(list: &str) -> Result<EgressConfig, String> {
        let allow_internal = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Cidr::from_str)
            .collect::<Result<_, _>>()?;
        Ok(EgressConfig { allow_internal })
    }

    /// True when a request may be sent to `ip` as far as the operator is concerned.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allow_internal.iter().any(|c| c.contains(ip))
    }
}

/// One destination pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    /// A name or an IP literal (without brackets), lowercase.
    Host {
        host: String,
        port: Option<u16>,
    },
    /// `*.domain`: `domain` lowercase, without the `*.`.
    Subdomains {
        domain: String,
        port: Option<u16>,
    },
    Block(Cidr),
}

impl Pattern {
    fn parse(p: &str) -> Result<Pattern, String> {
        let bad = || {
            format!(
                "{p:?} is not a destination: use `host`, `host:port`, `*.domain`, `*`, an IP address or a CIDR block"
            )
        };
        let p = p.trim().to_ascii_lowercase();
        if p.is_empty() || p.len() > 260 {
            return Err(bad());
        }
        if p == "*" {
            return Ok(Pattern::Any);
        }
        if p.contains('/') {
            return Cidr::from_str(&p).map(Pattern::Block).map_err(|_| bad());
        }
        // `[::1]:8080`, `[::1]`, `::1`, `example.com:8080`, `example.com`.
        let (host, port) = if let Some(rest) = p.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                _ => Some(
                    after.strip_prefix(':').ok_or_else(bad)?.parse::<u16>().map_err(|_| bad())?,
                ),
            };
            (h.to_string(), port)
        } else if p.parse::<Ipv6Addr>().is_ok() {
            (p.clone(), None)
        } else {
            match p.rsplit_once(':') {
                Some((h, port)) => (h.to_string(), Some(port.parse::<u16>().map_err(|_| bad())?)),
                None => (p.clone(), None),
            }
        };
        if host.contains(':') && host.parse::<Ipv6Addr>().is_err() {
            return Err(bad());
        }
        let name_ok = |h: &str| {
            !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        };
        match host.strip_prefix("*.") {
            Some(domain) if name_ok(domain) && !domain.contains(':') => {
                Ok(Pattern::Subdomains { domain: domain.to_string(), port })
            }
            Some(_) => Err(bad()),
            None if name_ok(&host) => Ok(Pattern::Host { host, port }),
            None => Err(bad()),
        }
    }

    /// True when a request to `host:port` might match before it is resolved.
    fn may_match(&self, host: &str, port: u16) -> bool {
        match self {
            Pattern::Block(_) => true,
            _ => self.matches_name(host, port),
        }
    }

    fn matches_name(&self, host: &str, port: u16) -> bool {
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        match self {
            Pattern::Any => true,
            Pattern::Host { host: h, port: p } => h == host && port_ok(p),
            Pattern::Subdomains { domain, port: p } => {
                host.len() > domain.len() + 1
                    && host.ends_with(domain.as_str())
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                    && port_ok(p)
            }
            Pattern::Block(_) => false,
        }
    }

    fn matches(&self, host: &str, port: u16, ip: IpAddr) -> bool {
        match self {
            Pattern::Block(c) => c.contains(ip),
            _ => self.matches_name(host, port),
        }
    }

    /// True when every destination `other` matches, this matches too.
    fn covers(&self, other: &Pattern) -> bool {
        let port_covers =
            |mine: &Option<u16>, theirs: &Option<u16>| mine.is_none() || mine == theirs;
        match (self, other) {
            (Pattern::Any, _) => true,
            (_, Pattern::Any) => false,
            (Pattern::Block(a), Pattern::Block(b)) => a.covers(b),
            (Pattern::Block(a), Pattern::Host { host, .. }) => {
                host.parse::<IpAddr>().is_ok_and(|ip| a.contains(ip))
            }
            (Pattern::Host { host: a, port: pa }, Pattern::Host { host: b, port: pb }) => {
                a == b && port_covers(pa, pb)
            }
            (Pattern::Subdomains { domain, port: pa }, Pattern::Host { host, port: pb }) => {
                Pattern::Subdomains { domain: domain.clone(), port: None }.matches_name(host, 0)
                    && port_covers(pa, pb)
            }
            (
                Pattern::Subdomains { domain: a, port: pa },
                Pattern::Subdomains { domain: b, port: pb },
            ) => (a == b || b.ends_with(&format!(".{a}"))) && port_covers(pa, pb),
            _ => false,
        }
    }
}

/// Checks that `pattern` is a well-formed destination pattern.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    Pattern::parse(pattern).map(|_| ())
}

/// The patterns of `wanted` that no pattern of `granted` covers: what a function asks
/// for beyond its account's egress policy.
pub fn not_covered<'a>(granted: &[String], wanted: &'a [String]) -> Vec<&'a str> {
    let granted: Vec<Pattern> = granted.iter().filter_map(|p| Pattern::parse(p).ok()).collect();
    wanted
        .iter()
        .filter(|w| match Pattern::parse(w) {
            Ok(w) => !granted.iter().any(|g| g.covers(&w)),
            Err(_) => true,
        })
        .map(String::as_str)
        .collect()
}

/// Why a destination was refused.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{host}:{port} is not an allowed destination")]
    NotAllowed { host: String, port: u16 },
    #[error("{host} resolves to {ip}, an internal address the server does not send requests to")]
    Internal { host: String, ip: IpAddr },
    #[error("cannot resolve {host}: {message}")]
    Dns { host: String, message: String },
}

/// The destinations of one tenant's requests: the function's patterns (or none for a
/// hook), the account's, the operator's. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Egress {
    function: Option<Arc<[Pattern]>>,
    account: Arc<[Pattern]>,
    config: Arc<EgressConfig>,
}

impl Default for Egress {
    /// Nowhere.
    fn default() -> Egress {
        Egress { function: Some(Arc::new([])), account: Arc::new([]), config: Arc::default() }
    }
}

fn parse_all(patterns: &[String]) -> Arc<[Pattern]> {
    // Patterns were checked when they were set; one that does not parse allows nothing.
    patterns.iter().filter_map(|p| Pattern::parse(p).ok()).collect()
}

impl Egress {
    /// A function's requests: `function` is its `allowed_outbound_hosts`, `account`
    /// its account's policy.
    pub fn for_function(
        function: &[String],
        account: &[String],
        config: Arc<EgressConfig>,
    ) -> Egress {
        Egress { function: Some(parse_all(function)), account: parse_all(account), config }
    }

    /// Requests the server sends for an account (a batch's report hook): only the
    /// account's policy and the operator's settings apply.
    pub fn for_account(account: &[String], config: Arc<EgressConfig>) -> Egress {
        Egress { function: None, account: parse_all(account), config }
    }

    /// The addresses a request to `host:port` may connect to, in resolver order; an
    /// error when there is none. `host` is a name or an IP literal (IPv6 with or
    /// without brackets). Connect only to what this returns.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        let host = self.pre_check(host, port)?;
        let ips: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| EgressError::Dns { host: host.clone(), message: e.to_string() })?
                .map(|a| a.ip())
                .collect(),
        };
        self.filter(host, port, ips)
    }

    /// The checks that need no DNS (for an early answer, e.g. when a hook is set): the
    /// name against the lists, and an IP literal against everything.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), EgressError> {
        let host = self.pre_check(host, port)?;
        match host.parse::<IpAddr>() {
            Ok(ip) => self.filter(host, port, vec![ip]).map(|_| ()),
            Err(_) => Ok(()),
        }
    }

    /// `host` normalised (lowercase, no brackets, no trailing dot), if some pattern of
    /// every list may match it.
    fn pre_check(&self, host: &str, port: u16) -> Result<String, EgressError> {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host).to_string();
        if !self.lists().all(|l| l.iter().any(|p| p.may_match(&host, port))) {
            return Err(EgressError::NotAllowed { host, port });
        }
        Ok(host)
    }

    fn lists(&self) -> impl Iterator<Item = &[Pattern]> {
        self.function.iter().map(|f| &**f).chain([&*self.account])
    }

    /// The addresses among `ips` that every list and the operator allow.
    fn filter(
        &self,
        host: String,
        port: u16,
        ips: Vec<IpAddr>,
    ) -> Result<Vec<SocketAddr>, EgressError> {
        let not_allowed = || EgressError::NotAllowed { host: host.clone(), port };
        let lists = || self.lists();
        let mut internal = None;
        let mut out = Vec::new();
        for ip in ips {
            if !lists().all(|l| l.iter().any(|p| p.matches(&host, port, ip))) {
                continue;
            }
            if !self.config.permits(ip) {
                internal.get_or_insert(ip);
                continue;
            }
            let addr = SocketAddr::new(ip.to_canonical(), port);
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        match (out.is_empty(), internal) {
            (false, _) => Ok(out),
            (true, Some(ip)) => Err(EgressError::Internal { host, ip }),
            (true, None) => Err(not_allowed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_recognised_in_every_form() {
        for internal in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(is_internal(ip(internal)), "{internal}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_internal(ip(public)), "{public}");
        }
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        assert!(cidr("127.0.0.0/8").contains(ip("127.1.2.3")));
        assert!(!cidr("127.0.0.0/8").contains(ip("128.0.0.1")));
        assert!(cidr("10.0.0.1").contains(ip("10.0.0.1")));
        assert!(!cidr("10.0.0.1").contains(ip("10.0.0.2")));
        assert!(cidr("172.16.0.0/12").contains(ip("172.31.255.255")));
        assert!(!cidr("172.16.0.0/12").contains(ip("172.32.0.0")));
        assert!(cidr("127.0.0.1/32").contains(ip("::ffff:127.0.0.1")));
        assert!(cidr("::1/128").contains(ip("::1")));
        assert!(cidr("fd00::/8").contains(ip("fd12::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::2")));
        for bad in ["", "10.0.0.0/33", "::/129", "localhost", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let c = EgressConfig::parse_internal("127.0.0.1/32, fd00::/8").unwrap();
        assert!(c.permits(ip("127.0.0.1")) && !c.permits(ip("127.0.0.2")));
        assert!(c.permits(ip("8.8.8.8")));
        assert!(EgressConfig::parse_internal("nope").is_err());
    }

    #[test]
    fn patterns_match_by_name_port_wildcard_and_block() {
        let m = |p: &str, host: &str, port: u16, addr: &str| {
            Pattern::parse(p).unwrap().matches(host, port, ip(addr))
        };
        assert!(m("*", "example.com", 80, "1.2.3.4"));
        assert!(m("example.com", "example.com", 8080, "1.2.3.4"));
        assert!(m("EXAMPLE.com:443", "example.com", 443, "1.2.3.4"));
        assert!(!m("example.com:443", "example.com", 80, "1.2.3.4"));
        assert!(m("*.example.com", "api.example.com", 80, "1.2.3.4"));
        assert!(!m("*.example.com", "example.com", 80, "1.2.3.4"));
        assert!(!m("*.example.com", "evilexample.com", 80, "1.2.3.4"));
        assert!(m("[::1]:8080", "::1", 8080, "::1"));
        assert!(m("::1", "::1", 9, "::1"));
        assert!(m("203.0.113.0/24", "any.name", 1, "203.0.113.9"));
        assert!(!m("203.0.113.0/24", "any.name", 1, "203.0.114.9"));
        for bad in ["", "a b", "*.", "host:port", "[::1", "1:2:3", "*.a:b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_function_may_ask_only_for_what_its_account_was_granted() {
        let granted: Vec<String> = ["*.example.com", "api.other.org:443", "203.0.113.0/24"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let wanted: Vec<String> = [
            "a.example.com",
            "*.b.example.com:8443",
            "api.other.org:443",
            "api.other.org",
            "203.0.113.7",
            "203.0.113.0/25",
            "*",
            "example.com",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(not_covered(&granted, &wanted), ["api.other.org", "*", "example.com"]);
        assert!(not_covered(&["*".into()], &wanted).is_empty());
        assert_eq!(not_covered(&[], &wanted).len(), wanted.len());
    }

    #[tokio::test]
    async fn names_are_resolved_then_each_address_checked() {
        let any = ["*".to_string()];
        let open = Egress::for_function(&any, &any, Arc::default());
        // `localhost` is a name that resolves to loopback: refused after resolving.
        match open.resolve("localhost", 80).await {
            Err(EgressError::Internal { ip, .. }) => assert!(ip.is_loopback()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            open.resolve("169.254.169.254", 80).await,
            Err(EgressError::Internal { .. })
        ));
        assert!(matches!(open.resolve("[::1]", 80).await, Err(EgressError::Internal { .. })));
        let operator = Arc::new(EgressConfig::parse_internal("127.0.0.1/32").unwrap());
        let allowed = Egress::for_function(&any, &any, operator.clone());
        assert_eq!(
            allowed.resolve("127.0.0.1", 8080).await.unwrap(),
            ["127.0.0.1:8080".parse().unwrap()]
        );
        // The account's policy bounds the function's list.
        let narrow = Egress::for_function(&any, &["example.com".into()], operator.clone());
        assert!(matches!(
            narrow.resolve("127.0.0.1", 8080).await,
            Err(EgressError::NotAllowed { .. })
        ));
        let hook = Egress::for_account(&[], operator);
        assert!(matches!(hook.resolve("127.0.0.1", 80).await, Err(EgressError::NotAllowed { .. })));
        assert!(Egress::default().resolve("127.0.0.1", 80).await.is_err());
    }
}
