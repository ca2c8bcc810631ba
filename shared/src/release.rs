//! The release engine: the one place that knows the layout of a deploy path and the steps of a
//! deploy. It is pure. It turns a validated [`DeploySpec`] (or [`RollbackSpec`]) into one POSIX
//! `sh` script, and it turns the script's output back into log lines and an outcome. The agent
//! runs the script with its local `sh`; the SSH runner runs the very same script over an SSH
//! channel. That is how both report the same steps, statuses and log lines. So that they
//! cannot drift apart, all the runner's half that does not depend on where `sh` runs is here
//! too: the script a task gets ([`script_for`]), the run's nonce ([`run_nonce`]), reading its
//! output ([`ScriptOutput`]), and the job's result
//! ([`JobResult::from_run`](crate::protocol::JobResult::from_run)).
//!
//! ```text
//! <deploy_path>/releases/<release-id>/   one directory per release, ids sort by time
//! <deploy_path>/shared/                  linked paths; .env written 0600
//! <deploy_path>/current -> releases/<release-id>
//! <deploy_path>/.sensei/                 lock, lock.owner, repo.git (cache), records/<id>
//! ```
//!
//! Steps: preflight → lock → fetch → link → env → build → health_check → pre_switch →
//! switch → post_switch → prune. One script holds the `flock` for the whole deploy (the
//! kernel releases it if the process dies). Before `switch`, a failure removes the new
//! release directory and leaves `current` exactly as it was. `switch` makes the new link
//! under a temporary name and renames it over `current` (`rename(2)`), so `current` always
//! points at a complete release.
//!
//! The script speaks to its runner through lines `@@sensei:<nonce> <event> …`. The nonce
//! changes per run, so a hook cannot forge a step result by printing one.

use uuid::Uuid;

use crate::job::{DeploySpec, ForgetEnvSpec, JobTask, RollbackSpec};
use crate::lines::LineAssembler;
use crate::protocol::LogLine;

/// Free space required on the deploy path's filesystem before fetching, in KiB.
pub const MIN_FREE_KIB: u64 = 100 * 1024;
/// Longest accepted text in any spec field.
const MAX_FIELD: usize = 4096;

/// The steps, in order, as reported in statuses and errors.
pub mod step {
    pub const PREFLIGHT: &str = "preflight";
    pub const LOCK: &str = "lock";
    pub const FETCH: &str = "fetch";
    pub const LINK: &str = "link";
    pub const ENV: &str = "env";
    pub const BUILD: &str = "build";
    pub const HEALTH_CHECK: &str = "health_check";
    pub const PRE_SWITCH: &str = "pre_switch";
    pub const SWITCH: &str = "switch";
    pub const POST_SWITCH: &str = "post_switch";
    pub const PRUNE: &str = "prune";
    pub const ROLLBACK: &str = "rollback";
}

/// A spec the engine refuses to turn into a script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid deploy spec: {0}")]
pub struct InvalidSpec(pub String);

fn invalid(msg: impl Into<String>) -> InvalidSpec {
    InvalidSpec(msg.into())
}

fn plain_text(what: &str, s: &str) -> Result<(), InvalidSpec> {
    if s.len() > MAX_FIELD {
        return Err(invalid(format!("{what} is longer than {MAX_FIELD} bytes")));
    }
    if s.contains('\0') {
        return Err(invalid(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

fn one_line(what: &str, s: &str) -> Result<(), InvalidSpec> {
    plain_text(what, s)?;
    if s.is_empty() || s.contains('\n') || s.contains('\r') {
        return Err(invalid(format!("{what} must be one non-empty line")));
    }
    Ok(())
}

/// An absolute path without `.`/`..` components.
pub fn check_deploy_path(path: &str) -> Result<(), InvalidSpec> {
    one_line("deploy_path", path)?;
    if !path.starts_with('/') || path == "/" {
        return Err(invalid("deploy_path must be an absolute path below /"));
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(invalid("deploy_path must not contain . or .. components"));
    }
    Ok(())
}

/// A shared path: relative, inside the release, not one of ours.
pub fn check_shared_path(path: &str) -> Result<(), InvalidSpec> {
    one_line("shared path", path)?;
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() || path.starts_with('/') {
        return Err(invalid(format!("shared path {path:?} must be relative")));
    }
    if trimmed
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid(format!(
            "shared path {path:?} must not contain empty, . or .. components"
        )));
    }
    if matches!(trimmed.split('/').next(), Some(".git" | ".sensei")) {
        return Err(invalid(format!("shared path {path:?} is reserved")));
    }
    Ok(())
}

/// A git ref: branch, tag or commit; never something git could read as an option.
pub fn check_git_ref(r: &str) -> Result<(), InvalidSpec> {
    one_line("ref", r)?;
    let ok_chars = r
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._/-+".contains(c));
    if !ok_chars || r.starts_with('-') || r.starts_with('/') || r.contains("..") || r.len() > 255 {
        return Err(invalid(format!(
            "ref {r:?} must be a branch, tag or commit (letters, digits, . _ / - +)"
        )));
    }
    Ok(())
}

/// A release id: digits, letters and dashes, as the control plane makes them.
pub fn check_release_id(id: &str) -> Result<(), InvalidSpec> {
    if id.is_empty()
        || id.len() > 64
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || id.starts_with('-')
    {
        return Err(invalid(format!("release id {id:?} is malformed")));
    }
    Ok(())
}

/// An environment variable name.
pub fn check_env_name(name: &str) -> Result<(), InvalidSpec> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') || name.len() > 255 {
        return Err(invalid(format!(
            "environment variable name {name:?} must match [A-Za-z_][A-Za-z0-9_]*"
        )));
    }
    Ok(())
}

