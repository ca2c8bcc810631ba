//! The agent's identity on disk, in its state directory (default `/var/lib/sensei-agent`,
//! mode 0700):
//!
//! | file | content |
//! | --- | --- |
//! | `identity.key` | the private key (0600); made here, never sent anywhere |
//! | `identity.crt` | the certificate the control plane's CA issued for this server |
//! | `ca.crt` | the control plane's CA certificates this agent pins: the one pinned at enrollment, and any a pinned one endorsed during a CA rotation |
//! | `agent.json` | server id, control plane address, pinned CA fingerprint and job-signing keys (the one from enrollment, and any a pinned one endorsed during a job-key rotation) |
//! | `identity.next` | only during a renewal: the new key and certificate together |
//!
//! A renewed key and certificate are first written together to `identity.next`, then copied
//! over `identity.key` and `identity.crt`, then `identity.next` goes. While it exists it is the
//! identity, so a crash between the two copies never pairs a key with another key's
//! certificate.
//!
//! Files are written to a new temporary file with an unpredictable name (created with
//! `O_EXCL | O_NOFOLLOW`, so nothing planted in the directory is ever opened or followed),
//! synced, and renamed into place, so a crash never leaves a half-written identity and a
//! symlink planted under any name cannot turn `sudo sensei-agent enroll` into a write
//! elsewhere.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sensei_shared::job_key::JobKeySet;
use sensei_shared::protocol::JobResult;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sensei-agent";

const KEY: &str = "identity.key";
const CERT: &str = "identity.crt";
const CA: &str = "ca.crt";
const META: &str = "agent.json";
/// A renewed key and certificate, while they replace the current ones.
const NEXT: &str = "identity.next";
/// The highest job sequence number run; survives restarts so that a replayed job is refused.
const SEQUENCE: &str = "sequence";
/// A finished job's result not yet acknowledged by the control plane.
const PENDING: &str = "pending-result.json";
/// The upgrade a pending result is for: triggered once that result is recorded, on whichever
/// connection that happens.
const PENDING_UPGRADE: &str = "pending-upgrade.json";
/// What the running agent last said about itself (`sensei-agent status`).
const STATUS: &str = "status.json";

/// What `agent.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityMeta {
    pub server_id: Uuid,
    /// `HOST:PORT` of the control plane's agent gateway.
    pub control_plane: String,
    /// The CA fingerprint pinned at enrollment.
    pub ca_fingerprint: String,
    /// Hex of the Ed25519 key that signs deploy jobs: the one pinned at enrollment, and
    /// after a job-key rotation the newest pinned one (what an older agent reads).
    pub job_signing_public_key: String,
    pub agent_version: String,
    /// Hex of every job-signing key pinned, oldest first, once a job-key rotation added or
    /// removed one; empty until then (the set is `job_signing_public_key` alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_signing_keys: Vec<String>,
}

