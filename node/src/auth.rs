//! The deployment's secret: who may steer the deployment, and whose events
//! it applies.
//!
//! Two planes share the nodes' ports. Client calls (`SNSService`, the
//! coordinator's `GetServer` family, the gateway) are open, as the course
//! protocol has no credentials. Node-to-node calls — heartbeats and
//! registration, `CoordAdmin`, `Replica` — carry a token derived from the
//! deployment's secret (`authorization: Bearer <token>`), checked on every
//! call: without it `UNAUTHENTICATED`, with a wrong one `PERMISSION_DENIED`,
//! and nothing changes. Events between clusters carry a MAC keyed by
//! another derivation of the secret ([`Secret::seal`]): a receiver applies
//! none whose MAC fails.
//!
//! Both are derived (HMAC-SHA256 of the secret with a fixed label), so
//! the secret itself never travels: someone who reads the token off an
//! unencrypted link can call node APIs until the secret is changed, but
//! cannot forge events. TLS between nodes closes that; see the README's
//! threat model.
//!
//! A node started without a secret (the course's hand-run style) neither
//! sends nor checks anything. The secret comes from a file
//! (`--secret-file`, `SNS_SECRET_FILE`) or the environment (`SNS_SECRET`),
//! never from a command line, and is never logged (its `Debug` is
//! redacted).

use crate::error::{Error, Result};
use ring::hmac;
use std::path::Path;
use std::sync::Arc;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

/// Shortest secret accepted: 128 bits of a random hex string.
const MIN_SECRET_BYTES: usize = 32;

/// The metadata key the token travels in.
const AUTHORIZATION: &str = "authorization";

/// The deployment's secret, as the keys derived from it.
#[derive(Clone)]
pub struct Secret {
    /// `Bearer <hex token>`, the value of the authorization header.
    bearer: Arc<str>,
    /// Keys the MAC of events between clusters.
    events: hmac::Key,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    /// The keys of `raw` (surrounding whitespace ignored, so a file with a
    /// trailing newline works).
    pub fn from_text(raw: &str) -> Result<Secret> {
        let raw = raw.trim();
        if raw.len() < MIN_SECRET_BYTES {
            return Err(Error::Config(format!(
                "the deployment secret is {} bytes long; use at least {MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)",
                raw.len()
            )));
        }
        let master = hmac::Key::new(hmac::HMAC_SHA256, raw.as_bytes());
        let derive = |label: &[u8]| hmac::sign(&master, label);
        let token = hex(derive(b"tinysns node token v1").as_ref());
        let events = hmac::Key::new(hmac::HMAC_SHA256, derive(b"tinysns event mac v1").as_ref());
        Ok(Secret { bearer: format!("Bearer {token}").into(), events })
    }

    /// Reads the secret from `file`, else from the `SNS_SECRET` variable;
    /// None when neither is set.
    pub fn load(file: Option<&Path>) -> Result<Option<Secret>> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("cannot read the secret file {}: {e}", path.display())))?;
            return Secret::from_text(&text).map(Some);
        }
        match std::env::var("SNS_SECRET") {
            Ok(text) if !text.is_empty() => Secret::from_text(&text).map(Some),
            _ => Ok(None),
        }
    }

    /// A new random secret, as text (64 hex digits).
    pub fn generate() -> Result<String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| Error::Other(format!("no randomness for a secret: {e}")))?;
        Ok(hex(&bytes))
    }

    /// The MAC of an event message's body.
    pub fn seal(&self, body: &[u8]) -> Vec<u8> {
        hmac::sign(&self.events, body).as_ref().to_vec()
    }

    /// Whether `mac` is the MAC of `body` (in constant time).
    pub fn opens(&self, body: &[u8], mac: &[u8]) -> bool {
        hmac::verify(&self.events, body, mac).is_ok()
    }

    /// The value of a broker message's [`MAC_HEADER`]: the hex MAC of its
    /// AMQP type and body, so that neither can be swapped.
    pub fn seal_message(&self, kind: &str, body: &[u8]) -> String {
        hex(&self.seal(&[kind.as_bytes(), &[0], body].concat()))
    }

    /// Whether `mac` (hex, from [`MAC_HEADER`]) seals a message of type
    /// `kind` and body `body`.
    pub fn opens_message(&self, kind: &str, body: &[u8], mac: &str) -> bool {
        unhex(mac).is_some_and(|mac| self.opens(&[kind.as_bytes(), &[0], body].concat(), &mac))
    }
}