/// A repository URL git will not mistake for an option, over a transport that proves who the
/// server is: `https://`, `ssh://`, `user@host:path` (scp-like ssh), or a local repository
/// (`file://` or an absolute path). `http://` and `git://` carry the code unauthenticated, so
/// anyone on the path could deploy their own; `transport::address` helpers (`ext::` runs a
/// command) are refused outright.
pub fn check_repo_url(url: &str) -> Result<(), InvalidSpec> {
    one_line("repo_url", url)?;
    if url.starts_with('-') {
        return Err(invalid("repo_url must not start with '-'"));
    }
    if url.contains("::") {
        return Err(invalid(
            "repo_url must not name a git remote helper (transport::address)",
        ));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return match scheme.to_ascii_lowercase().as_str() {
            "https" | "ssh" | "file" => Ok(()),
            "http" | "git" => Err(invalid(format!(
                "repo_url uses {scheme}://, which does not authenticate the server: use https:// or ssh://"
            ))),
            _ => Err(invalid(format!(
                "repo_url scheme {scheme}:// is not supported: use https://, ssh://, user@host:path or a local path"
            ))),
        };
    }
    if url.starts_with('/') {
        return Ok(());
    }
    // scp-like: [user@]host:path, with no slash before the colon.
    match url.split_once(':') {
        Some((host, path)) if !host.is_empty() && !host.contains('/') && !path.is_empty() => Ok(()),
        _ => Err(invalid(
            "repo_url must be https://…, ssh://…, user@host:path, file://… or an absolute path",
        )),
    }
}

/// A full commit id: 40 lowercase hexadecimal digits.
pub fn is_commit_id(text: &str) -> bool {
    text.len() == 40
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Validates every field of a deploy spec.
pub fn validate(spec: &DeploySpec) -> Result<(), InvalidSpec> {
    check_repo_url(&spec.repo_url)?;
    if let Some(commit) = &spec.expected_commit {
        if !is_commit_id(commit) {
            return Err(invalid(
                "expected_commit must be 40 lowercase hexadecimal digits",
            ));
        }
    }
    check_git_ref(&spec.git_ref)?;
    check_release_id(&spec.release_id)?;
    check_deploy_path(&spec.deploy_path)?;
    if spec.keep_releases == 0 || spec.keep_releases > 100 {
        return Err(invalid("keep_releases must be between 1 and 100"));
    }
    for p in &spec.shared_paths {
        check_shared_path(p)?;
    }
    for (name, value) in &spec.env {
        check_env_name(name)?;
        plain_text("environment value", value)?;
    }
    for cmd in spec
        .hooks
        .build
        .iter()
        .chain(&spec.hooks.pre_switch)
        .chain(&spec.hooks.post_switch)
        .chain(spec.health_check.iter())
    {
        plain_text("hook", cmd)?;
    }
    if spec.hook_timeout_secs == 0 {
        return Err(invalid("hook_timeout_secs must be positive"));
    }
    Ok(())
}

/// `s` as one single-quoted shell word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Present while `shared/.env` is the file Sensei wrote from the project's environment (and
/// not one an operator put there by hand): only that file is ever removed.
pub const ENV_MARKER: &str = ".sensei/env-written";

/// The `.env` file: `NAME="value"`, with `\`, `"`, `$`, backquote and newlines escaped, the
/// form dotenv readers and `sh` agree on.
pub fn env_file(env: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in env {
        let mut escaped = String::with_capacity(value.len());
        for c in value.chars() {
            match c {
                '\\' => escaped.push_str("\\\\"),
                '"' => escaped.push_str("\\\""),
                '$' => escaped.push_str("\\$"),
                '`' => escaped.push_str("\\`"),
                '\n' => escaped.push_str("\\n"),
                c => escaped.push(c),
            }
        }
        out.push_str(&format!("{name}=\"{escaped}\"\n"));
    }
    out
}

/// Functions every script starts with. `$M` is the marker prefix.
const PRELUDE: &str = r#"set -u
umask 022
SWITCHED=0
R=''
say() { printf '%s %s\n' "$M" "$*"; }
step() { CUR_STEP="$1"; say step "$1"; }
record() {
  # record <release-id> <status> [commit]
  mkdir -p "$D/.sensei/records" &&
  printf 'status=%s\ncommit=%s\nat=%s\n' "$2" "${3:-}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$D/.sensei/records/.$1.tmp" &&
  mv -f "$D/.sensei/records/.$1.tmp" "$D/.sensei/records/$1"
}
fail() {
  # fail <message>: report, undo what the failed deploy made, stop.
  say fail "$CUR_STEP" "$1"
  if [ "$SWITCHED" = 0 ] && [ -n "$R" ] && [ -d "$R" ]; then rm -rf "$R"; fi
  if [ -n "${ID:-}" ] && [ "$SWITCHED" = 0 ] && [ -d "$D/.sensei" ]; then record "$ID" failed "${COMMIT:-}"; fi
  exit 1
}
run_hook() {
  # run_hook <step> <command>: in the release directory, with a timeout, output streamed.
  say hook "$1"
  # 9>&-: hooks do not inherit the lock, so a hook orphaned by a dead runner cannot hold it.
  # </dev/null: the script itself arrives on standard input; a hook that reads it (cat,
  # read, ssh without -n) must not swallow the rest of the script.
  (cd "$R" && exec timeout --kill-after=10 "$HOOK_TIMEOUT" sh -c "$2") </dev/null 2>&1 9>&-
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then fail "$1 hook timed out after ${HOOK_TIMEOUT}s"; fi
  [ "$rc" = 0 ] || fail "$1 hook exited with status $rc"
}
good_releases() {
  # Successful releases, oldest first.
  [ -d "$D/.sensei/records" ] || return 0
  for f in "$D/.sensei/records/"*; do
    [ -f "$f" ] || continue
    grep -qx 'status=succeeded' "$f" && basename "$f"
  done | sort
}
current_release() { readlink "$D/current" 2>/dev/null | sed 's#^releases/##'; }
switch_to() {
  # Atomic: a new link under a temporary name, renamed over current.
  rm -f "$D/.current.tmp" &&
  ln -s "releases/$1" "$D/.current.tmp" &&
  mv -Tf "$D/.current.tmp" "$D/current"
}
inside_release() {
  # inside_release <relative path>: no directory between $R and the path may be a symlink
  # (the repository could commit one pointing anywhere, and linking the shared path would
  # then replace a file outside the release).
  p="$R"; rest="$1"
  while case "$rest" in */*) true;; *) false;; esac; do
    p="$p/${rest%%/*}"; rest="${rest#*/}"
    if [ -L "$p" ]; then fail "shared path $1: ${p#"$R"/} is a symbolic link in the repository (to $(readlink "$p")); refusing to follow it"; fi
  done
}
take_lock() {
  step lock
  mkdir -p "$D/.sensei" || fail "cannot create $D/.sensei"
  exec 9>>"$D/.sensei/lock" || fail "cannot open the lock file"
  flock -n 9 || fail "another deploy holds the lock ($(cat "$D/.sensei/lock.owner" 2>/dev/null || echo 'owner unknown'))"
  printf 'pid=%s job=%s since=%s\n' "$$" "$JOB" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$D/.sensei/lock.owner"
}
"#;

