//! Test support, behind the `test-server` feature: a real S3-protocol server on loopback
//! ([`S3TestServer`]) and the conformance suite every store must pass ([`conformance`]).

pub mod conformance;
mod s3_server;

pub use s3_server::{ACCESS_KEY_ID, REGION, S3TestServer, SECRET_ACCESS_KEY, TestServerError, python_path};
