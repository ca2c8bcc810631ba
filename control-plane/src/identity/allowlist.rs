//! Network allowlists: an API key's own, and its account's. A list is CIDR ranges; an empty
//! list allows every address. The account's list applies to signing in, to every session and
//! to every API key of the account, so an owner can keep the whole account behind a VPN or an
//! office's addresses. The address checked is the client's as the HTTPS edge resolved it
//! (behind `--trusted-proxies`, the forwarded one).

use std::net::IpAddr;

use ipnet::IpNet;

/// The longest list an account or a key may hold (the database checks it too).
pub const MAX_NETWORKS: usize = 64;

/// A list that cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAllowlist {
    /// An entry that is not an address or a CIDR range.
    #[error("{0:?} is not an address or CIDR network (e.g. 203.0.113.0/24 or 2001:db8::/48)")]
    NotANetwork(String),
    #[error("at most {MAX_NETWORKS} networks")]
    TooMany,
}

/// Checks and normalises a list as given by a person: each entry an address (taken as a
/// single host) or a CIDR range, stored in its canonical network form.
pub fn parse(entries: &[String]) -> Result<Vec<IpNet>, InvalidAllowlist> {
    if entries.len() > MAX_NETWORKS {
        return Err(InvalidAllowlist::TooMany);
    }
    entries
        .iter()
        .map(|e| {
            let e = e.trim();
            e.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| InvalidAllowlist::NotANetwork(e.chars().take(64).collect()))
        })
        .collect()
}

/// Reads a stored list. Entries were checked when stored; one that no longer parses allows
/// nothing rather than being skipped, so a damaged list never opens an account wider.
pub fn stored(entries: &[String]) -> Vec<Option<IpNet>> {
    entries.iter().map(|e| e.parse::<IpNet>().ok()).collect()
}

/// Whether `ip` may use what the list guards.
pub fn permits(list: &[Option<IpNet>], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    list.is_empty() || list.iter().flatten().any(|net| net.contains(&ip))
}

/// Whether `account`'s own allowlist lets `ip` in: for the routes that create a session or a
/// credential without an existing one (accepting an invitation, resetting a password).
pub async fn account_permits(
    client: &impl tokio_postgres::GenericClient,
    account: uuid::Uuid,
    ip: IpAddr,
) -> Result<bool, tokio_postgres::Error> {
    let networks: Vec<String> = client
        .query_opt(
            "SELECT ip_allowlist FROM accounts WHERE id = $1",
            &[&account],
        )
        .await?
        .map(|r| r.get("ip_allowlist"))
        .unwrap_or_default();
    Ok(permits(&stored(&networks), ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn lists_are_normalised_and_bounded() {
        let nets = parse(&[
            " 203.0.113.7/24 ".into(),
            "198.51.100.9".into(),
            "2001:db8::1/48".into(),
        ])
        .expect("valid");
        let text: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(text, ["203.0.113.0/24", "198.51.100.9/32", "2001:db8::/48"]);
        assert_eq!(
            parse(&["10.0.0.0/33".into()]),
            Err(InvalidAllowlist::NotANetwork("10.0.0.0/33".into()))
        );
        assert_eq!(
            parse(&["example.com".into()]),
            Err(InvalidAllowlist::NotANetwork("example.com".into()))
        );
        let many: Vec<String> = (0..=MAX_NETWORKS)
            .map(|i| format!("10.0.{i}.0/24"))
            .collect();
        assert_eq!(parse(&many), Err(InvalidAllowlist::TooMany));
    }

    #[test]
    fn an_empty_list_allows_all_and_a_damaged_entry_allows_nothing() {
        assert!(permits(&[], ip("192.0.2.1")));
        let list = stored(&["203.0.113.0/24".into()]);
        assert!(permits(&list, ip("203.0.113.200")));
        assert!(!permits(&list, ip("203.0.114.1")));
        // An IPv4 client seen through an IPv6 socket is still itself.
        assert!(permits(&list, ip("::ffff:203.0.113.5")));
        let damaged = stored(&["not a network".into()]);
        assert!(!permits(&damaged, ip("203.0.113.5")));
    }
}