/// The deploy script for `spec`. `nonce` marks the script's own output lines; `job` names the
/// job in the lock file.
pub fn deploy_script(spec: &DeploySpec, job: &str, nonce: &str) -> Result<String, InvalidSpec> {
    validate(spec)?;
    if nonce.is_empty() || !nonce.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(invalid("nonce must be alphanumeric"));
    }
    let mut s = String::new();
    let var = |s: &mut String, name: &str, value: &str| {
        s.push_str(&format!("{name}={}\n", sh_quote(value)));
    };
    var(&mut s, "M", &format!("@@sensei:{nonce}"));
    var(&mut s, "D", spec.deploy_path.trim_end_matches('/'));
    var(&mut s, "ID", &spec.release_id);
    var(&mut s, "JOB", job);
    var(&mut s, "REPO", &spec.repo_url);
    var(&mut s, "REF", &spec.git_ref);
    var(
        &mut s,
        "EXPECT",
        spec.expected_commit.as_deref().unwrap_or(""),
    );
    var(&mut s, "KEEP", &spec.keep_releases.to_string());
    var(&mut s, "HOOK_TIMEOUT", &spec.hook_timeout_secs.to_string());
    s.push_str(PRELUDE);
    s.push_str(&format!(
        r#"
step preflight
command -v git >/dev/null 2>&1 || fail "git is not installed on the server"
command -v flock >/dev/null 2>&1 || fail "flock (util-linux) is not installed on the server"
mkdir -p "$D" 2>/dev/null || fail "cannot create $D as $(id -un)"
[ -w "$D" ] || fail "$D is not writable by $(id -un)"
mkdir -p "$D/releases" "$D/shared" "$D/.sensei/records" || fail "cannot create the release layout in $D"
[ "$(stat -c %d "$D")" = "$(stat -c %d "$D/releases")" ] || fail "releases/ is on another filesystem than $D: the switch would not be atomic"
FREE=$(df -Pk "$D" | awk 'NR==2 {{print $4}}')
[ "${{FREE:-0}}" -ge {min_free} ] || fail "only ${{FREE:-0}} KiB free on the filesystem of $D (need {min_free})"

take_lock

step fetch
C="$D/.sensei/repo.git"
# Only branches and tags are fetched (never refs/pull/* and the like, which anyone who can
# open a pull request controls).
# A cache made by older versions as a full mirror (every ref, refs/pull/* included) is made
# again from scratch.
if [ -d "$C" ] && [ "$(git --git-dir="$C" config --get remote.origin.mirror 2>/dev/null)" = true ]; then
  rm -rf "$C" || fail "cannot replace the old fetch cache $C"
fi
if [ ! -d "$C" ]; then
  rm -rf "$C.tmp" && git init --quiet --bare "$C.tmp" && git --git-dir="$C.tmp" remote add origin "$REPO" && mv "$C.tmp" "$C" || fail "cannot create the fetch cache for $REPO"
fi
git --git-dir="$C" remote set-url origin "$REPO" &&
git --git-dir="$C" fetch --quiet --prune --force origin '+refs/heads/*:refs/heads/*' '+refs/tags/*:refs/tags/*' 2>&1 || fail "cannot fetch $REPO"
COMMIT=$(git --git-dir="$C" rev-parse --verify --quiet "refs/tags/$REF^{{commit}}" ||
         git --git-dir="$C" rev-parse --verify --quiet "refs/heads/$REF^{{commit}}" ||
         git --git-dir="$C" rev-parse --verify --quiet "$REF^{{commit}}") || fail "ref $REF does not exist in $REPO"
# A pinned deploy (a rollout's approved commit) deploys exactly that commit, and only if it
# is in the history of the ref as fetched here: a pushed branch still leads to it, while a
# commit that never was on the branch (another branch's, an unreviewed one) is refused.
if [ -n "$EXPECT" ] && [ "$COMMIT" != "$EXPECT" ]; then
  git --git-dir="$C" --no-replace-objects merge-base --is-ancestor "$EXPECT" "$COMMIT" 2>/dev/null ||
    fail "commit mismatch: $EXPECT (the commit this deploy must be) is not in the history of $REF ($COMMIT here)"
  COMMIT="$EXPECT"
fi
say commit "$COMMIT"
[ -e "$D/releases/$ID" ] && fail "release $ID already exists"
R="$D/releases/$ID"
mkdir "$R" || fail "cannot create $R"
git --git-dir="$C" --no-replace-objects archive --format=tar -o "$D/.sensei/export.tar" "$COMMIT" && tar -xf "$D/.sensei/export.tar" -C "$R" || {{ rm -f "$D/.sensei/export.tar"; fail "cannot export $COMMIT"; }}
rm -f "$D/.sensei/export.tar"
say release "$ID"
"#,
        min_free = MIN_FREE_KIB
    ));

    s.push_str("\nstep link\n");
    for path in &spec.shared_paths {
        let dir = path.ends_with('/');
        let rel = path.trim_end_matches('/');
        let q = sh_quote(rel);
        s.push_str(&format!("inside_release {q}\n"));
        if dir {
            s.push_str(&format!(
                "mkdir -p \"$D/shared/\"{q} && rm -rf \"$R/\"{q} && mkdir -p \"$(dirname \"$R/\"{q})\" && ln -s \"$D/shared/\"{q} \"$R/\"{q} || fail \"cannot link shared directory \"{q}\n"
            ));
        } else {
            s.push_str(&format!(
                "mkdir -p \"$(dirname \"$D/shared/\"{q})\" && {{ [ -e \"$D/shared/\"{q} ] || : > \"$D/shared/\"{q}; }} && rm -rf \"$R/\"{q} && mkdir -p \"$(dirname \"$R/\"{q})\" && ln -s \"$D/shared/\"{q} \"$R/\"{q} || fail \"cannot link shared file \"{q}\n"
            ));
        }
    }

    s.push_str("\nstep env\n");
    if spec.env.is_empty() && spec.shared_paths.iter().any(|p| p == ".env") {
        // The operator keeps `.env` on the server by hand (a shared path, linked above).
    } else if spec.env.is_empty() {
        // The project has no environment any more. A file Sensei wrote (the marker says so)
        // holds secrets nobody asked for now; the running release may still read it, so it
        // goes once this release is live (step prune), not before: a failed deploy changes
        // nothing. A file without the marker was put there by hand: linked, as it always was.
        s.push_str(&format!(
            "STALE_ENV=0\n\
             if [ -e \"$D/shared/.env\" ] && [ -e \"$D/{ENV_MARKER}\" ]; then STALE_ENV=1\n\
             elif [ -e \"$D/shared/.env\" ]; then rm -f \"$R/.env\"; ln -s \"$D/shared/.env\" \"$R/.env\"; fi\n"
        ));
    } else {
        use base64::Engine;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(env_file(&spec.env).as_bytes());
        s.push_str(&format!(
            "( umask 077; printf '%s' {b64} | base64 -d > \"$D/shared/.env.tmp\" ) && chmod 600 \"$D/shared/.env.tmp\" && mv -f \"$D/shared/.env.tmp\" \"$D/shared/.env\" || fail \"cannot write $D/shared/.env\"\n\
             rm -f \"$R/.env\" && ln -s \"$D/shared/.env\" \"$R/.env\" || fail \"cannot link .env\"\n\
             : > \"$D/{ENV_MARKER}\" || fail \"cannot mark $D/shared/.env as written by Sensei\"\n",
            b64 = sh_quote(&encoded)
        ));
    }

    let hooks = |s: &mut String, name: &str, cmds: &[String]| {
        s.push_str(&format!("\nstep {name}\n"));
        for cmd in cmds {
            s.push_str(&format!("run_hook {name} {}\n", sh_quote(cmd)));
        }
    };
    hooks(&mut s, step::BUILD, &spec.hooks.build);
    s.push_str("\nstep health_check\n");
    if let Some(check) = &spec.health_check {
        s.push_str(&format!(
            "say hook health_check\n(cd \"$R\" && exec timeout --kill-after=10 \"$HOOK_TIMEOUT\" sh -c {}) </dev/null 2>&1 9>&- || fail \"health check failed (exit status $?)\"\n",
            sh_quote(check)
        ));
    }
    hooks(&mut s, step::PRE_SWITCH, &spec.hooks.pre_switch);
    s.push_str(
        r#"
step switch
PREVIOUS=$(current_release)
switch_to "$ID" || fail "cannot switch current to $ID"
SWITCHED=1
record "$ID" succeeded "$COMMIT"
say switched "$ID" "${PREVIOUS:-none}"
"#,
    );
    s.push_str(&format!("\nstep {}\n", step::POST_SWITCH));
    for cmd in &spec.hooks.post_switch {
        s.push_str(&format!(
            "say hook post_switch\n(cd \"$R\" && exec timeout --kill-after=10 \"$HOOK_TIMEOUT\" sh -c {}) </dev/null 2>&1 9>&- || fail \"post_switch hook exited with status $? (the new release is live)\"\n",
            sh_quote(cmd)
        ));
    }
    s.push_str(
        r#"
step prune
if [ "${STALE_ENV:-0}" = 1 ]; then
  rm -f "$D/shared/.env" "$D/.sensei/env-written" || fail "cannot remove the old $D/shared/.env"
  echo "removed $D/shared/.env: the project has no environment any more"
fi
# Keep the newest $KEEP successful releases, and always current and the previous good one.
KEEPERS=$( { good_releases | tail -n "$KEEP"; echo "$ID"; echo "${PREVIOUS:-}"; } | sort -u)
for dir in "$D/releases/"*; do
  [ -d "$dir" ] || continue
  name=$(basename "$dir")
  printf '%s\n' "$KEEPERS" | grep -qx -- "$name" && continue
  # Not kept: an older good release, or what a failed or interrupted deploy left behind.
  rm -rf "$dir" && say pruned "$name"
  if [ -f "$D/.sensei/records/$name" ] && grep -qx 'status=succeeded' "$D/.sensei/records/$name"; then
    record "$name" pruned
  fi
done
say done "$ID" "$COMMIT"
"#,
    );
    Ok(s)
}