/// The broker message header carrying an event message's MAC.
pub const MAC_HEADER: &str = "x-sns-mac";

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a new secret to `path` (mode 0600) unless the file exists;
/// returns the secret in the file.
pub fn ensure_secret_file(path: &Path) -> Result<Secret> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if !path.exists() {
        let text = Secret::generate()?;
        let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
        match created {
            Ok(mut f) => {
                f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))?;
            }
            // Someone else made it meanwhile: theirs wins.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Secret::load(Some(path))?.ok_or_else(|| Error::Config(format!("no secret in {}", path.display())))
}

/// Client side: adds the deployment's token to every call (nothing when
/// the node has no secret).
#[derive(Clone, Debug, Default)]
pub struct Attach(Option<Secret>);

impl Attach {
    pub fn new(secret: Option<Secret>) -> Attach {
        Attach(secret)
    }
}

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(s) = &self.0 {
            let value: MetadataValue<_> =
                s.bearer.parse().map_err(|_| Status::internal("the deployment token is not a header value"))?;
            req.metadata_mut().insert(AUTHORIZATION, value);
        }
        Ok(req)
    }
}

/// Server side: refuses node-to-node calls without the deployment's token
/// (accepts everything when the node has no secret).
#[derive(Clone, Debug, Default)]
pub struct Check(Option<Secret>);

impl Check {
    pub fn new(secret: Option<Secret>) -> Check {
        Check(secret)
    }

    /// Ok when `metadata` carries the token, or no secret is configured.
    pub fn verify(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(s) = &self.0 else { return Ok(()) };
        match metadata.get(AUTHORIZATION).map(|v| v.to_str()) {
            None => Err(Status::unauthenticated(
                "node-to-node call without the deployment's token: configure the deployment secret (SNS_SECRET_FILE)",
            )),
            Some(Ok(v)) if constant_time_eq(v.as_bytes(), s.bearer.as_bytes()) => Ok(()),
            Some(_) => Err(Status::permission_denied("node-to-node call with a token of another deployment")),
        }
    }
}

impl tonic::service::Interceptor for Check {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.verify(req.metadata())?;
        Ok(req)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    const S: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn short_secrets_are_refused_with_how_to_make_one() {
        let e = Secret::from_text("short").unwrap_err().to_string();
        assert!(e.contains("at least 32") && e.contains("/dev/urandom"), "{e}");
        assert!(Secret::from_text(&format!("  {S}\n")).is_ok(), "whitespace around the secret is ignored");
    }

    #[test]
    fn the_token_checks_and_the_secret_never_travels() {
        let s = Secret::from_text(S).unwrap();
        let mut req = Attach::new(Some(s.clone())).call(Request::new(())).unwrap();
        let header = req.metadata().get(AUTHORIZATION).unwrap().to_str().unwrap().to_string();
        assert!(!header.contains(S), "the secret itself is not sent");
        assert!(Check::new(Some(s.clone())).verify(req.metadata()).is_ok());
        // Another deployment's token is denied, none is unauthenticated.
        let other = Secret::from_text(&S.replace('0', "9")).unwrap();
        let denied = Check::new(Some(other)).verify(req.metadata()).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        req.metadata_mut().remove(AUTHORIZATION);
        let missing = Check::new(Some(s)).verify(req.metadata()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        // Without a secret nothing is required.
        assert!(Check::new(None).verify(req.metadata()).is_ok());
    }

    #[test]
    fn event_macs_bind_key_and_body() {
        let s = Secret::from_text(S).unwrap();
        let mac = s.seal(b"events");
        assert!(s.opens(b"events", &mac));
        assert!(!s.opens(b"eventz", &mac), "another body");
        assert!(!s.opens(b"events", &mac[1..]), "a cut MAC");
        let other = Secret::from_text(&S.replace('a', "b")).unwrap();
        assert!(!other.opens(b"events", &mac), "another deployment's key");
        assert_ne!(mac, hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, S.as_bytes()), b"events").as_ref());
    }

    #[test]
    fn a_secret_file_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let a = ensure_secret_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = ensure_secret_file(&path).unwrap();
        assert_eq!(a.bearer, b.bearer, "an existing secret is kept");
        assert_eq!(format!("{a:?}"), "Secret(redacted)");
    }
}
