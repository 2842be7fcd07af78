//! The protocol messages. They travel point to point (request/response on
//! [`crate::SCHEDULER_PROTOCOL`]); none is broadcast. The sender is the transport's authenticated
//! peer, never a field of the message. Every struct tolerates unknown fields and defaults the
//! fields a neighbouring version may lack, so adjacent versions coexist; a variant unknown to
//! the receiver fails to decode and is dropped (the protocol recovers by its timers).
//!
//! Authority: no message carries a spec that a node would adopt. A workload is named by
//! [`WorkloadRef`] (namespace, name, generation, content id); the receiver acts only on the
//! spec of a manifest it verified itself, and fetches one it lacks before it acts. A claim on
//! a replica carries the award its coordinator signed ([`AwardProof`]).

use serde::{Deserialize, Serialize};

use crate::authority::{AwardProof, Signature};
use crate::types::{Digest, ReplicaIndex, ReplicaState, Resources, WorkloadId, WorkloadSpec};

/// One generation of a workload, as messages name it: what the receiver must have verified
/// (the manifest with this content id) before it acts on the message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadRef {
    pub id: WorkloadId,
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub content: Digest,
}

impl WorkloadRef {
    pub fn of(spec: &WorkloadSpec) -> Self {
        Self {
            id: spec.id.clone(),
            generation: spec.generation,
            content: spec.content,
        }
    }