/// The variables every maintenance script (rollback, forget_env) starts with: the output
/// marker, the deploy directory and the job.
fn script_head(deploy_path: &str, job: &str, nonce: &str) -> Result<String, InvalidSpec> {
    if nonce.is_empty() || !nonce.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(invalid("nonce must be alphanumeric"));
    }
    let mut s = String::new();
    s.push_str(&format!("M={}\n", sh_quote(&format!("@@sensei:{nonce}"))));
    s.push_str(&format!(
        "D={}\n",
        sh_quote(deploy_path.trim_end_matches('/'))
    ));
    s.push_str(&format!("JOB={}\n", sh_quote(job)));
    Ok(s)
}

/// The rollback script: switch `current` back to the given release, or to the newest good
/// release older than the current one. The release rolled away from is marked `rolled_back`,
/// so a second rollback goes one further back.
pub fn rollback_script(spec: &RollbackSpec, job: &str, nonce: &str) -> Result<String, InvalidSpec> {
    check_deploy_path(&spec.deploy_path)?;
    if let Some(to) = &spec.to_release {
        check_release_id(to)?;
    }
    let mut s = script_head(&spec.deploy_path, job, nonce)?;
    s.push_str(&format!(
        "TO={}\n",
        sh_quote(spec.to_release.as_deref().unwrap_or(""))
    ));
    s.push_str("CUR_STEP=preflight\nID=''\n");
    s.push_str(PRELUDE);
    s.push_str(
        r#"
[ -d "$D/.sensei" ] || fail "$D has no Sensei releases"
take_lock
step rollback
FROM=$(current_release)
[ -n "$FROM" ] || fail "$D/current does not point at a release"
if [ -z "$TO" ]; then
  TO=$(good_releases | awk -v cur="$FROM" '$0 < cur' | tail -n 1)
fi
[ -n "$TO" ] || fail "there is no earlier good release to roll back to"
[ "$TO" != "$FROM" ] || fail "$TO is already current"
[ -d "$D/releases/$TO" ] || fail "release $TO is no longer on the server"
grep -qx 'status=succeeded' "$D/.sensei/records/$TO" 2>/dev/null || fail "release $TO did not deploy successfully"
COMMIT=$(sed -n 's/^commit=//p' "$D/.sensei/records/$TO")
switch_to "$TO" || fail "cannot switch current to $TO"
SWITCHED=1
record "$FROM" rolled_back "$(sed -n 's/^commit=//p' "$D/.sensei/records/$FROM" 2>/dev/null)"
say commit "$COMMIT"
say switched "$TO" "$FROM"
say done "$TO" "$COMMIT"
"#,
    );
    Ok(s)
}

