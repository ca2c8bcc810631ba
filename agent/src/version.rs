//! The agent's own version, and the stamp that the packaging step writes into the binary.
//!
//! A package's version is chosen when the package is made (`build-repo.sh --version
//! 0.1.1-1`), after the binary was compiled. Rather than compiling again for every version
//! (slow), the binary carries a fixed-size field, [`STAMP_FIELD_LEN`] bytes after a marker,
//! all zero when compiled; `sensei-agent stamp-version` writes a copy of the binary with the
//! package's upstream version in that field. The version is then a property of the file
//! that the package installs (its checksum covers it), read by `sensei-agent --version`, the
//! hello and `status` alike; nothing at run time (no variable, no flag) can change it. An
//! unstamped binary reports the version it was compiled as.

/// What precedes the field in the binary. Only ever used at compile time (to build
/// [`STAMP`]); the search for it starts from [`REVERSED_MARKER`], so that the marker occurs
/// exactly once in the executable: in [`STAMP`].
const MARKER: &[u8; 28] = b"\0SENSEI-AGENT-VERSION-STAMP\0";
const REVERSED_MARKER: &[u8; 28] = b"\0PMATS-NOISREV-TNEGA-IESNES\0";
/// The field's size: a NUL-padded upstream version
/// (`sensei_shared::upgrade::MAX_PACKAGE_VERSION_LEN` at most).
pub const STAMP_FIELD_LEN: usize = 64;
const STAMP_LEN: usize = 28 + STAMP_FIELD_LEN;

/// The marker and the empty field, as compiled.
const fn unstamped() -> [u8; STAMP_LEN] {
    let mut stamp = [0u8; STAMP_LEN];
    let mut i = 0;
    while i < MARKER.len() {
        stamp[i] = MARKER[i];
        i += 1;
    }
    stamp
}

#[used]
static STAMP: [u8; STAMP_LEN] = unstamped();

/// This agent's version, as reported to the control plane and shown by `--version`: the
/// stamped one if the binary was stamped, else the version it was compiled as.
pub fn current() -> &'static str {
    // Read through `black_box`: the compiler must not fold the (all-zero) field it compiled,
    // since the stamp changes the bytes in the file afterwards.
    let stamp: &'static [u8; STAMP_LEN] = std::hint::black_box(&STAMP);
    let field = &stamp[MARKER.len()..];
    let len = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    match std::str::from_utf8(&field[..len]) {
        Ok(v) if !v.is_empty() && sensei_shared::upgrade::check_package_version(v).is_ok() => v,
        _ => env!("CARGO_PKG_VERSION"),
    }
}

/// Why a binary could not be stamped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StampError {
    #[error("invalid version: {0}")]
    Version(#[from] sensei_shared::upgrade::VersionError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0} is not a sensei-agent binary with one version stamp (found {1})")]
    NoStamp(String, usize),
}

/// Writes to `output` a copy of the agent binary `input` stamped with the upstream part of
/// the package version `version` (`0.1.1-1` stamps `0.1.1`, what the Hello then reports).
/// Refuses a binary without exactly one stamp field.
pub fn stamp_file(
    input: &std::path::Path,
    output: &std::path::Path,
    version: &str,
) -> Result<(), StampError> {
    sensei_shared::upgrade::check_package_version(version)?;
    let upstream = sensei_shared::upgrade::upstream_version(version);
    let mut bytes = std::fs::read(input)?;
    // The needle is built at run time from its reverse, so it is not a second copy of the
    // marker in this very binary.
    let needle: Vec<u8> = REVERSED_MARKER.iter().rev().copied().collect();
    let found: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_slice())
        .map(|(i, _)| i)
        .collect();
    let [at] = found[..] else {
        return Err(StampError::NoStamp(
            input.display().to_string(),
            found.len(),
        ));
    };
    let field = at + needle.len();
    let Some(slot) = bytes.get_mut(field..field + STAMP_FIELD_LEN) else {
        return Err(StampError::NoStamp(input.display().to_string(), 0));
    };
    slot.fill(0);
    slot[..upstream.len()].copy_from_slice(upstream.as_bytes());
    let tmp = output.with_extension("stamping");
    std::fs::write(&tmp, &bytes)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&tmp, output)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reversed_marker_is_the_marker_reversed() {
        let back: Vec<u8> = REVERSED_MARKER.iter().rev().copied().collect();
        assert_eq!(back, MARKER);
    }

    #[test]
    fn an_unstamped_build_reports_its_compiled_version() {
        assert_eq!(current(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn stamping_writes_the_upstream_version_into_the_field_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("bin");
        let mut fake = b"some code".to_vec();
        fake.extend_from_slice(&unstamped());
        fake.extend_from_slice(b"more code");
        std::fs::write(&input, &fake).expect("write");
        let output = dir.path().join("stamped");
        stamp_file(&input, &output, "1:0.2.0-3").expect("stamp");
        let stamped = std::fs::read(&output).expect("read");
        assert_eq!(stamped.len(), fake.len());
        let at = 9 + MARKER.len();
        assert_eq!(&stamped[at..at + 5], b"0.2.0");
        assert!(stamped[at + 5..at + STAMP_FIELD_LEN]
            .iter()
            .all(|b| *b == 0));
        // Stamping again replaces the field (no leftover of a longer version).
        stamp_file(&output, &output, "0.3-1").expect("restamp");
        let again = std::fs::read(&output).expect("read");
        assert_eq!(&again[at..at + 4], b"0.3\0");

        assert!(matches!(
            stamp_file(&input, &output, "0.2.0; rm -rf /"),
            Err(StampError::Version(_))
        ));
        std::fs::write(&input, b"no stamp here").expect("write");
        assert!(matches!(
            stamp_file(&input, &output, "0.2.0-1"),
            Err(StampError::NoStamp(_, 0))
        ));
    }
}
