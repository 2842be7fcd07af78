//! Membership rules: when a group has lost its quorum for good, and how a group moves from
//! one set of voters to another one replica at a time without ever dropping below a majority
//! of its current voters.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::types::MAX_VOTERS;

/// The votes a decision needs among `n` voters.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// A group whose voters are gone for good beyond what its quorum tolerates: it can never
/// commit again. The node reports the workload failed with this message and must never
/// re-create the group empty (that would silently drop every acknowledged write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumLost {
    /// The gone voters of the voter set that lost its majority, sorted.
    pub gone: Vec<String>,
    /// How many voters that set has.
    pub voters: usize,
}

impl fmt::Display for QuorumLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "quorum lost: {} of {} voters gone",
            self.gone.len(),
            self.voters
        )
    }
}

/// Whether a group with the voter sets `configs` (one, or two during a joint change) has lost
/// its quorum for good, given which peers are gone for good.
///
/// "Gone for good" is the node's judgement (a host removed from the mesh, a replica that was
/// not re-placed within its deadline), not a missed heartbeat: a voter that is merely
/// unreachable may come back with its log.
pub fn quorum_lost<S: AsRef<str>>(
    configs: &[Vec<S>],
    is_gone: impl Fn(&str) -> bool,
) -> Option<QuorumLost> {
    for config in configs {
        let voters: BTreeSet<&str> = config.iter().map(AsRef::as_ref).collect();
        if voters.is_empty() {
            continue;
        }
        let gone: Vec<String> = voters
            .iter()
            .filter(|v| is_gone(v))
            .map(|v| v.to_string())
            .collect();
        if voters.len() - gone.len() < majority(voters.len()) {
            return Some(QuorumLost {
                gone,
                voters: voters.len(),
            });
        }
    }
    None
}

/// One step of a membership move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Add the peer as a learner: it receives the log but does not vote.
    AddLearner(String),
    /// Once the learner has caught up, make it a voter.
    Promote(String),
    /// Remove a voter.
    Remove(String),
}

/// Why a move was refused before any step was taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the target voter set is empty")]
    Empty,
    #[error("the target has {0} voters; at most {MAX_VOTERS} are allowed")]
    TooMany(usize),
    #[error(
        "removing {peer} would leave {left} of {voters} voters, fewer than a majority ({need})"
    )]
    BelowMajority {
        peer: String,
        left: usize,
        voters: usize,
        need: usize,
    },
}

/// Plans the move from voters `current` to voters `target`: for each new voter, add it as a
/// learner, promote it, then remove one old voter; leftover removals come last. Refuses the
/// whole plan when any removal would leave fewer than a majority of the voters of that moment
/// (so 3 -> 1 is refused, 3 -> 2 is allowed).
pub fn plan_move<S: AsRef<str>>(current: &[S], target: &[S]) -> Result<Vec<Step>, PlanError> {
    let current: BTreeSet<String> = current.iter().map(|s| s.as_ref().to_string()).collect();
    let target: BTreeSet<String> = target.iter().map(|s| s.as_ref().to_string()).collect();
    if target.is_empty() {
        return Err(PlanError::Empty);
    }
    if target.len() > MAX_VOTERS {
        return Err(PlanError::TooMany(target.len()));
    }
    let mut adds: Vec<&String> = target.difference(&current).collect();
    let mut removes: Vec<&String> = current.difference(&target).collect();
    adds.reverse();
    removes.reverse();
    let mut voters = current.len();
    let mut steps = Vec::new();
    let remove = |steps: &mut Vec<Step>, voters: &mut usize, peer: &str| {
        let left = *voters - 1;
        if left < majority(*voters) {
            return Err(PlanError::BelowMajority {
                peer: peer.to_string(),
                left,
                voters: *voters,
                need: majority(*voters),
            });
        }
        steps.push(Step::Remove(peer.to_string()));
        *voters = left;
        Ok(())
    };
    while let Some(add) = adds.pop() {
        steps.push(Step::AddLearner(add.clone()));
        steps.push(Step::Promote(add.clone()));
        voters += 1;
        if let Some(r) = removes.pop() {
            remove(&mut steps, &mut voters, r)?;
        }
    }
    while let Some(r) = removes.pop() {
        remove(&mut steps, &mut voters, r)?;
    }
    Ok(steps)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quorum_loss_counts_gone_voters() {
        let cfg = vec![vec!["a", "b", "c"]];
        assert_eq!(quorum_lost(&cfg, |p| p == "a"), None);
        let lost = quorum_lost(&cfg, |p| p != "c").unwrap();
        assert_eq!(lost.to_string(), "quorum lost: 2 of 3 voters gone");
        assert_eq!(lost.gone, vec!["a", "b"]);
        // Four voters need three.
        let cfg = vec![vec!["a", "b", "c", "d"]];
        assert!(quorum_lost(&cfg, |p| p == "a" || p == "b").is_some());
        // Joint: either side losing its majority loses the group.
        let joint = vec![vec!["a", "b", "c"], vec!["a", "b", "d"]];
        assert!(quorum_lost(&joint, |p| p == "c").is_none());
        assert!(quorum_lost(&joint, |p| p == "b" || p == "d").is_some());
    }

    #[test]
    fn moves_one_replica_at_a_time() {
        let steps = plan_move(&["a", "b", "c"], &["a", "b", "d"]).unwrap();
        assert_eq!(
            steps,
            vec![
                Step::AddLearner("d".into()),
                Step::Promote("d".into()),
                Step::Remove("c".into())
            ]
        );
        let steps = plan_move(&["a", "b", "c"], &["d", "e", "f"]).unwrap();
        assert_eq!(steps.len(), 9);
        assert!(
            plan_move(&["a", "b", "c"], &["a", "b", "c"])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn refuses_to_drop_below_a_majority() {
        assert!(plan_move(&["a", "b", "c"], &["a", "b"]).is_ok());
        let e = plan_move(&["a", "b", "c"], &["a"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "removing c would leave 1 of 2 voters, fewer than a majority (2)"
        );
        assert!(matches!(
            plan_move(&["a", "b"], &["a"]),
            Err(PlanError::BelowMajority { .. })
        ));
        assert!(matches!(
            plan_move::<&str>(&["a"], &[]),
            Err(PlanError::Empty)
        ));
    }
}