/// The script that removes a deleted project's `shared/.env` under the deploy lock; nothing
/// else in the deploy directory changes.
pub fn forget_env_script(
    spec: &ForgetEnvSpec,
    job: &str,
    nonce: &str,
) -> Result<String, InvalidSpec> {
    check_deploy_path(&spec.deploy_path)?;
    let mut s = script_head(&spec.deploy_path, job, nonce)?;
    s.push_str("CUR_STEP=preflight\nID=''\n");
    s.push_str(PRELUDE);
    s.push_str(
        r#"
if [ ! -d "$D/.sensei" ]; then
  echo "$D holds no Sensei releases: nothing to remove"
  say done - -
  exit 0
fi
take_lock
step forget_env
[ -L "$D/shared" ] && fail "$D/shared is a symbolic link; not following it"
if [ -e "$D/.sensei/env-written" ]; then
  rm -f "$D/shared/.env" "$D/.sensei/env-written" || fail "cannot remove $D/shared/.env"
  echo "removed $D/shared/.env: the project was deleted"
else
  echo "no $D/shared/.env written by Sensei to remove"
fi
say done - -
"#,
    );
    Ok(s)
}

/// Random bytes in a run's nonce: too many for a hook to guess this run's marker.
pub const NONCE_BYTES: usize = 12;

/// The nonce of one run (lowercase hex), from random bytes its runner drew: this crate draws
/// none, so that every rule here stays testable with plain values.
pub fn run_nonce(random: [u8; NONCE_BYTES]) -> String {
    random.iter().map(|b| format!("{b:02x}")).collect()
}

/// The script that carries out a job's task; `job_id` names the job in the lock file.
pub fn script_for(task: &JobTask, job_id: Uuid, nonce: &str) -> Result<String, InvalidSpec> {
    let job = job_id.to_string();
    match task {
        JobTask::Deploy(spec) => deploy_script(spec, &job, nonce),
        JobTask::Rollback(spec) => rollback_script(spec, &job, nonce),
        JobTask::ForgetEnv(spec) => forget_env_script(spec, &job, nonce),
        // The agent carries it out itself (its package, through systemd); there is no script.
        JobTask::UpgradeAgent(_) => Err(InvalidSpec(
            "an agent upgrade is carried out by the agent, not by a release script".into(),
        )),
    }
}

/// What one line of script output means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptEvent {
    /// Output for the deploy log.
    Log(String),
    Step(String),
    Hook(String),
    Commit(String),
    Release(String),
    Switched {
        to: String,
        from: Option<String>,
    },
    Pruned(String),
    Fail {
        step: String,
        message: String,
    },
    Done {
        release: String,
        commit: String,
    },
}

impl ScriptEvent {
    /// The log line this event is recorded as, for output read from `raw_stream` (1 stdout,
    /// 2 stderr): the script's own output as is, on its stream; the engine's events as Sensei's
    /// account of the steps (stream 0). Both runners log exactly these lines.
    pub fn log_entry(&self, raw_stream: u8) -> (u8, String) {
        match self {
            ScriptEvent::Log(text) => (raw_stream, text.clone()),
            other => other.log_line(),
        }
    }

    fn log_line(&self) -> (u8, String) {
        let sensei = |text: String| (0u8, text);
        match self {
            ScriptEvent::Log(text) => (1, text.clone()),
            ScriptEvent::Step(s) => sensei(format!("==> {s}")),
            ScriptEvent::Hook(h) => sensei(format!("running {h} hook")),
            ScriptEvent::Commit(c) => sensei(format!("commit {c}")),
            ScriptEvent::Release(r) => sensei(format!("release {r}")),
            ScriptEvent::Switched { to, from } => sensei(match from {
                Some(from) => format!("current -> releases/{to} (was releases/{from})"),
                None => format!("current -> releases/{to}"),
            }),
            ScriptEvent::Pruned(r) => sensei(format!("pruned releases/{r}")),
            ScriptEvent::Fail { step, message } => sensei(format!("FAILED at {step}: {message}")),
            ScriptEvent::Done { release, commit } => {
                sensei(format!("done: release {release} at commit {commit}"))
            }
        }
    }
}

/// Reads the script's output. Lines carrying this run's marker are events; all others are
/// log lines.
#[derive(Debug, Clone)]
pub struct OutputParser {
    marker: String,
}

