//! Where a tenant's configuration may make the control plane connect: SSH targets, audit
//! sinks and single sign-on providers name hosts that tenants choose, so every such
//! connection resolves the name here, checks each address, and connects only to an address
//! that passed (no second lookup that could answer differently).

use std::net::SocketAddr;
use std::time::Duration;

/// Which addresses a tenant's host may not resolve to: a tenant must not be able to point the
/// control plane at the cloud metadata service, or at the control plane itself.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    pub denied_networks: Vec<ipnet::IpNet>,
    /// The control plane's own listening addresses (an unspecified address stands for every
    /// local one on that port).
    pub own: Vec<SocketAddr>,
}

/// The networks denied by default: IPv4 and IPv6 link-local and the other addresses cloud
/// metadata services answer on, and "this host" (0.0.0.0/8, ::), which reaches localhost.
pub fn default_denied_networks() -> Vec<ipnet::IpNet> {
    [
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "100.100.100.200/32",
        "0.0.0.0/8",
        "::/128",
    ]
    .iter()
    .filter_map(|n| n.parse().ok())
    .collect()
}

/// Why a tenant's host cannot be connected to.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    #[error("cannot resolve {0}")]
    Unresolved(String),
    /// Said no more precisely: the tenant learns nothing about what is denied or why.
    #[error("{0} is unreachable")]
    Denied(String),
}

impl TargetPolicy {
    /// Whether connecting to `addr` is allowed.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        if self.denied_networks.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        !self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip().to_canonical() == ip
                    || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified())))
        })
    }

    /// Resolves `host` (a name or an address literal) and answers the addresses this policy
    /// allows, or why there are none.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        within: Duration,
    ) -> Result<Vec<SocketAddr>, EgressError> {
        // An IPv6 literal may come bracketed (as in a URL).
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let resolved: Vec<SocketAddr> =
            match tokio::time::timeout(within, tokio::net::lookup_host((bare, port))).await {
                Ok(Ok(addrs)) => addrs.collect(),
                _ => return Err(EgressError::Unresolved(host.to_owned())),
            };
        if resolved.is_empty() {
            return Err(EgressError::Unresolved(host.to_owned()));
        }
        let allowed: Vec<SocketAddr> = resolved.into_iter().filter(|a| self.allows(*a)).collect();
        if allowed.is_empty() {
            return Err(EgressError::Denied(format!("{host}:{port}")));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_the_control_planes_own_listeners_are_not_targets() {
        let policy = TargetPolicy {
            denied_networks: default_denied_networks(),
            own: vec![
                "127.0.0.1:8443".parse().expect("addr"),
                "0.0.0.0:7443".parse().expect("addr"),
            ],
        };
        let allows = |a: &str| policy.allows(a.parse().expect("addr"));
        assert!(!allows("169.254.169.254:22"));
        assert!(!allows("[fe80::1]:22"));
        assert!(
            !allows("[::ffff:169.254.169.254]:22"),
            "mapped IPv4 is IPv4"
        );
        assert!(!allows("0.0.0.0:8443"), "0.0.0.0 reaches this host");
        assert!(!allows("[fd00:ec2::254]:80"));
        assert!(!allows("127.0.0.1:8443"));
        assert!(
            !allows("127.0.0.1:7443"),
            "an unspecified listener covers loopback"
        );
        assert!(allows("127.0.0.1:22"));
        assert!(allows("192.0.2.10:22"));
    }

    #[tokio::test]
    async fn a_name_is_checked_address_by_address() {
        let policy = TargetPolicy {
            denied_networks: default_denied_networks(),
            own: vec!["127.0.0.1:8443".parse().expect("addr")],
        };
        let within = Duration::from_secs(2);
        assert_eq!(
            policy.resolve("127.0.0.1", 8443, within).await,
            Err(EgressError::Denied("127.0.0.1:8443".into()))
        );
        assert_eq!(
            policy.resolve("169.254.169.254", 80, within).await,
            Err(EgressError::Denied("169.254.169.254:80".into()))
        );
        assert_eq!(
            policy.resolve("[::1]", 6514, within).await,
            Ok(vec!["[::1]:6514".parse().expect("addr")])
        );
    }
}
