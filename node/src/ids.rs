//! User ids, cluster assignment and synchronizer pairing: the arithmetic
//! every component must agree on.

use std::fmt;

/// A user id: a positive integer. Text that is not one (`abc`, `0`, `-1`,
/// `../../etc`) never becomes a user, a file name or a broker key.
pub type UserId = u32;

/// Why a user id was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUserId(pub String);

impl fmt::Display for InvalidUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid user id {:?}: must be a positive integer", self.0)
    }
}

impl std::error::Error for InvalidUserId {}

/// Parses a user id by the protocol's one rule (`sns_proto::rules`).
pub fn parse_user(text: &str) -> Result<UserId, InvalidUserId> {
    sns_proto::rules::parse_user(text).ok_or_else(|| InvalidUserId(text.chars().take(64).collect()))
}

/// The cluster (1-based) that owns user `user` among `clusters` clusters:
/// `((u - 1) mod N) + 1`. Synchronizer ids follow the same rule.
pub fn cluster_of(user: u32, clusters: u32) -> u32 {
    debug_assert!(user > 0 && clusters > 0);
    (user.saturating_sub(1)) % clusters.max(1) + 1
}

/// The id of the synchronizer that works beside server `server` of cluster
/// `cluster`: ids 1..=N pair with server 1 of clusters 1..=N, ids N+1..=2N
/// with server 2, and so on. So `cluster_of(sync_id, N) == cluster`.
pub fn sync_id(cluster: u32, server: u32, clusters: u32) -> u32 {
    (server - 1) * clusters + cluster
}

/// Inverse of [`sync_id`]: (cluster, paired server id) of synchronizer `id`.
pub fn sync_pairing(id: u32, clusters: u32) -> (u32, u32) {
    (cluster_of(id, clusters), (id - 1) / clusters + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_positive_integers_only() {
        assert_eq!(parse_user("1"), Ok(1));
        assert_eq!(parse_user("2147483647"), Ok(i32::MAX as u32));
        for bad in
            ["", "0", "00", "007", "-1", "+1", " 1", "1 ", "abc", "../../etc", "2147483648", "1e3", "99999999999"]
        {
            assert!(parse_user(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn users_map_round_robin_to_clusters() {
        let got: Vec<u32> = (1..=7).map(|u| cluster_of(u, 3)).collect();
        assert_eq!(got, vec![1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(cluster_of(5, 1), 1);
    }

    #[test]
    fn synchronizer_ids_pair_with_servers() {
        assert_eq!(sync_id(2, 1, 3), 2);
        assert_eq!(sync_id(2, 2, 3), 5);
        for id in 1..=6 {
            let (c, s) = sync_pairing(id, 3);
            assert_eq!(sync_id(c, s, 3), id);
            assert_eq!(cluster_of(id, 3), c);
        }
    }
}