impl OutputParser {
    pub fn new(nonce: &str) -> Self {
        Self {
            marker: format!("@@sensei:{nonce} "),
        }
    }

    pub fn parse(&self, line: &str) -> ScriptEvent {
        let Some(rest) = line.strip_prefix(&self.marker) else {
            return ScriptEvent::Log(line.to_owned());
        };
        let (kind, args) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut words = args.splitn(2, ' ');
        let (a, b) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        match kind {
            "step" => ScriptEvent::Step(a.to_owned()),
            "hook" => ScriptEvent::Hook(a.to_owned()),
            "commit" => ScriptEvent::Commit(a.to_owned()),
            "release" => ScriptEvent::Release(a.to_owned()),
            "pruned" => ScriptEvent::Pruned(a.to_owned()),
            "switched" => ScriptEvent::Switched {
                to: a.to_owned(),
                from: Some(b.to_owned()).filter(|f| !f.is_empty() && f != "none"),
            },
            "fail" => ScriptEvent::Fail {
                step: a.to_owned(),
                message: b.to_owned(),
            },
            "done" => ScriptEvent::Done {
                release: a.to_owned(),
                commit: b.to_owned(),
            },
            _ => ScriptEvent::Log(line.to_owned()),
        }
    }
}

/// The result of a run, folded from its events and exit status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub step: Option<String>,
    pub commit: Option<String>,
    pub release: Option<String>,
    pub switched: bool,
    pub failure: Option<(String, String)>,
    pub done: bool,
}

impl Outcome {
    pub fn feed(&mut self, event: &ScriptEvent) {
        match event {
            ScriptEvent::Step(s) => self.step = Some(s.clone()),
            ScriptEvent::Commit(c) => self.commit = Some(c.clone()),
            ScriptEvent::Release(r) => self.release = Some(r.clone()),
            ScriptEvent::Switched { to, .. } => {
                self.switched = true;
                self.release = Some(to.clone());
            }
            ScriptEvent::Fail { step, message } => {
                self.failure = Some((step.clone(), message.clone()))
            }
            ScriptEvent::Done { release, commit } => {
                self.done = true;
                // `-`: a job that makes no release (forget_env) says so.
                self.release = Some(release.clone()).filter(|r| r != "-");
                self.commit = Some(commit.clone()).filter(|c| c != "-");
            }
            ScriptEvent::Log(_) | ScriptEvent::Hook(_) | ScriptEvent::Pruned(_) => {}
        }
    }

    /// The final verdict once the script ended with `exit`: the step and why it failed, or
    /// `Ok(())` only for a clean exit that reported done. A failure the script reported
    /// outranks how it ended.
    pub fn verdict(&self, exit: ScriptExit) -> Result<(), (String, String)> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        let step = || self.step.clone().unwrap_or_else(|| step::PREFLIGHT.into());
        match exit {
            ScriptExit::Status(0) if self.done => Ok(()),
            ScriptExit::Status(0) => {
                Err((step(), "the deploy script ended without finishing".into()))
            }
            ScriptExit::Status(code) => Err((
                step(),
                format!("the deploy script exited with status {code}"),
            )),
            ScriptExit::Killed => Err((step(), "the deploy script was killed".into())),
            // A run stopped before its first step failed at none: nothing was tried.
            ScriptExit::Cancelled => {
                Err((self.step.clone().unwrap_or_default(), "cancelled".into()))
            }
        }
    }
}

/// How the script's process ended, as its runner saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptExit {
    /// It exited with this status.
    Status(i32),
    /// No exit status came back: killed by a signal (or the channel closed without one).
    Killed,
    /// The runner stopped it (its session ended, it is shutting down).
    Cancelled,
}

impl ScriptExit {
    /// From an exit status, `None` when there was none.
    pub fn from_status(status: Option<i32>) -> Self {
        status.map_or(Self::Killed, Self::Status)
    }
}

/// Which output stream bytes were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    /// The stream's number in a [`LogLine`].
    pub fn log_stream(self) -> u8 {
        match self {
            Self::Stdout => 1,
            Self::Stderr => 2,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Stdout => 0,
            Self::Stderr => 1,
        }
    }
}

/// One run's output as it arrives, read the same way by both runners: each stream's bytes cut
/// into bounded lines ([`LineAssembler`]), each line read with this run's nonce, folded into
/// the run's [`Outcome`] and turned into the log line it is recorded as.
#[derive(Debug)]
pub struct ScriptOutput {
    parser: OutputParser,
    outcome: Outcome,
    assemblers: [LineAssembler; 2],
}

impl ScriptOutput {
    pub fn new(nonce: &str) -> Self {
        Self {
            parser: OutputParser::new(nonce),
            outcome: Outcome::default(),
            assemblers: [LineAssembler::new(), LineAssembler::new()],
        }
    }

    /// Feeds bytes read from `stream`; returns the log lines they completed.
    pub fn read(&mut self, stream: OutputStream, data: &[u8]) -> Vec<LogLine> {
        let lines = self.assemblers[stream.index()].push(data);
        self.take(stream, lines)
    }

    /// `stream` ended; returns its last line if it had no newline after it.
    pub fn end(&mut self, stream: OutputStream) -> Vec<LogLine> {
        let last = self.assemblers[stream.index()].finish();
        self.take(stream, last.into_iter().collect())
    }

    fn take(&mut self, stream: OutputStream, lines: Vec<String>) -> Vec<LogLine> {
        lines
            .into_iter()
            .map(|line| {
                let event = self.parser.parse(&line);
                self.outcome.feed(&event);
                let (stream, text) = event.log_entry(stream.log_stream());
                LogLine { stream, text }
            })
            .collect()
    }

    /// What the output said so far.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    pub fn into_outcome(self) -> Outcome {
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Hooks;

