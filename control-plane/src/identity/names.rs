//! The two names a person types to get in: an email address and an account name, checked
//! and normalised once, the same way for a signup, an invitation and `create-owner`.

/// Longest email address accepted (RFC 5321's path limit less the brackets).
const MAX_EMAIL: usize = 254;
/// Longest account name, in characters.
const MAX_ACCOUNT_NAME: usize = 200;

/// An email address that does not look like one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("email must look like name@example.com (at most 254 characters)")]
pub struct InvalidEmail;

/// An account name that is empty or too long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an account name must be 1 to 200 characters")]
pub struct InvalidAccountName;

/// An email address as stored: trimmed, with a local part and a dotted domain, no spaces or
/// control characters.
pub fn normalise_email(email: &str) -> Result<String, InvalidEmail> {
    let email = email.trim();
    let valid = email.len() <= MAX_EMAIL
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
    if valid {
        Ok(email.to_owned())
    } else {
        Err(InvalidEmail)
    }
}

/// An account name as stored: trimmed, 1 to 200 characters.
pub fn account_name(name: &str) -> Result<String, InvalidAccountName> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_ACCOUNT_NAME {
        return Err(InvalidAccountName);
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(normalise_email("  a@b.example "), Ok("a@b.example".into()));
        for bad in [
            "",
            "a",
            "@b.example",
            "a@b",
            "a b@c.example",
            "a\u{7}@b.example",
        ] {
            assert_eq!(normalise_email(bad), Err(InvalidEmail), "{bad:?}");
        }
        let long = format!("{}@b.example", "a".repeat(MAX_EMAIL));
        assert_eq!(normalise_email(&long), Err(InvalidEmail));
        assert_eq!(account_name(" Ops "), Ok("Ops".into()));
        assert_eq!(account_name("   "), Err(InvalidAccountName));
        assert_eq!(account_name(&"é".repeat(200)), Ok("é".repeat(200)));
        assert_eq!(account_name(&"é".repeat(201)), Err(InvalidAccountName));
    }
}
