//! The deployment secret the suites' launchers run with: one per test
//! process, in a file of its own, so that the suites' node-to-node calls
//! (`CoordAdmin.Table`, `Replica.Status`, ...) carry the token the nodes
//! check, as the nodes' own calls do.

use sns_node::auth::{Attach, Secret, ensure_secret_file};
use sns_node::net::NodeChannel;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Shared {
    _dir: tempfile::TempDir,
    path: PathBuf,
    secret: Secret,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a directory for the test secret");
        let path = dir.path().join("secret");
        let secret = ensure_secret_file(&path).expect("a test secret");
        Shared { _dir: dir, path, secret }
    })
}

/// The file the launchers are given with `--secret-file`.
pub fn file() -> &'static Path {
    &shared().path
}

/// The secret itself.
pub fn secret() -> Secret {
    shared().secret.clone()
}

/// Adds the deployment's token to a call.
pub fn attach() -> Attach {
    Attach::new(Some(secret()))
}

/// A lazily connecting node-to-node channel to `host:port`, with the token.
pub fn channel(host: &str, port: &str) -> anyhow::Result<NodeChannel> {
    Ok(sns_node::net::node_channel(host, port, &attach())?)
}

/// Headers that seal a broker message of type `kind` and body `body` with
/// `secret` (this process's deployments' when None), as a synchronizer
/// does.
pub fn sealed(kind: &str, body: &[u8], secret: Option<&Secret>) -> lapin::types::FieldTable {
    let owned;
    let secret = match secret {
        Some(s) => s,
        None => {
            owned = self::secret();
            &owned
        }
    };
    let mut headers = lapin::types::FieldTable::default();
    let mac = secret.seal_message(kind, body);
    headers.insert(sns_node::auth::MAC_HEADER.into(), lapin::types::AMQPValue::LongString(mac.into()));
    headers
}
