//! Generated protobuf types and gRPC stubs.
//!
//! `csce438` is the course protocol, kept wire-compatible; `internal` holds
//! our own services and records. Nothing generated is committed: `build.rs`
//! compiles the `.proto` files with protox on every build.

/// The course protocol (package `csce438`).
pub mod csce438 {
    tonic::include_proto!("csce438");
}

/// Tiny SNS's own services and records (package `tinysns.internal.v1`).
pub mod internal {
    tonic::include_proto!("tinysns.internal.v1");
}

pub mod backoff;
pub mod rules;

pub use prost;
pub use prost_types;