impl IdentityMeta {
    /// The pinned job-signing keys, or why they do not read.
    pub fn job_keys(&self) -> Result<JobKeySet, String> {
        let listed: Vec<&String> = if self.job_signing_keys.is_empty() {
            vec![&self.job_signing_public_key]
        } else {
            self.job_signing_keys.iter().collect()
        };
        let raw = listed
            .iter()
            .map(|hex_key| {
                hex::decode(hex_key)
                    .ok()
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    .ok_or_else(|| format!("{META}: a pinned job-signing key is unreadable"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        JobKeySet::new(&raw).map_err(|e| format!("{META}: {e}"))
    }
}

/// What `identity.next` holds: a renewed key and its certificate, together.
#[derive(Serialize, Deserialize)]
struct RenewedPair {
    key_pem: String,
    cert_pem: String,
}

/// A complete identity.
#[derive(Clone)]
pub struct Identity {
    pub meta: IdentityMeta,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// Why the identity could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error(
        "this server has no agent identity in {0}: enroll it first with \
         `sensei-agent enroll --control-plane HOST:PORT --token … --ca-fingerprint SHA256:…`"
    )]
    Missing(String),
    #[error("the agent identity in {dir} is damaged ({detail}); revoke it and enroll again")]
    Corrupt { dir: String, detail: String },
    #[error("state directory {dir}: {message}")]
    Io { dir: String, message: String },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn io(&self, e: std::io::Error) -> IdentityError {
        IdentityError::Io {
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Whether any identity file is present.
    pub fn has_identity(&self) -> bool {
        [KEY, CERT, CA, META]
            .iter()
            .any(|f| self.dir.join(f).exists())
    }

    pub fn load(&self) -> Result<Identity, IdentityError> {
        if !self.has_identity() {
            return Err(IdentityError::Missing(self.dir.display().to_string()));
        }
        let corrupt = |detail: String| IdentityError::Corrupt {
            dir: self.dir.display().to_string(),
            detail,
        };
        let read = |name: &str| {
            fs::read_to_string(self.dir.join(name)).map_err(|e| corrupt(format!("{name}: {e}")))
        };
        let meta: IdentityMeta =
            serde_json::from_str(&read(META)?).map_err(|e| corrupt(format!("{META}: {e}")))?;
        // A renewal interrupted half-way: the pair written whole is the identity.
        let (key_pem, cert_pem) = match self.renewed_pair() {
            Some(pair) => (pair.key_pem, pair.cert_pem),
            None => (read(KEY)?, read(CERT)?),
        };
        Ok(Identity {
            meta,
            key_pem,
            cert_pem,
            ca_pem: read(CA)?,
        })
    }

    /// The pair a renewal is installing, if one is under way. Written whole by [`Self::write`]
    /// (a rename), so it is either complete or absent; anything else there is ignored.
    fn renewed_pair(&self) -> Option<RenewedPair> {
        let text = fs::read_to_string(self.dir.join(NEXT)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Replaces the key and certificate with a renewed pair, so that no crash leaves a key
    /// with a certificate for another key: the pair is written as one file first, then copied
    /// into place, then that file goes. The pair is used from the next connection on.
    pub fn store_renewed(&self, key_pem: &str, cert_pem: &str) -> Result<(), IdentityError> {
        let pair = serde_json::to_string(&RenewedPair {
            key_pem: key_pem.to_owned(),
            cert_pem: cert_pem.to_owned(),
        })
        .map_err(|e| IdentityError::Io {
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        })?;
        self.write(NEXT, &pair)?;
        self.write(KEY, key_pem)?;
        self.write(CERT, cert_pem)?;
        self.remove(NEXT)
    }

    /// Adds `ca_pem` (one certificate, whose endorsement by a pinned CA was checked) to the
    /// pinned CAs, with the same safe write as everything else: the whole file is replaced
    /// at once, so a crash leaves the old set or the new one.
    pub fn pin_ca(&self, ca_pem: &str) -> Result<(), IdentityError> {
        let pinned = fs::read_to_string(self.dir.join(CA)).map_err(|e| self.io(e))?;
        let mut next = pinned.trim_end().to_owned();
        next.push('\n');
        next.push_str(ca_pem);
        self.write(CA, &next)
    }

    /// The job-signing keys this agent pins. Fails closed: a key that does not read is an
    /// error, never a smaller set.
    pub fn job_keys(&self) -> Result<JobKeySet, IdentityError> {
        let meta = self.load()?.meta;
        meta.job_keys().map_err(|detail| IdentityError::Corrupt {
            dir: self.dir.display().to_string(),
            detail,
        })
    }

    /// Replaces the pinned job-signing keys with `keys` (one endorsed by a pinned key added,
    /// or retired ones removed), with the same safe write as everything else: `agent.json` is
    /// replaced whole.
    pub fn store_job_keys(&self, keys: &JobKeySet) -> Result<(), IdentityError> {
        let mut meta = self.load()?.meta;
        meta.job_signing_keys = keys.raw().iter().map(hex::encode).collect();
        meta.job_signing_public_key = hex::encode(keys.newest().as_bytes());
        let text = serde_json::to_string_pretty(&meta).map_err(|e| IdentityError::Io {
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        })?;
        self.write(META, &text)
    }

    /// Replaces the pinned CAs with `cas_pem` (a subset of them, after a CA rotation was
    /// retired), with the same safe write.
    pub fn replace_pinned_cas(&self, cas_pem: &str) -> Result<(), IdentityError> {
        self.write(CA, cas_pem)
    }

    fn remove(&self, name: &str) -> Result<(), IdentityError> {
        match fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(e)),
            _ => Ok(()),
        }
    }

    /// Writes an identity, replacing any earlier one.
    pub fn save(&self, identity: &Identity) -> Result<(), IdentityError> {
        fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| self.io(e))?;
        let meta = serde_json::to_string_pretty(&identity.meta).map_err(|e| IdentityError::Io {
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        })?;
        // Another server's identity replaces this one (a re-used state directory): that
        // server's job sequence and unreported result mean nothing for this one, and its
        // sequence floor would refuse the new server's first jobs as replays. (Re-enrolling
        // the same server keeps both: its sequence numbers keep rising.)
        let previous = self.load().ok().map(|old| old.meta.server_id);
        if previous.is_some_and(|id| id != identity.meta.server_id) {
            for stale in [SEQUENCE, PENDING] {
                match fs::remove_file(self.dir.join(stale)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.io(e)),
                    _ => {}
                }
            }
        }
        // An enrollment replaces whatever a renewal was installing.
        self.remove(NEXT)?;
        // The key first: an identity with a certificate but no key would be useless.
        self.write(KEY, &identity.key_pem)?;
        self.write(CERT, &identity.cert_pem)?;
        self.write(CA, &identity.ca_pem)?;
        self.write(META, &meta)?;
        Ok(())
    }

    fn write(&self, name: &str, content: &str) -> Result<(), IdentityError> {
        let tmp = self.dir.join(format!(
            ".{name}.{}.tmp",
            hex::encode(rand::random::<[u8; 12]>())
        ));
        let result = self.write_new(&tmp, content).and_then(|()| {
            fs::rename(&tmp, self.dir.join(name)).map_err(|e| self.io(e))?;
            // The rename itself must survive a crash too.
            fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(e))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Creates `path`, which must not exist (not even as a dangling symlink), and writes it.
    fn write_new(&self, path: &Path, content: &str) -> Result<(), IdentityError> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(path)
            .map_err(|e| self.io(e))?;
        self.give_to_dir_owner(&file)?;
        file.write_all(content.as_bytes()).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))
    }

    /// Root writing into a directory that belongs to the service user (`sudo sensei-agent
    /// enroll` after the package made `/var/lib/sensei-agent` for `sensei-agent`) hands the
    /// file to that user, so the service, which runs as that user, can read its own key.
    fn give_to_dir_owner(&self, file: &fs::File) -> Result<(), IdentityError> {
        use std::os::unix::fs::MetadataExt;
        // A file just created belongs to our effective user.
        let ours = file.metadata().map_err(|e| self.io(e))?;
        let dir = fs::metadata(&self.dir).map_err(|e| self.io(e))?;
        if ours.uid() != 0 || dir.uid() == 0 {
            return Ok(());
        }
        std::os::unix::fs::fchown(file, Some(dir.uid()), Some(dir.gid())).map_err(|e| self.io(e))
    }

    /// The highest job sequence number this agent has started (0: none yet). The replay
    /// floor fails closed: a file that exists but cannot be read or parsed is an error, never
    /// a 0 that would let every old job run again.
    pub fn highest_sequence(&self) -> Result<u64, IdentityError> {
        let path = self.dir.join(SEQUENCE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(IdentityError::Corrupt {
                    dir: self.dir.display().to_string(),
                    detail: format!("{SEQUENCE}: {e}"),
                })
            }
        };
        text.trim().parse().map_err(|_| IdentityError::Corrupt {
            dir: self.dir.display().to_string(),
            detail: format!("{SEQUENCE} does not hold a sequence number"),
        })
    }

