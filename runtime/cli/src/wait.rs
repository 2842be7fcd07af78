//! `--wait` of `beemesh apply` and `beemesh delete`: polls the workload's placements until every
//! replica of the applied generation runs (a tombstone: until no replica is left), showing
//! progress on stderr when it changes.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::client::Client;

/// Between two looks at the workload.
const POLL: Duration = Duration::from_millis(500);
/// Replicas named one by one in a progress line or a timeout message.
const LISTED: usize = 8;

/// What `--wait` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goal {
    pub namespace: String,
    pub name: String,
    pub generation: u64,
    /// A tombstone: wait until no replica is left.
    pub deleted: bool,
}

impl Goal {
    /// The goal of an apply answer (`namespace`, `name`, `generation`, `deleted`).
    pub fn from_answer(v: &Value) -> anyhow::Result<Self> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        match (s("namespace"), s("name"), v["generation"].as_u64()) {
            (Some(namespace), Some(name), Some(generation)) => Ok(Self {
                namespace,
                name,
                generation,
                deleted: v["deleted"].as_bool() == Some(true),
            }),
            _ => bail!("the node's answer lacks the workload's namespace, name or generation"),
        }
    }
}

/// One replica of the goal's generation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    index: u64,
    node: String,
    state: String,
}

/// How far the workload is, from one look at `GET /v1/workloads/{ns}/{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    replicas: u64,
    /// Distinct replica indexes of the goal's generation that are placed, and running.
    placed: u64,
    running: u64,
    /// The goal generation's placements, by index (one per index: the running one first).
    slots: Vec<Slot>,
    /// Placements of other generations (a rollout in progress), or every placement of a
    /// tombstone.
    others: Vec<Slot>,
    unschedulable: Option<String>,
    /// A newer generation replaced the goal's.
    superseded: Option<u64>,
    /// Waiting for a tombstone.
    deleted: bool,
    pub done: bool,
}

fn slot(p: &Value) -> Slot {
    Slot {
        index: p["index"].as_u64().unwrap_or(0),
        node: p["node"].as_str().unwrap_or("?").to_owned(),
        state: p["state"].as_str().unwrap_or("?").to_owned(),
    }
}

fn describe(slots: &[Slot]) -> String {
    let mut parts: Vec<String> = slots
        .iter()
        .take(LISTED)
        .map(|s| format!("{} {}", s.node, s.state))
        .collect();
    if slots.len() > LISTED {
        parts.push(format!("{} more", slots.len() - LISTED));
    }
    parts.join(", ")
}

impl Progress {
    pub fn from_view(view: &Value, goal: &Goal) -> Self {
        let generation = view["generation"].as_u64().unwrap_or(0);
        let replicas = if goal.deleted {
            0
        } else {
            view["replicas"].as_u64().unwrap_or(0)
        };
        let all: Vec<&Value> = view["placements"]
            .as_array()
            .map(|ps| ps.iter().collect())
            .unwrap_or_default();
        let mut slots: Vec<Slot> = Vec::new();
        let mut others = Vec::new();
        for p in all {
            let s = slot(p);
            let current = !goal.deleted && p["generation"].as_u64() == Some(goal.generation);
            if !current || s.index >= replicas {
                others.push(s);
                continue;
            }
            match slots.iter_mut().find(|x| x.index == s.index) {
                Some(x) if x.state != "running" && s.state == "running" => *x = s,
                Some(_) => {}
                None => slots.push(s),
            }
        }
        slots.sort_by_key(|s| s.index);
        let placed = slots.len() as u64;
        let running = slots.iter().filter(|s| s.state == "running").count() as u64;
        let superseded = (generation > goal.generation).then_some(generation);
        let done = if goal.deleted {
            others.is_empty()
        } else {
            running >= replicas
        };
        Self {
            replicas,
            placed,
            running,
            slots,
            others,
            unschedulable: view["unschedulable"]
                .as_str()
                .filter(|u| !u.is_empty())
                .map(str::to_owned),
            superseded,
            deleted: goal.deleted,
            done,
        }
    }

