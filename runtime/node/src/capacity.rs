//! Host capacity: CPUs and memory as the kernel reports them, minus `[resources] reserve`.

use beemesh_manifest::host::Reserve;
use beemesh_manifest::{Cpu, Memory};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// What the host has.
    pub total_cpu: Cpu,
    pub total_memory: Memory,
    /// What workloads may use: total minus the reserve (never negative).
    pub allocatable_cpu: Cpu,
    pub allocatable_memory: Memory,
}

impl Capacity {
    pub fn from_totals(total_cpu: Cpu, total_memory: Memory, reserve: &Reserve) -> Self {
        Self {
            total_cpu,
            total_memory,
            allocatable_cpu: Cpu(total_cpu.0.saturating_sub(reserve.cpu.0)),
            allocatable_memory: Memory(total_memory.0.saturating_sub(reserve.memory.0)),
        }
    }

    /// Reads this host's CPUs (as far as this process may use them) and total memory.
    pub fn detect(reserve: &Reserve) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        Self::from_totals(Cpu(cpus * 1000), Memory(mem_total().unwrap_or(0)), reserve)
    }
}

/// MemTotal from /proc/meminfo, in bytes.
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_subtracted_and_saturates() {
        let r = Reserve {
            cpu: Cpu(500),
            memory: Memory(256 << 20),
        };
        let c = Capacity::from_totals(Cpu(2000), Memory(1 << 30), &r);
        assert_eq!(c.allocatable_cpu, Cpu(1500));
        assert_eq!(c.allocatable_memory, Memory(768 << 20));
        let tiny = Capacity::from_totals(Cpu(100), Memory(1), &r);
        assert_eq!(
            (tiny.allocatable_cpu, tiny.allocatable_memory),
            (Cpu(0), Memory(0))
        );
    }

    #[test]
    fn meminfo_parses() {
        assert_eq!(
            parse_meminfo("MemTotal:       2048 kB\nMemFree: 1 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_meminfo("nonsense"), None);
        assert!(Capacity::detect(&Reserve::default()).total_memory.0 > 0);
    }
}
