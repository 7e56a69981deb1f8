//! Command-line flags of `tsc`.
//!
//! The course's flags are kept: `-h` is the coordinator host, so clap's own
//! `-h` help flag is disabled and help lives on `--help` only.

use std::error::Error as _;
use std::fmt;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::session::{Config, Timing};

/// tsc: the Tiny SNS command-line client.
#[derive(Debug, Parser)]
#[command(name = "tsc", version, disable_help_flag = true)]
pub struct Args {
    /// Coordinator host.
    #[arg(short = 'h', long = "host", env = "SNS_COORD_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Coordinator port.
    #[arg(short = 'k', long = "port", env = "SNS_COORD_PORT", default_value_t = 9000)]
    pub port: u16,

    /// Your user id (a positive integer).
    // Hyphen values are accepted so that `-u -3` is reported as a bad user id
    // rather than as an unknown flag.
    #[arg(short = 'u', long = "user", env = "SNS_USER", value_parser = parse_user_id, allow_hyphen_values = true)]
    pub user: u32,

    /// Talk to the servers through the coordinator (started with
    /// `--gateway`), e.g. through `kubectl port-forward`, when the server
    /// addresses it hands out cannot be reached from here.
    #[arg(long, env = "SNS_GATEWAY")]
    pub gateway: bool,

    /// Talk TLS to the coordinator and the servers.
    #[arg(long, env = "SNS_TLS")]
    pub tls: bool,

    /// PEM CA certificate the deployment's certificates are checked
    /// against (with --tls; default: the system's roots).
    #[arg(long, env = "SNS_TLS_CA_FILE", requires = "tls")]
    pub ca: Option<std::path::PathBuf>,

    /// How long to look for another server when ours is lost before giving
    /// up (`connection failed: -1`), e.g. `30s`, `2m`.
    #[arg(long, env = "SNS_RECONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub reconnect_timeout: Duration,

    /// Print help.
    #[arg(long = "help", action = ArgAction::Help)]
    help: Option<bool>,
}

impl Args {
    /// The session configuration these flags describe, with default timing.
    pub fn into_config(self) -> Result<Config, String> {
        let tls = match (self.tls, &self.ca) {
            (false, _) => None,
            (true, None) => Some(tonic::transport::ClientTlsConfig::new().with_native_roots()),
            (true, Some(path)) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the CA certificate {}: {e}", path.display()))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!("{} holds no PEM certificate", path.display()));
                }
                Some(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                )
            }
        };
        Ok(Config {
            coord_host: self.host,
            coord_port: self.port,
            user: self.user,
            gateway: self.gateway,
            timing: Timing { failover: self.reconnect_timeout, ..Timing::default() },
            tls,
        })
    }
}

/// A user id that is not a positive integer fitting `u32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUserId(String);

impl fmt::Display for InvalidUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid user id '{}': must be a positive integer", self.0)
    }
}

impl std::error::Error for InvalidUserId {}

/// Parses a user id by the protocol's one rule (`sns_proto::rules`), the
/// server's too, so a client never logs in as a user the server would
/// refuse.
pub fn parse_user_id(text: &str) -> Result<u32, InvalidUserId> {
    // Only an echo of the value is bounded, so a huge argument cannot flood
    // the terminal.
    sns_proto::rules::parse_user(text).ok_or_else(|| InvalidUserId(text.chars().take(64).collect()))
}

/// Parses the process's arguments, or exits: 0 after `--help`/`--version`,
/// 2 on a usage error. A bad user id gets a one-line message of its own
/// (`tsc: invalid user id 'abc': must be a positive integer`) instead of
/// clap's generic "invalid value" wording.
pub fn parse_args() -> Config {
    match Args::try_parse() {
        Ok(args) => args.into_config().unwrap_or_else(|e| {
            eprintln!("tsc: {e}");
            std::process::exit(2)
        }),
        Err(err) => {
            if let Some(bad) = err.source().and_then(|e| e.downcast_ref::<InvalidUserId>()) {
                eprintln!("tsc: {bad}");
                std::process::exit(2);
            }
            err.exit()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use clap::Parser;

    use super::*;

    #[test]
    fn user_ids_are_canonical_positive_integers_that_fit_31_bits() {
        assert_eq!(parse_user_id("1"), Ok(1));
        assert_eq!(parse_user_id("42"), Ok(42));
        assert_eq!(parse_user_id("2147483647"), Ok(2_147_483_647));
        for bad in ["abc", "0", "00", "007", "-3", "+3", "../x", "2147483648", "", " 1", "1 ", "1.5"] {
            assert!(parse_user_id(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn the_error_names_the_bad_value() {
        let Err(err) = parse_user_id("abc") else { panic!("abc accepted") };
        assert_eq!(err.to_string(), "invalid user id 'abc': must be a positive integer");
    }

    #[test]
    fn course_flags_parse() {
        let args = Args::try_parse_from(["tsc", "-h", "10.0.0.5", "-k", "9100", "-u", "7"]);
        let Ok(args) = args else { panic!("rejected: {args:?}") };
        assert_eq!((args.host.as_str(), args.port, args.user), ("10.0.0.5", 9100, 7));
        let args = Args::try_parse_from(["tsc", "--host", "coord", "--port", "1", "--user", "3"]);
        let Ok(args) = args else { panic!("rejected: {args:?}") };
        assert_eq!((args.host.as_str(), args.port, args.user), ("coord", 1, 3));
    }

    #[test]
    fn bad_user_ids_reach_the_user_id_check() {
        // `-3` and `../x` must be judged as user ids, not as flags or paths.
        for bad in ["abc", "0", "-3", "../x", "4294967296"] {
            let err = match Args::try_parse_from(["tsc", "-u", bad]) {
                Ok(args) => panic!("{bad:?} accepted as {args:?}"),
                Err(err) => err,
            };
            let source = err.source().and_then(|e| e.downcast_ref::<InvalidUserId>());
            assert!(source.is_some(), "{bad:?}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn reconnect_timeout_is_a_duration() {
        let Ok(args) = Args::try_parse_from(["tsc", "-u", "1", "--reconnect-timeout", "2s"]) else { panic!() };
        assert_eq!(args.into_config().unwrap().timing.failover, Duration::from_secs(2));
        let Ok(args) = Args::try_parse_from(["tsc", "-u", "1"]) else { panic!() };
        assert_eq!(args.into_config().unwrap().timing.failover, Timing::default().failover);
        assert!(Args::try_parse_from(["tsc", "-u", "1", "--reconnect-timeout", "soon"]).is_err());
    }

    #[test]
    fn version_is_offered() {
        let Err(err) = Args::try_parse_from(["tsc", "--version"]) else { panic!("no version") };
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert!(err.to_string().contains(env!("CARGO_PKG_VERSION")), "{err}");
    }

    #[test]
    fn help_is_long_only() {
        let Err(err) = Args::try_parse_from(["tsc", "--help"]) else { panic!("no help") };
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        let err = Args::try_parse_from(["tsc", "-h"]).err();
        assert!(err.is_some_and(|e| e.kind() != clap::error::ErrorKind::DisplayHelp));
    }
}