    /// One progress line, e.g. `hello: 2/3 placed, 1/3 running (dev-1 running, dev-2 starting)`.
    pub fn line(&self, name: &str) -> String {
        if self.deleted {
            return if self.others.is_empty() {
                format!("{name}: no replica left")
            } else {
                format!(
                    "{name}: stopping, {} replica(s) left ({})",
                    self.others.len(),
                    describe(&self.others)
                )
            };
        }
        let mut s = format!(
            "{name}: {}/{} placed, {}/{} running",
            self.placed, self.replicas, self.running, self.replicas
        );
        if !self.slots.is_empty() {
            s.push_str(&format!(" ({})", describe(&self.slots)));
        }
        if !self.others.is_empty() {
            s.push_str(&format!(
                "; {} of older generations ({})",
                self.others.len(),
                describe(&self.others)
            ));
        }
        if let Some(u) = &self.unschedulable {
            s.push_str(&format!("; unschedulable: {u}"));
        }
        s
    }

    /// What is still missing, for a timeout message.
    fn missing(&self) -> String {
        if self.deleted {
            return format!(
                "{} replica(s) still placed ({})",
                self.others.len(),
                describe(&self.others)
            );
        }
        let mut parts = Vec::new();
        for i in 0..self.replicas {
            match self.slots.iter().find(|s| s.index == i) {
                Some(s) if s.state == "running" => {}
                Some(s) => parts.push(format!("replica {i} {} on {}", s.state, s.node)),
                None => parts.push(format!("replica {i} not placed")),
            }
        }
        let more = parts.len().saturating_sub(LISTED);
        parts.truncate(LISTED);
        if more > 0 {
            parts.push(format!("{more} more"));
        }
        let mut s = format!(
            "{}/{} running; missing: {}",
            self.running,
            self.replicas,
            parts.join(", ")
        );
        if let Some(u) = &self.unschedulable {
            s.push_str(&format!("; unschedulable: {u}"));
        }
        s
    }

    /// The final line on stdout.
    pub fn summary(&self, goal: &Goal) -> String {
        let id = format!("{}/{}", goal.namespace, goal.name);
        if goal.deleted {
            return format!("{id}: no replica left");
        }
        let nodes: Vec<&str> = self.slots.iter().map(|s| s.node.as_str()).collect();
        format!(
            "{id} generation {}: {}/{} running{}",
            goal.generation,
            self.running,
            self.replicas,
            if nodes.is_empty() {
                String::new()
            } else {
                format!(" ({})", nodes.join(", "))
            }
        )
    }
}

/// Shows progress lines on stderr: rewritten in place on a terminal, one per change otherwise.
struct Reporter {
    tty: bool,
    last: Option<String>,
}

