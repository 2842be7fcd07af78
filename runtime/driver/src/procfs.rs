//! Reading processes from `/proc`: liveness (with a start time, so a reused pid is not
//! mistaken for the original), process trees and resource use.
//!
//! Usage comes from `/proc` rather than cgroups because rootless Podman on a cgroup v1 host
//! has no per-container cgroup to read, and the process driver may have none either.

use std::collections::HashMap;
use std::path::Path;

use crate::types::ContainerUsage;

/// The fields of `/proc/PID/stat` that drivers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// User and system time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Start time after boot, in clock ticks: with the pid it identifies a process.
    pub start_time: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) may contain spaces and
/// parentheses, so the fields after it are found from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text.get(..open)?.trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied();
    let num = |n: usize| field(n).and_then(|s| s.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        state: field(3)?.chars().next()?,
        ppid: u32::try_from(num(4)?).ok()?,
        pgrp: u32::try_from(num(5)?).ok()?,
        utime: num(14)?,
        stime: num(15)?,
        start_time: num(22)?,
        rss_pages: num(24)?,
    })
}

pub fn stat(pid: u32) -> Option<ProcStat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
}

/// True if `pid` is a live (not zombie) process started at `start_time` (when given).
pub fn alive(pid: u32, start_time: Option<u64>) -> bool {
    match stat(pid) {
        Some(s) => s.state != 'Z' && s.state != 'X' && start_time.is_none_or(|t| t == s.start_time),
        None => false,
    }
}

/// Every process on the host.
pub fn all() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(stat)
        .collect()
}

/// `root` and all its descendants, from one snapshot of the process table.
pub fn tree(snapshot: &[ProcStat], root: u32) -> Vec<ProcStat> {
    let mut children: HashMap<u32, Vec<&ProcStat>> = HashMap::new();
    for p in snapshot {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if out.len() > snapshot.len() {
            break; // defensive: a cycle cannot happen in /proc, but never loop forever
        }
        if let Some(p) = snapshot.iter().find(|p| p.pid == pid) {
            out.push(*p);
        }
        if let Some(kids) = children.get(&pid) {
            todo.extend(kids.iter().map(|k| k.pid));
        }
    }
    out
}

/// Sums CPU time and RSS over `procs`.
pub fn sum_usage(name: &str, procs: &[ProcStat]) -> ContainerUsage {
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let page = rustix::param::page_size() as u64;
    let ticks_total: u64 = procs.iter().map(|p| p.utime + p.stime).sum();
    ContainerUsage {
        name: name.to_owned(),
        cpu_time_ms: ticks_total.saturating_mul(1000) / ticks,
        memory_rss_bytes: procs.iter().map(|p| p.rss_pages.saturating_mul(page)).sum(),
        processes: u32::try_from(procs.len()).unwrap_or(u32::MAX),
    }
}

/// The real uid and gid of `pid`, from `/proc/PID/status`.
pub fn owner(pid: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_owner(&text)
}

pub fn parse_owner(text: &str) -> Option<(u32, u32)> {
    let first = |key: &str| -> Option<u32> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((first("Uid:")?, first("Gid:")?))
}

/// A line of `/proc/PID/limits` for one resource, e.g. "Max data size": (soft, hard), where
/// `None` means unlimited.
pub fn limit(pid: u32, resource: &str) -> Option<(Option<u64>, Option<u64>)> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("limits")).ok()?;
    parse_limit(&text, resource)
}

pub fn parse_limit(text: &str, resource: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = text.lines().find(|l| l.starts_with(resource))?;
    let rest = line.get(resource.len()..)?;
    let mut it = rest.split_whitespace();
    let value = |s: Option<&str>| -> Option<Option<u64>> {
        match s? {
            "unlimited" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    Some((value(it.next())?, value(it.next())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let text = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 123456 1000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.pid, 4242);
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.pgrp, 4242);
        assert_eq!((s.utime, s.stime), (7, 3));
        assert_eq!(s.start_time, 123456);
        assert_eq!(s.rss_pages, 250);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive_and_in_its_tree() {
        let me = std::process::id();
        let s = stat(me).expect("own stat");
        assert!(alive(me, Some(s.start_time)));
        assert!(!alive(me, Some(s.start_time + 1)));
        let snapshot = all();
        let t = tree(&snapshot, s.ppid);
        assert!(t.iter().any(|p| p.pid == me));
    }

    #[test]
    fn owner_parses() {
        let text = "Name:\tsleep\nUid:\t1001\t1001\t1001\t1001\nGid:\t1002\t1002\t1002\t1002\n";
        assert_eq!(parse_owner(text), Some((1001, 1002)));
        assert_eq!(
            owner(std::process::id()).map(|(u, _)| u),
            Some(rustix::process::getuid().as_raw())
        );
    }

    #[test]
    fn limits_parse() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \nMax data size             67108864             unlimited            bytes     \n";
        assert_eq!(
            parse_limit(text, "Max data size"),
            Some((Some(67108864), None))
        );
        assert_eq!(parse_limit(text, "Max stack size"), None);
    }
}