    /// Whether `spec` is exactly the generation this names.
    pub fn names(&self, spec: &WorkloadSpec) -> bool {
        spec.id == self.id && spec.generation == self.generation && spec.content == self.content
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub enum Message<I> {
    /// Coordinator → sampled candidate: may you host up to `wanted` replicas of this workload?
    Tender(Tender),
    /// Candidate → coordinator: yes, capacity is reserved until the tender's hold expires.
    Bid(Bid),
    /// Candidate → coordinator: no (nothing is reserved).
    Decline(Decline),
    /// Coordinator → winner: run these replica indexes, under these signed epochs.
    Award(Award<I>),
    /// Coordinator → bidder that won nothing: drop the reservation now.
    Release(Release),
    /// Winner → coordinator: cannot take (some of) an award.
    Refuse(Refuse),
    /// Host → coordinator: the replicas of some workloads this node holds, each with its
    /// signed award. Answers an award (acceptance), follows every state change, a coordinator
    /// change, and runs periodically as anti-entropy.
    Report(Report<I>),
    /// Coordinator → host: stop this claim (it lost to a better one, or is no longer wanted).
    Revoke(Revoke),
    /// Coordinator → every member: this strong workload's Raft group was formed (its first
    /// hosts were told to bootstrap it). A later coordinator that hears no claim of it never
    /// forms it again: it reports the workload's voters as out of reach instead.
    Formed(Formed),
}

impl<I> Message<I> {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Tender(_) => "tender",
            Message::Bid(_) => "bid",
            Message::Decline(_) => "decline",
            Message::Award(_) => "award",
            Message::Release(_) => "release",
            Message::Refuse(_) => "refuse",
            Message::Report(_) => "report",
            Message::Revoke(_) => "revoke",
            Message::Formed(_) => "formed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tender {
    /// Per coordinator and workload; bids, awards and releases name it.
    pub round: u64,
    /// What is placed: the candidate takes replica count, resources, selector and spread from
    /// its own verified copy of this manifest.
    pub workload: WorkloadRef,
    /// Replicas this tender fills (the candidate may offer fewer).
    #[serde(default = "one")]
    pub wanted: u32,
    /// How long a bidder holds its reservation, in milliseconds.
    #[serde(default)]
    pub hold_ms: u64,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bid {
    pub round: u64,
    pub workload: WorkloadId,
    #[serde(default)]
    pub generation: u64,
    /// Replicas reserved (1 with `spread = "node"`).
    #[serde(default)]
    pub slots: u32,
    /// Free capacity before this bid's reservation: allocatable minus allocated minus
    /// reserved. Informative: the coordinator never counts more than the bidder announced.
    #[serde(default)]
    pub free: Resources,
    #[serde(default)]
    pub allocatable: Resources,
    /// How many of the workload's `prefer` labels the bidder carries.
    #[serde(default)]
    pub preferred: u32,
    /// [`crate::score`] of the first replica on this node.
    #[serde(default)]
    pub score: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decline {
    pub round: u64,
    pub workload: WorkloadId,
    pub reason: DeclineReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// The node's labels do not match the selector.
    Selector,
    /// Not enough free capacity; carries what is free.
    Capacity { free: Resources },
    /// `spread = "node"` and the node already holds a replica of the workload.
    AlreadyHosts,
    /// The node knows a newer generation, or a tombstone.
    Stale,
    /// The node has not learnt its own capacity yet.
    NotReady,
    /// The sender is not the workload's coordinator in this node's view.
    NotCoordinator,
    /// The node holds as many open bids as it allows (for this coordinator or in all).
    Busy,
    /// The node has not verified this generation of the manifest (it fetches it).
    Unverified,
    /// A reason added by a newer version.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub struct Award<I> {
    pub round: u64,
    pub workload: WorkloadRef,
    pub slots: Vec<SlotAward>,
    /// A strong workload's first placement: the hosts of this round's awards, which form its
    /// Raft group as its first voters (empty otherwise: a later host joins the group).
    #[serde(default = "Vec::new")]
    pub bootstrap: Vec<I>,
}

/// One awarded replica slot, signed by the coordinator that sends it (see
/// [`crate::authority::award_message`]: the host is the receiver, the issuer the sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAward {
    pub index: ReplicaIndex,
    pub epoch: u64,
    #[serde(default)]
    pub sig: Signature,
}

/// A slot named by index and epoch (what a refusal gives back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotEpoch {
    pub index: ReplicaIndex,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub round: u64,
    pub workload: WorkloadId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    pub workload: WorkloadId,
    #[serde(default)]
    pub generation: u64,
    pub slots: Vec<SlotEpoch>,
    pub reason: DeclineReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub struct Report<I> {
    /// Increases with every report the host sends (from 1 at each start). A report numbered
    /// below the last one a coordinator applied from that host, within a few seconds of it,
    /// was overtaken on the way: its claims count but it frees nothing. 0: unknown.
    #[serde(default)]
    pub seq: u64,
    /// For each workload listed, every replica the host holds of it (possibly none): an index
    /// the coordinator believed held by this host and not listed is free again.
    pub workloads: Vec<ReportedWorkload<I>>,
}

impl<I> Default for Report<I> {
    fn default() -> Self {
        Self {
            seq: 0,
            workloads: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub struct ReportedWorkload<I> {
    /// The generation the host was awarded.
    pub workload: WorkloadRef,
    pub replicas: Vec<ReportedReplica<I>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub struct ReportedReplica<I> {
    pub index: ReplicaIndex,
    pub epoch: u64,
    pub state: ReplicaState,
    /// The host gives the slot back (it failed here too often); the coordinator places it
    /// elsewhere and stops counting this claim.
    #[serde(default)]
    pub relinquish: bool,
    /// The award this claim rests on, signed by the coordinator that issued it.
    pub award: AwardProof<I>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formed {
    /// The generation whose first placement formed the group (the group lives as long as
    /// the workload, across generations).
    pub workload: WorkloadRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoke {
    pub workload: WorkloadId,
    pub index: ReplicaIndex,
    pub generation: u64,
    pub epoch: u64,
    #[serde(default)]
    pub reason: RevokeReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// Another node holds the same replica under a better claim.
    Conflict,
    /// The replica index is beyond `replicas`, or the workload is deleted.
    NotWanted,
    /// `spread = "node"` and the node holds another replica of the workload.
    Spread,
    /// A new generation replaced it on another node.
    Replaced,
    /// It did not report running within the start timeout.
    NotRunning,
    #[default]
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WorkloadSpec;

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_defaulted() {
        let json = r#"{"bid":{"round":3,"workload":{"namespace":"a","name":"b"},"future":1}}"#;
        let m: Message<u32> = serde_json::from_str(json).expect("decode");
        match m {
            Message::Bid(b) => {
                assert_eq!(b.round, 3);
                assert_eq!(b.slots, 0);
            }
            other => panic!("{other:?}"),
        }
        let json = r#"{"decline":{"round":1,"workload":{"namespace":"a","name":"b"},"reason":"moon_phase"}}"#;
        let m: Message<u32> = serde_json::from_str(json).expect("decode");
        assert!(matches!(
            m,
            Message::Decline(Decline {
                reason: DeclineReason::Other,
                ..
            })
        ));
    }

    #[test]
    fn a_tender_names_the_workload_and_carries_no_spec() {
        let spec: WorkloadSpec =
            serde_json::from_str(r#"{"id":{"namespace":"a","name":"b"},"generation":2,"replicas":3,"resources":{"cpu":250,"memory":64}}"#)
                .expect("spec");
        let t: Message<u32> = Message::Tender(Tender {
            round: 1,
            workload: WorkloadRef::of(&spec),
            wanted: 3,
            hold_ms: 5000,
        });
        let text = serde_json::to_string(&t).expect("encode");
        assert!(text.contains("\"generation\":2"), "{text}");
        assert!(
            !text.contains("\"replicas\""),
            "a tender never carries a spec: {text}"
        );
        assert!(
            !text.contains("\"cpu\""),
            "a tender never carries a spec: {text}"
        );
        let back: Message<u32> = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, t);
    }
}