impl Reporter {
    fn show(&mut self, line: String) {
        if self.last.as_ref() == Some(&line) {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        self.last = Some(line);
    }

    fn finish(&mut self) {
        if self.tty && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Waits for `goal`, showing progress, until it is reached (returning the last progress) or
/// `timeout` passes (an error saying what is missing).
pub async fn wait(client: &Client, goal: &Goal, timeout: Duration) -> anyhow::Result<Progress> {
    let path = format!("/v1/workloads/{}/{}", goal.namespace, goal.name);
    let deadline = Instant::now() + timeout;
    let mut reporter = Reporter {
        tty: std::io::stderr().is_terminal(),
        last: None,
    };
    let result = loop {
        let view = match client.get_json(&path).await {
            Ok(v) => v,
            Err(e) => break Err(e),
        };
        let p = Progress::from_view(&view, goal);
        reporter.show(p.line(&goal.name));
        if let Some(newer) = p.superseded {
            break Err(anyhow::anyhow!(
                "{}/{} generation {} was replaced by generation {newer} while waiting",
                goal.namespace,
                goal.name,
                goal.generation
            ));
        }
        if p.done {
            break Ok(p);
        }
        if Instant::now() + POLL > deadline {
            let what = if goal.deleted {
                format!("{}/{} to stop", goal.namespace, goal.name)
            } else {
                format!(
                    "{}/{} generation {}",
                    goal.namespace, goal.name, goal.generation
                )
            };
            break Err(anyhow::anyhow!(
                "timed out after {} waiting for {what}: {}",
                beemesh_manifest::Duration(timeout.as_millis() as u64),
                p.missing()
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    reporter.finish();
    result
}

/// `--timeout` values: `90s`, `5m`, `1h30m`, `500ms`.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d: beemesh_manifest::Duration = s.parse()?;
    if d.as_millis() == 0 {
        return Err("the timeout must be above 0".into());
    }
    Ok(d.to_std())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn goal(generation: u64, deleted: bool) -> Goal {
        Goal {
            namespace: "default".into(),
            name: "hello".into(),
            generation,
            deleted,
        }
    }

    #[test]
    fn progress_counts_the_applied_generation() {
        let view = json!({
            "generation": 3, "replicas": 3,
            "placements": [
                { "node": "dev-1", "index": 0, "generation": 3, "state": "running" },
                { "node": "dev-2", "index": 1, "generation": 3, "state": "starting" },
                { "node": "dev-3", "index": 2, "generation": 2, "state": "running" },
            ],
            "unschedulable": null,
        });
        let p = Progress::from_view(&view, &goal(3, false));
        assert!(!p.done);
        assert_eq!(
            p.line("hello"),
            "hello: 2/3 placed, 1/3 running (dev-1 running, dev-2 starting); \
             1 of older generations (dev-3 running)"
        );
        assert_eq!(
            p.missing(),
            "1/3 running; missing: replica 1 starting on dev-2, replica 2 not placed"
        );
        let done = json!({
            "generation": 3, "replicas": 2,
            "placements": [
                { "node": "dev-1", "index": 0, "generation": 3, "state": "running" },
                { "node": "dev-2", "index": 1, "generation": 3, "state": "running" },
            ],
        });
        let p = Progress::from_view(&done, &goal(3, false));
        assert!(p.done);
        assert_eq!(
            p.summary(&goal(3, false)),
            "default/hello generation 3: 2/2 running (dev-1, dev-2)"
        );
    }

    #[test]
    fn unschedulable_reasons_are_shown() {
        let view = json!({
            "generation": 1, "replicas": 1, "placements": [],
            "unschedulable": "no node matches the selector zone=mars",
        });
        let p = Progress::from_view(&view, &goal(1, false));
        assert_eq!(
            p.line("hello"),
            "hello: 0/1 placed, 0/1 running; unschedulable: no node matches the selector zone=mars"
        );
        assert!(p.missing().contains("replica 0 not placed"));
        assert!(
            p.missing()
                .ends_with("unschedulable: no node matches the selector zone=mars")
        );
    }

    #[test]
    fn a_tombstone_waits_for_no_placement() {
        let view = json!({
            "generation": 4, "replicas": 1, "deleted": true,
            "placements": [{ "node": "dev-1", "index": 0, "generation": 3, "state": "running" }],
        });
        let p = Progress::from_view(&view, &goal(4, true));
        assert!(!p.done);
        assert_eq!(
            p.line("hello"),
            "hello: stopping, 1 replica(s) left (dev-1 running)"
        );
        let gone = json!({ "generation": 4, "replicas": 1, "deleted": true, "placements": [] });
        let p = Progress::from_view(&gone, &goal(4, true));
        assert!(p.done);
        assert_eq!(p.line("hello"), "hello: no replica left");
    }

    #[test]
    fn a_newer_generation_supersedes_the_goal() {
        let view = json!({ "generation": 5, "replicas": 1, "placements": [] });
        assert_eq!(
            Progress::from_view(&view, &goal(4, false)).superseded,
            Some(5)
        );
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("5").is_err());
    }
}
