//! How rank 0's bytes (NCCL's unique id) reach every rank: [`Rendezvous`]. [`Tcp`] is a minimal
//! TCP rendezvous for launches without the coordinator: rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT` and hands the same bytes to every other rank. A coordinator's
//! workers publish and fetch them through the coordinator instead (effnet-cli's worker).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"EFFNETRV";

/// The most bytes a rendezvous carries (NCCL's unique id is 128): a peer's length field is
/// checked against it before anything is allocated.
pub const LIMIT: usize = 4096;

/// Delivers rank 0's bytes to every rank of the world.
pub trait Rendezvous: Send + Sync + std::fmt::Debug {
    /// Rank 0 passes `Some(bytes)` and returns them once every rank can have them (or has
    /// them); the others pass `None` and get rank 0's, all within `timeout`.
    fn share(
        &self,
        rank: usize,
        world_size: usize,
        bytes: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>>;
    /// Where the bytes travel, for messages.
    fn address(&self) -> String;
}

/// The TCP rendezvous at `MASTER_ADDR:MASTER_PORT` ([`share`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub address: String,
}

impl Tcp {
    /// At `MASTER_ADDR:MASTER_PORT` ([`address_from_env`]).
    pub fn from_env() -> Tcp {
        Tcp { address: address_from_env() }
    }
}

impl Rendezvous for Tcp {
    fn share(
        &self,
        rank: usize,
        world_size: usize,
        bytes: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        share(&self.address, rank, world_size, bytes, timeout)
    }

    fn address(&self) -> String {
        self.address.clone()
    }
}

/// `MASTER_ADDR:MASTER_PORT`, defaulting to `127.0.0.1:29500` (torchrun's default port).
pub fn address_from_env() -> String {
    let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("MASTER_PORT").unwrap_or_else(|_| "29500".into());
    format!("{host}:{port}")
}

fn error(address: &str, reason: impl Into<String>) -> Error {
    Error::Rendezvous { address: address.to_string(), reason: reason.into() }
}

/// Rank 0 passes `Some(bytes)` and serves them to the `world_size - 1` other ranks; the others
/// pass `None` and receive them. Everything happens within `timeout`.
pub fn share(
    address: &str,
    rank: usize,
    world_size: usize,
    bytes: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    match bytes {
        Some(bytes) => {
            serve(address, world_size, bytes, deadline)?;
            Ok(bytes.to_vec())
        }
        None => fetch(address, rank, deadline),
    }
}

fn serve(address: &str, world_size: usize, bytes: &[u8], deadline: Instant) -> Result<()> {
    let listener = TcpListener::bind(address).map_err(|e| error(address, format!("cannot listen: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| error(address, e.to_string()))?;
    let mut served = std::collections::BTreeSet::new();
    while served.len() + 1 < world_size {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| error(address, e.to_string()))?;
                stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue; // not one of ours
                }
                let peer = u64::from_le_bytes(hello[8..].try_into().unwrap_or_default()) as usize;
                let mut reply = Vec::with_capacity(16 + bytes.len());
                reply.extend_from_slice(MAGIC);
                reply.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                reply.extend_from_slice(bytes);
                stream.write_all(&reply).map_err(|e| error(address, format!("rank {peer}: {e}")))?;
                served.insert(peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(error(
                        address,
                        format!(
                            "only {} of {} ranks arrived before the timeout",
                            served.len() + 1,
                            world_size
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(error(address, e.to_string())),
        }
    }
    Ok(())
}

fn fetch(address: &str, rank: usize, deadline: Instant) -> Result<Vec<u8>> {
    let target = address
        .to_socket_addrs()
        .map_err(|e| error(address, format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| error(address, "resolves to no address"))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(error(address, format!("rank {rank}: rank 0 did not answer before the timeout")));
        }
        let attempt =
            TcpStream::connect_timeout(&target, left.min(Duration::from_secs(1))).and_then(|mut stream| {
                stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let mut hello = Vec::with_capacity(16);
                hello.extend_from_slice(MAGIC);
                hello.extend_from_slice(&(rank as u64).to_le_bytes());
                stream.write_all(&hello)?;
                let mut header = [0u8; 16];
                stream.read_exact(&mut header)?;
                if &header[..8] != MAGIC {
                    return Err(std::io::Error::other("not an effnet rendezvous"));
                }
                let len = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
                if len > LIMIT as u64 {
                    return Err(std::io::Error::other(format!(
                        "not an effnet rendezvous: it announces {len} bytes (at most {LIMIT})"
                    )));
                }
                let mut bytes = vec![0u8; len as usize];
                stream.read_exact(&mut bytes)?;
                Ok(bytes)
            });
        match attempt {
            Ok(bytes) => return Ok(bytes),
            Err(e) if e.to_string().starts_with("not an effnet rendezvous") => {
                return Err(error(address, e.to_string()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_address() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[test]
    fn every_rank_receives_rank_zeros_bytes() {
        let address = free_address();
        let payload: Vec<u8> = (0..128u8).collect();
        let peers: Vec<_> = (1..4)
            .map(|rank| {
                let address = address.clone();
                std::thread::spawn(move || share(&address, rank, 4, None, Duration::from_secs(10)).unwrap())
            })
            .collect();
        let served = share(&address, 0, 4, Some(&payload), Duration::from_secs(10)).unwrap();
        assert_eq!(served, payload);
        for peer in peers {
            assert_eq!(peer.join().unwrap(), payload);
        }
    }

    #[test]
    fn missing_ranks_time_out_with_a_count() {
        let address = free_address();
        let error = share(&address, 0, 3, Some(b"id"), Duration::from_millis(300)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("rendezvous at {address}: only 1 of 3 ranks arrived before the timeout")
        );
        let error = share(&address, 1, 3, None, Duration::from_millis(300)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("rendezvous at {address}: rank 1: rank 0 did not answer before the timeout")
        );
    }

    #[test]
    fn a_peer_announcing_a_huge_blob_is_refused_before_allocating() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let liar = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut hello = [0u8; 16];
            stream.read_exact(&mut hello).unwrap();
            let mut reply = MAGIC.to_vec();
            reply.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
            stream.write_all(&reply).unwrap();
        });
        let error = share(&address, 1, 2, None, Duration::from_secs(10)).unwrap_err();
        liar.join().unwrap();
        let text = error.to_string();
        assert!(text.contains("announces 9223372036854775807 bytes (at most 4096)"), "{text}");
    }
}