    /// Records that job `sequence` is starting. Written (and synced) before the job runs, so
    /// that a crash mid-job never lets the same job run twice.
    pub fn store_sequence(&self, sequence: u64) -> Result<(), IdentityError> {
        self.write(SEQUENCE, &sequence.to_string())
    }

    fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), IdentityError> {
        let text = serde_json::to_string(value).map_err(|e| IdentityError::Io {
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        })?;
        self.write(name, &text)
    }

    /// Keeps a finished job's result until the control plane has recorded it.
    pub fn store_pending_result(
        &self,
        job_id: Uuid,
        result: &JobResult,
    ) -> Result<(), IdentityError> {
        self.write_json(PENDING, &(job_id, result))
    }

    /// The result still to report, if any.
    pub fn pending_result(&self) -> Option<(Uuid, JobResult)> {
        let text = fs::read_to_string(self.dir.join(PENDING)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The control plane recorded the pending result.
    pub fn clear_pending_result(&self) {
        let _ = fs::remove_file(self.dir.join(PENDING));
    }

    /// Keeps the version an upgrade job asked for until its result is recorded: the upgrade
    /// starts then, even if that happens on a later connection or after a restart.
    pub fn store_pending_upgrade(&self, job_id: Uuid, version: &str) -> Result<(), IdentityError> {
        self.write_json(PENDING_UPGRADE, &(job_id, version))
    }

    /// The upgrade waiting for the pending result of the same job. One kept for any other job
    /// (its result was recorded and the upgrade started, or given up) is removed.
    pub fn pending_upgrade(&self) -> Option<(Uuid, String)> {
        let text = fs::read_to_string(self.dir.join(PENDING_UPGRADE)).ok()?;
        let upgrade: Option<(Uuid, String)> = serde_json::from_str(&text).ok();
        match (upgrade, self.pending_result()) {
            (Some(upgrade), Some((job_id, _))) if upgrade.0 == job_id => Some(upgrade),
            _ => {
                self.clear_pending_upgrade();
                None
            }
        }
    }

    /// The upgrade's result was recorded: it starts now, or never.
    pub fn clear_pending_upgrade(&self) {
        let _ = fs::remove_file(self.dir.join(PENDING_UPGRADE));
    }

    /// Records the running agent's status ([`crate::status`]).
    pub fn store_liveness(&self, liveness: &crate::status::Liveness) -> Result<(), IdentityError> {
        self.write_json(STATUS, liveness)
    }

    /// The running agent's last status, if it wrote one that can be read.
    pub fn liveness(&self) -> Option<crate::status::Liveness> {
        use std::io::Read;
        // Read as untrusted: whatever can write the state directory (a hook running as the
        // agent's user) could leave a symlink to /dev/zero or a FIFO there. A regular file,
        // not followed through a link, and at most 64 KiB of it.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(self.dir.join(STATUS))
            .ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(64 * 1024).read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Deletes the identity. Returns whether there was one.
    pub fn delete(&self) -> Result<bool, IdentityError> {
        let _ = fs::remove_file(self.dir.join(SEQUENCE));
        let _ = fs::remove_file(self.dir.join(STATUS));
        self.remove(NEXT)?;
        let mut found = false;
        for name in [KEY, CERT, CA, META] {
            match fs::remove_file(self.dir.join(name)) {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_servers_identity_starts_from_sequence_zero_the_same_server_keeps_it() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(dir.path().join("state"));
        let first = sample();
        state.save(&first).expect("save");
        state.store_sequence(7).expect("sequence");
        state.save(&first).expect("re-enroll the same server");
        assert_eq!(state.highest_sequence().expect("floor"), 7);
        let mut other = sample();
        other.meta.server_id = Uuid::new_v4();
        state.save(&other).expect("enroll another server");
        assert_eq!(state.highest_sequence().expect("floor"), 0);
    }

    #[test]
    fn a_garbled_or_unreadable_replay_floor_is_an_error_not_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(dir.path());
        state.save(&sample()).expect("save");
        assert_eq!(state.highest_sequence().expect("no file yet"), 0);
        fs::write(dir.path().join(SEQUENCE), "12x").expect("garble");
        assert!(matches!(
            state.highest_sequence(),
            Err(IdentityError::Corrupt { .. })
        ));
        fs::remove_file(dir.path().join(SEQUENCE)).expect("rm");
        fs::create_dir(dir.path().join(SEQUENCE)).expect("a directory cannot be read");
        assert!(matches!(
            state.highest_sequence(),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    /// An upgrade waits on disk for its own job's result only: recorded with it, it is there
    /// after a restart; with no result, or another job's, it is dropped.
    #[test]
    fn a_pending_upgrade_belongs_to_the_pending_result_of_its_job() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(dir.path());
        let done = JobResult {
            succeeded: true,
            release_id: None,
            commit: None,
            error: None,
        };
        let job = Uuid::new_v4();
        state
            .store_pending_upgrade(job, "2.0.0-1")
            .expect("upgrade");
        assert_eq!(state.pending_upgrade(), None, "no result to wait for");
        assert!(!dir.path().join(PENDING_UPGRADE).exists());

        state.store_pending_result(job, &done).expect("result");
        state
            .store_pending_upgrade(job, "2.0.0-1")
            .expect("upgrade");
        let restarted = StateDir::new(dir.path());
        assert_eq!(restarted.pending_upgrade(), Some((job, "2.0.0-1".into())));

        state
            .store_pending_result(Uuid::new_v4(), &done)
            .expect("another job's result");
        assert_eq!(state.pending_upgrade(), None, "another job's result");
        assert!(!dir.path().join(PENDING_UPGRADE).exists());
    }

    /// An attacker who can write into the state directory plants symlinks at every name the
    /// old code wrote through (the predictable temporary names) and at the final names, each
    /// pointing at a file root owns. Enrolling (here: saving) must leave the targets alone.
    #[test]
    fn symlinks_planted_in_the_state_directory_are_never_followed() {
        let dir = tempfile::tempdir().expect("dir");
        let state_dir = dir.path().join("state");
        fs::create_dir(&state_dir).expect("mkdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, "root's file").expect("victim");
        for name in [KEY, CERT, CA, META, SEQUENCE, PENDING, PENDING_UPGRADE] {
            for planted in [format!(".{name}.tmp"), name.to_owned()] {
                std::os::unix::fs::symlink(&victim, state_dir.join(&planted)).expect("plant");
            }
        }
        let state = StateDir::new(&state_dir);
        state.save(&sample()).expect("save");
        state.store_sequence(3).expect("sequence");
        state
            .store_pending_result(
                Uuid::new_v4(),
                &JobResult {
                    succeeded: true,
                    release_id: None,
                    commit: None,
                    error: None,
                },
            )
            .expect("pending");
        state
            .store_pending_upgrade(Uuid::new_v4(), "1.2.3-1")
            .expect("pending upgrade");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "root's file");
        for name in [KEY, CERT, CA, META, SEQUENCE, PENDING, PENDING_UPGRADE] {
            let meta = fs::symlink_metadata(state_dir.join(name)).expect("file");
            assert!(meta.file_type().is_file(), "{name} is still a link");
        }
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(&state_dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.ends_with(".tmp")
                    && !fs::symlink_metadata(state_dir.join(n))
                        .expect("m")
                        .is_symlink()
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn an_occupied_temporary_name_is_refused_not_followed() {
        let dir = tempfile::tempdir().expect("dir");
        let victim = dir.path().join("victim");
        fs::write(&victim, "untouched").expect("victim");
        let planted = dir.path().join("planted");
        std::os::unix::fs::symlink(&victim, &planted).expect("plant");
        let state = StateDir::new(dir.path());
        assert!(state.write_new(&planted, "overwrite").is_err());
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "untouched");
    }

    #[test]
    fn root_writing_into_the_service_users_directory_hands_files_to_that_user() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("dir");
        let state = dir.path().join("state");
        fs::create_dir(&state).expect("mkdir");
        let me = fs::metadata(&state).expect("meta").uid();
        if me != 0 {
            // Only root can give files away; as anyone else the files stay ours.
            StateDir::new(&state).save(&sample()).expect("save");
            assert_eq!(fs::metadata(state.join(KEY)).expect("key").uid(), me);
            return;
        }
        // 65534: `nobody` on Debian, standing in for the package's sensei-agent user.
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown");
        StateDir::new(&state).save(&sample()).expect("save");
        for name in [KEY, CERT, CA, META] {
            let meta = fs::metadata(state.join(name)).expect("file");
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{name}");
            assert_eq!(meta.mode() & 0o777, 0o600, "{name}");
        }
    }

    fn sample() -> Identity {
        Identity {
            meta: IdentityMeta {
                server_id: Uuid::new_v4(),
                control_plane: "cp.example:7443".into(),
                ca_fingerprint: "SHA256:00".into(),
                job_signing_public_key: "ab".repeat(32),
                agent_version: "0.1.0".into(),
                job_signing_keys: Vec::new(),
            },
            key_pem: "KEY".into(),
            cert_pem: "CERT".into(),
            ca_pem: "CA".into(),
        }
    }

    #[test]
    fn save_load_delete() {
        let tmp = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(tmp.path().join("state"));
        assert!(matches!(state.load(), Err(IdentityError::Missing(_))));
        let identity = sample();
        state.save(&identity).expect("save");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(state.path()), 0o700);
        assert_eq!(mode(&state.path().join(KEY)), 0o600);
        let loaded = state.load().expect("load");
        assert_eq!(loaded.meta, identity.meta);
        assert_eq!(loaded.key_pem, "KEY");
        assert!(state.delete().expect("delete"));
        assert!(!state.delete().expect("again"));
        assert!(matches!(state.load(), Err(IdentityError::Missing(_))));
    }

    #[test]
    fn a_renewed_pair_replaces_key_and_certificate_together() {
        let tmp = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(tmp.path());
        state.save(&sample()).expect("save");
        // Interrupted after the pair was written and the key copied, before the certificate:
        // the pair is the identity, never the new key with the old certificate.
        state
            .write(
                NEXT,
                &serde_json::to_string(&RenewedPair {
                    key_pem: "KEY2".into(),
                    cert_pem: "CERT2".into(),
                })
                .expect("json"),
            )
            .expect("pair");
        state.write(KEY, "KEY2").expect("key");
        let loaded = state.load().expect("load");
        assert_eq!(
            (loaded.key_pem.as_str(), loaded.cert_pem.as_str()),
            ("KEY2", "CERT2")
        );
        // Completed: the files hold the pair, and the pair file is gone.
        state.store_renewed("KEY3", "CERT3").expect("renewed");
        assert!(!tmp.path().join(NEXT).exists());
        let loaded = state.load().expect("load");
        assert_eq!(
            (loaded.key_pem.as_str(), loaded.cert_pem.as_str()),
            ("KEY3", "CERT3")
        );
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join(KEY)), 0o600);
        // Garbage in the pair's place is not an identity; an enrollment clears it.
        fs::write(tmp.path().join(NEXT), "{garbage").expect("garbage");
        assert_eq!(state.load().expect("load").key_pem, "KEY3");
        state.save(&sample()).expect("enroll again");
        assert!(!tmp.path().join(NEXT).exists());
        // A symlink planted at the pair's name is replaced, not followed.
        let victim = tmp.path().join("victim");
        fs::write(&victim, "root's file").expect("victim");
        std::os::unix::fs::symlink(&victim, tmp.path().join(NEXT)).expect("plant");
        state.store_renewed("KEY4", "CERT4").expect("renewed");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "root's file");
    }

    #[test]
    fn damaged_identity_is_reported() {
        let tmp = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(tmp.path());
        state.save(&sample()).expect("save");
        fs::write(tmp.path().join(META), "{not json").expect("damage");
        assert!(matches!(state.load(), Err(IdentityError::Corrupt { .. })));
        fs::remove_file(tmp.path().join(CERT)).expect("remove");
        assert!(matches!(state.load(), Err(IdentityError::Corrupt { .. })));
    }
}
