//! What travels between nodes: protocol ids, topics and the CBOR messages of the mesh's own
//! protocols.
//!
//! Every message is a CBOR map decoded with serde *without* `deny_unknown_fields`, and every
//! field has a default: a node ignores fields added by a newer version and tolerates fields a
//! older version leaves out, so adjacent versions coexist in one mesh. A change that breaks
//! this rule gets a new protocol id (`.../2`), which libp2p negotiates per stream.

use libp2p::{Multiaddr, StreamProtocol};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::MeshError;

/// Admission handshake (request-response, CBOR).
pub const ADMISSION_PROTOCOL: StreamProtocol = StreamProtocol::new("/beemesh/admission/1");
/// Generic request-response for the node's protocols (CBOR envelope carrying the protocol name).
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/beemesh/rpc/1");
/// Kademlia DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/beemesh/kad/1");
/// Gossipsub (v1.1 semantics under a BeeMesh protocol id).
pub const GOSSIP_PROTOCOL: &str = "/beemesh/gossip/1";
/// Sent as identify's `protocol_version` (the identify stream id itself is libp2p's standard
/// `/ipfs/id/1.0.0`, which libp2p does not let an application rename).
pub const IDENTIFY_VERSION: &str = "/beemesh/id/1";
/// Membership announcements.
pub const ANNOUNCE_TOPIC: &str = "/beemesh/announce/1";

/// Most listen addresses carried in one announcement.
pub(crate) const MAX_ANNOUNCED_ADDRS: usize = 16;
/// Largest encoded multiaddr accepted from a peer.
const MAX_ADDR_BYTES: usize = 256;
/// Longest protocol or topic name.
pub(crate) const MAX_NAME_LEN: usize = 200;

/// A node's introduction: its admission ticket, the proof that it holds it, and its current
/// announcement. Sent as the admission request and reply (to a directly connected peer) and
/// published on [`ANNOUNCE_TOPIC`] (where gossipsub's signature binds it to its author).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// The ticket file's TOML bytes: public (a fleet ticket's secret key never travels).
    #[serde(default, with = "serde_bytes")]
    pub ticket: Vec<u8>,
    /// The proof of holding a fleet ticket's key for this very presentation (see
    /// [`beemesh_manifest::ticket::Presentation`]): request, reply (covering the requester's
    /// `nonce`) or announcement. Empty with a peer ticket.
    #[serde(default, with = "serde_bytes")]
    pub proof: Vec<u8>,
    /// In an admission request only: fresh random bytes that the reply's proof must cover.
    #[serde(default, with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Increases with every announcement of the sender (starts at its clock in milliseconds),
    /// so a replayed old announcement is recognised.
    #[serde(default)]
    pub seq: u64,
    /// Opaque payload the node sets (name, labels, capacity...).
    #[serde(default, with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The sender's listen addresses, as multiaddr bytes (unknown protocols are skipped).
    #[serde(default)]
    pub addrs: Vec<ByteBuf>,
}

impl Hello {
    pub(crate) fn set_addrs<'a>(&mut self, addrs: impl IntoIterator<Item = &'a Multiaddr>) {
        self.addrs = addrs
            .into_iter()
            .take(MAX_ANNOUNCED_ADDRS)
            .map(|a| ByteBuf::from(a.to_vec()))
            .collect();
    }

    /// The addresses that parse; anything else (too long, unknown protocol) is skipped.
    pub(crate) fn parsed_addrs(&self) -> Vec<Multiaddr> {
        self.addrs
            .iter()
            .take(MAX_ANNOUNCED_ADDRS)
            .filter(|b| b.len() <= MAX_ADDR_BYTES)
            .filter_map(|b| Multiaddr::try_from(b.to_vec()).ok())
            .collect()
    }
}

/// The answer to an admission request: the responder's own [`Hello`] when the requester's
/// ticket was accepted, otherwise the reason it was refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HelloReply {
    #[serde(default)]
    pub hello: Option<Hello>,
    #[serde(default)]
    pub refused: Option<String>,
}

/// A request on [`RPC_PROTOCOL`]: the node-level protocol name (e.g. `/beemesh/sync/1`) and its
/// opaque bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RpcRequest {
    #[serde(default)]
    pub protocol: String,
    #[serde(default, with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The answer on [`RPC_PROTOCOL`]: bytes, or an error text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RpcResponse {
    #[serde(default, with = "serde_bytes")]
    pub data: Vec<u8>,
    #[serde(default)]
    pub error: Option<String>,
}