    pub(crate) fn spec() -> DeploySpec {
        DeploySpec {
            repo_url: "/srv/git/app.git".into(),
            git_ref: "main".into(),
            release_id: "20270115080000-abc123".into(),
            deploy_path: "/srv/app".into(),
            keep_releases: 3,
            shared_paths: vec!["storage/".into(), "config/local.ini".into()],
            hooks: Hooks {
                build: vec!["echo building".into()],
                pre_switch: vec![],
                post_switch: vec!["echo live".into()],
            },
            health_check: Some("test -f index.html".into()),
            env: vec![("API_KEY".into(), "it's \"quoted\" $HOME".into())],
            hook_timeout_secs: 60,
            expected_commit: None,
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn env_file_escapes_what_the_shell_would_expand() {
        let text = env_file(&[("A".into(), "x\"$y`\\\nz".into())]);
        assert_eq!(text, "A=\"x\\\"\\$y\\`\\\\\\nz\"\n");
    }

    #[test]
    fn script_names_every_step_in_order() {
        let script = deploy_script(&spec(), "job-1", "abc").expect("script");
        let order = [
            "step preflight",
            "take_lock\n",
            "step fetch",
            "step link",
            "step env",
            "step build",
            "step health_check",
            "step pre_switch",
            "step switch",
            "step post_switch",
            "step prune",
        ];
        let mut at = 0;
        for marker in order {
            let found = script[at..]
                .find(marker)
                .unwrap_or_else(|| panic!("{marker} missing or out of order"));
            at += found + marker.len();
        }
        assert!(
            !script.contains("it's"),
            "env values are only present base64-encoded"
        );
    }

    #[test]
    fn hostile_specs_are_refused() {
        type Change = Box<dyn Fn(&mut DeploySpec)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "relative deploy path",
                Box::new(|s| s.deploy_path = "srv/app".into()),
            ),
            ("root deploy path", Box::new(|s| s.deploy_path = "/".into())),
            (
                "dotdot deploy path",
                Box::new(|s| s.deploy_path = "/srv/../etc".into()),
            ),
            (
                "escaping shared path",
                Box::new(|s| s.shared_paths = vec!["../x".into()]),
            ),
            (
                "absolute shared path",
                Box::new(|s| s.shared_paths = vec!["/etc/passwd".into()]),
            ),
            (
                "reserved shared path",
                Box::new(|s| s.shared_paths = vec![".sensei/".into()]),
            ),
            (
                "option-like ref",
                Box::new(|s| s.git_ref = "--upload-pack=touch /tmp/x".into()),
            ),
            (
                "ref with space",
                Box::new(|s| s.git_ref = "main; rm -rf /".into()),
            ),
            (
                "option-like repo",
                Box::new(|s| s.repo_url = "--config=x".into()),
            ),
            (
                "unauthenticated http repo",
                Box::new(|s| s.repo_url = "http://git.example.com/app.git".into()),
            ),
            (
                "git protocol repo",
                Box::new(|s| s.repo_url = "git://git.example.com/app.git".into()),
            ),
            (
                "remote helper repo",
                Box::new(|s| s.repo_url = "ext::sh -c touch% /tmp/pwned".into()),
            ),
            (
                "relative repo",
                Box::new(|s| s.repo_url = "../other".into()),
            ),
            (
                "bad env name",
                Box::new(|s| s.env = vec![("A-B".into(), "x".into())]),
            ),
            (
                "NUL in hook",
                Box::new(|s| s.hooks.build = vec!["a\0b".into()]),
            ),
            (
                "newline in path",
                Box::new(|s| s.deploy_path = "/srv/app\n".into()),
            ),
            ("bad release id", Box::new(|s| s.release_id = "../x".into())),
            ("keep zero", Box::new(|s| s.keep_releases = 0)),
        ];
        for (what, change) in cases {
            let mut s = spec();
            change(&mut s);
            assert!(deploy_script(&s, "j", "n").is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn parser_tells_markers_from_output_and_ignores_forgeries() {
        let p = OutputParser::new("n0nce");
        assert_eq!(
            p.parse("@@sensei:n0nce step build"),
            ScriptEvent::Step("build".into())
        );
        assert_eq!(
            p.parse("@@sensei:n0nce fail build build hook exited with status 2"),
            ScriptEvent::Fail {
                step: "build".into(),
                message: "build hook exited with status 2".into()
            }
        );
        assert_eq!(
            p.parse("@@sensei:n0nce switched r2 r1"),
            ScriptEvent::Switched {
                to: "r2".into(),
                from: Some("r1".into())
            }
        );
        // A hook printing a marker with another nonce is just a log line.
        assert_eq!(
            p.parse("@@sensei:guess done r9 deadbeef"),
            ScriptEvent::Log("@@sensei:guess done r9 deadbeef".into())
        );
    }

    #[test]
    fn verdicts() {
        let mut o = Outcome::default();
        o.feed(&ScriptEvent::Step("build".into()));
        assert_eq!(
            o.verdict(ScriptExit::Status(0)).expect_err("not done").0,
            "build"
        );
        assert!(o
            .verdict(ScriptExit::Killed)
            .expect_err("killed")
            .1
            .contains("killed"));
        o.feed(&ScriptEvent::Done {
            release: "r".into(),
            commit: "c".into(),
        });
        assert_eq!(o.verdict(ScriptExit::Status(0)), Ok(()));
        o.feed(&ScriptEvent::Fail {
            step: "post_switch".into(),
            message: "m".into(),
        });
        assert_eq!(
            o.verdict(ScriptExit::Status(1)),
            Err(("post_switch".into(), "m".into()))
        );
    }

    #[test]
    fn verdicts_of_odd_endings() {
        let mut o = Outcome::default();
        assert_eq!(
            o.verdict(ScriptExit::Status(3)),
            Err((
                "preflight".into(),
                "the deploy script exited with status 3".into()
            )),
            "a script that failed before its first step failed at preflight"
        );
        assert_eq!(
            o.verdict(ScriptExit::Cancelled),
            Err((String::new(), "cancelled".into()))
        );
        o.feed(&ScriptEvent::Step("build".into()));
        assert_eq!(
            o.verdict(ScriptExit::Cancelled),
            Err(("build".into(), "cancelled".into()))
        );
        // Cancelled after it said done: the runner stopped it, so it did not succeed.
        o.feed(&ScriptEvent::Done {
            release: "r".into(),
            commit: "c".into(),
        });
        assert!(o.verdict(ScriptExit::Cancelled).is_err());
        // A failure the script reported outranks a cancel.
        o.feed(&ScriptEvent::Fail {
            step: "build".into(),
            message: "build hook exited with status 2".into(),
        });
        assert_eq!(
            o.verdict(ScriptExit::Cancelled),
            Err(("build".into(), "build hook exited with status 2".into()))
        );
        assert_eq!(ScriptExit::from_status(Some(0)), ScriptExit::Status(0));
        assert_eq!(ScriptExit::from_status(None), ScriptExit::Killed);
    }

    #[test]
    fn nonces_are_lowercase_hex_of_the_random_bytes() {
        let n = run_nonce([0x00, 0x01, 0xab, 0xff, 0x10, 0, 0, 0, 0, 0, 0, 0x7e]);
        assert_eq!(n, "0001abff100000000000007e");
        assert_eq!(run_nonce([0xc3; NONCE_BYTES]).len(), 2 * NONCE_BYTES);
        // Every nonce is one the scripts accept.
        assert!(deploy_script(&spec(), "j", &n).is_ok());
    }

    #[test]
    fn script_for_picks_the_tasks_script() {
        let job_id = Uuid::from_u128(0x1234);
        let job = job_id.to_string();
        let deploy = JobTask::Deploy(spec());
        assert_eq!(
            script_for(&deploy, job_id, "n0nce"),
            deploy_script(&spec(), &job, "n0nce")
        );
        let back = RollbackSpec {
            deploy_path: "/srv/app".into(),
            to_release: Some("20270115080000-abc123".into()),
        };
        let rollback = script_for(&JobTask::Rollback(back.clone()), job_id, "n0nce");
        assert_eq!(rollback, rollback_script(&back, &job, "n0nce"));
        assert!(rollback.expect("script").contains("step rollback"));
        let forget = ForgetEnvSpec {
            deploy_path: "/srv/app".into(),
        };
        let script = script_for(&JobTask::ForgetEnv(forget.clone()), job_id, "n0nce");
        assert_eq!(script, forget_env_script(&forget, &job, "n0nce"));
        assert!(script.expect("script").contains(&format!("JOB='{job}'")));
        // Refusals are the task's script's own.
        let mut bad = spec();
        bad.deploy_path = "relative".into();
        assert_eq!(
            script_for(&JobTask::Deploy(bad.clone()), job_id, "n0nce"),
            deploy_script(&bad, &job, "n0nce")
        );
        assert!(script_for(&deploy, job_id, "not a nonce").is_err());
    }

    #[test]
    fn script_output_turns_bytes_into_log_lines_and_an_outcome() {
        let mut out = ScriptOutput::new("n0nce");
        // A marker split across reads, output on both streams, a forged marker.
        assert_eq!(out.read(OutputStream::Stdout, b"@@sensei:n0nce st"), vec![]);
        assert_eq!(
            out.read(
                OutputStream::Stdout,
                b"ep build\ncompiling\n@@sensei:guess done r9 c\n"
            ),
            vec![
                LogLine {
                    stream: 0,
                    text: "==> build".into()
                },
                LogLine {
                    stream: 1,
                    text: "compiling".into()
                },
                LogLine {
                    stream: 1,
                    text: "@@sensei:guess done r9 c".into()
                },
            ]
        );
        assert_eq!(
            out.read(OutputStream::Stderr, b"warning: old\n"),
            vec![LogLine {
                stream: 2,
                text: "warning: old".into()
            }]
        );
        assert_eq!(out.outcome().step.as_deref(), Some("build"));
        assert!(!out.outcome().done, "a forged marker is not an event");
        // A marker on standard error is an event too, and a last line without a newline is
        // kept when its stream ends.
        assert_eq!(
            out.read(
                OutputStream::Stderr,
                b"@@sensei:n0nce fail build build hook exited with status 2"
            ),
            vec![]
        );
        assert_eq!(out.end(OutputStream::Stdout), vec![]);
        assert_eq!(
            out.end(OutputStream::Stderr),
            vec![LogLine {
                stream: 0,
                text: "FAILED at build: build hook exited with status 2".into()
            }]
        );
        assert_eq!(
            out.into_outcome().failure,
            Some(("build".into(), "build hook exited with status 2".into()))
        );
    }

    #[test]
    fn job_results_from_runs() {
        use crate::protocol::JobResult;
        let mut out = ScriptOutput::new("n0nce");
        out.read(
            OutputStream::Stdout,
            concat!(
                "@@sensei:n0nce step switch\n",
                "@@sensei:n0nce switched 20270115080000-abc123 none\n",
                "@@sensei:n0nce done 20270115080000-abc123 0123abcd\n",
            )
            .as_bytes(),
        );
        let done = out.into_outcome();
        assert_eq!(
            JobResult::from_run(&done, ScriptExit::Status(0)),
            JobResult {
                succeeded: true,
                release_id: Some("20270115080000-abc123".into()),
                commit: Some("0123abcd".into()),
                error: None,
            }
        );
        // The release and commit a run got to are kept, whatever ended it.
        assert_eq!(
            JobResult::from_run(&done, ScriptExit::Status(1)),
            JobResult {
                succeeded: false,
                release_id: Some("20270115080000-abc123".into()),
                commit: Some("0123abcd".into()),
                error: Some((
                    "switch".into(),
                    "the deploy script exited with status 1".into()
                )),
            }
        );
        // A job that makes no release says `-`: no release, no commit.
        let mut out = ScriptOutput::new("n0nce");
        out.read(OutputStream::Stdout, b"@@sensei:n0nce done - -\n");
        assert_eq!(
            JobResult::from_run(out.outcome(), ScriptExit::Status(0)),
            JobResult {
                succeeded: true,
                release_id: None,
                commit: None,
                error: None,
            }
        );
        assert_eq!(
            JobResult::from_run(&Outcome::default(), ScriptExit::Cancelled),
            JobResult::failed("", "cancelled")
        );
    }
}