impl RpcResponse {
    pub(crate) fn error(reason: impl Into<String>) -> Self {
        Self {
            data: Vec::new(),
            error: Some(reason.into()),
        }
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain structs of bytes, strings and integers into a Vec cannot fail except on
    // allocation failure.
    cbor4ii::serde::to_vec(Vec::new(), value).unwrap_or_default()
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    cbor4ii::serde::from_slice(bytes).map_err(|e| format!("malformed message: {e}"))
}

/// Checks that `name` is a versioned BeeMesh protocol or topic name: `/beemesh/` followed by
/// one or more segments of `[A-Za-z0-9._-]`, the last being a version number.
pub fn check_versioned_name(name: &str) -> Result<(), MeshError> {
    let bad = || MeshError::BadName {
        name: name.chars().take(MAX_NAME_LEN).collect(),
    };
    if name.len() > MAX_NAME_LEN {
        return Err(bad());
    }
    let rest = name.strip_prefix("/beemesh/").ok_or_else(bad)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (version, names) = segments.split_last().ok_or_else(bad)?;
    let segment_ok = |s: &&str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if names.is_empty() || !names.iter().all(segment_ok) {
        return Err(bad());
    }
    if version.is_empty() || version.len() > 9 || !version.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_names() {
        for good in [
            "/beemesh/sync/1",
            "/beemesh/manifests/1",
            "/beemesh/state/default/web-1/1",
            "/beemesh/raft.v/12",
        ] {
            assert!(check_versioned_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/beemesh/",
            "/beemesh/1",
            "/beemesh/sync",
            "/beemesh/sync/v1",
            "/beemesh//1",
            "/other/sync/1",
            "beemesh/sync/1",
            "/beemesh/sy nc/1",
            "/beemesh/sync/1/",
        ] {
            let e = check_versioned_name(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(check_versioned_name(&format!("/beemesh/{}/1", "a".repeat(300))).is_err());
        for name in [
            ADMISSION_PROTOCOL.as_ref(),
            RPC_PROTOCOL.as_ref(),
            KAD_PROTOCOL.as_ref(),
        ] {
            assert!(check_versioned_name(name).is_ok(), "{name}");
        }
        assert!(check_versioned_name(GOSSIP_PROTOCOL).is_ok());
        assert!(check_versioned_name(IDENTIFY_VERSION).is_ok());
        assert!(check_versioned_name(ANNOUNCE_TOPIC).is_ok());
    }

    /// A newer node's message, with fields this version does not know.
    #[derive(Serialize)]
    struct FutureHello {
        ticket: ByteBuf,
        seq: u64,
        payload: ByteBuf,
        addrs: Vec<ByteBuf>,
        region: String,
        weights: Vec<Vec<u32>>,
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_default() {
        let addr: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().expect("addr");
        let future = FutureHello {
            ticket: ByteBuf::from(b"t".to_vec()),
            seq: 7,
            payload: ByteBuf::from(b"p".to_vec()),
            addrs: vec![ByteBuf::from(addr.to_vec()), ByteBuf::from(vec![0xff; 8])],
            region: "eu".into(),
            weights: vec![vec![1, 2], vec![]],
        };
        let hello: Hello = decode(&encode(&future)).expect("decodes");
        assert_eq!(hello.seq, 7);
        assert_eq!(hello.ticket, b"t");
        // The undecodable address is skipped, not fatal.
        assert_eq!(hello.parsed_addrs(), vec![addr]);

        #[derive(Serialize)]
        struct Empty {}
        let old: Hello = decode(&encode(&Empty {})).expect("decodes");
        assert_eq!(old, Hello::default());
    }

    #[test]
    fn round_trips() {
        let mut h = Hello {
            ticket: b"ticket".to_vec(),
            proof: vec![7; 64],
            nonce: vec![8; 32],
            seq: 1,
            payload: vec![0, 1, 2],
            addrs: vec![],
        };
        h.set_addrs(&["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().expect("addr")]);
        assert_eq!(decode::<Hello>(&encode(&h)).expect("decodes"), h);
        let r = HelloReply {
            hello: None,
            refused: Some("expired".into()),
        };
        assert_eq!(decode::<HelloReply>(&encode(&r)).expect("decodes"), r);
        let q = RpcRequest {
            protocol: "/beemesh/sync/1".into(),
            data: vec![9; 1000],
        };
        let bytes = encode(&q);
        assert!(
            bytes.len() < 1100,
            "bytes are encoded as a byte string: {}",
            bytes.len()
        );
        assert_eq!(decode::<RpcRequest>(&bytes).expect("decodes"), q);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode::<Hello>(&bytes);
            let _ = decode::<HelloReply>(&bytes);
            let _ = decode::<RpcRequest>(&bytes);
        }
        // Deep nesting (arrays of arrays...) in an ignored field must not overflow the stack.
        let mut deep = vec![0xa1, 0x61, b'x'];
        deep.extend(std::iter::repeat_n(0x81, 100_000));
        deep.push(0x00);
        assert!(decode::<Hello>(&deep).is_err());
        // A claimed huge length does not allocate it.
        let huge = [
            0xa1, 0x66, b't', b'i', b'c', b'k', b'e', b't', 0x5b, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff,
        ];
        assert!(decode::<Hello>(&huge).is_err());
    }
}
