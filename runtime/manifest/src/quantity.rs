//! Resource quantities and durations as operators write them: CPU (`250m`, `2`, `0.5`),
//! memory (`64Mi`, `1Gi`, `512M`, `1048576`) and durations (`5s`, `100ms`, `1m30s`).
//!
//! Each type parses from a string (and, where it makes sense, a bare integer), keeps an exact
//! integer value and writes itself back in a canonical form.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// CPU in millicores (`1000` = one core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cpu(pub u64);

/// Memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Memory(pub u64);

/// A duration with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub u64);

impl Cpu {
    pub fn millis(self) -> u64 {
        self.0
    }
}

impl Memory {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl Duration {
    pub fn from_secs(s: u64) -> Self {
        Self(s * 1000)
    }
    pub fn as_millis(self) -> u64 {
        self.0
    }
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

/// Splits `"1.5Gi"` into (`"1.5"`, `"Gi"`).
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Multiplies a decimal string by `scale`, requiring an integer result.
fn scaled(num: &str, scale: u64, what: &str, original: &str) -> Result<u64, String> {
    let bad = || format!("{original:?} is not a valid {what} quantity");
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(bad());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u128 = int.parse().map_err(|_| bad())?;
    let mut value = int
        .checked_mul(scale as u128)
        .ok_or_else(|| format!("{original:?} is too large"))?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(bad());
        }
        let denom = 10u128.pow(frac.len() as u32);
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let part = f * scale as u128;
        if !part.is_multiple_of(denom) {
            return Err(format!(
                "{original:?} is finer than the smallest unit of {what} (1{})",
                if what == "CPU" { "m" } else { " byte" }
            ));
        }
        value = value
            .checked_add(part / denom)
            .ok_or_else(|| format!("{original:?} is too large"))?;
    }
    u64::try_from(value).map_err(|_| format!("{original:?} is too large"))
}

impl FromStr for Cpu {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, unit) = split_number(t);
        if num.is_empty() {
            return Err(format!(
                "{s:?} is not a valid CPU quantity; write cores (\"2\", \"0.5\") or millicores (\"250m\")"
            ));
        }
        let scale = match unit {
            "m" => 1,
            "" => 1000,
            other => {
                return Err(format!(
                    "{s:?} has unknown CPU unit {other:?}; write cores (\"2\", \"0.5\") or millicores (\"250m\")"
                ));
            }
        };
        scaled(num, scale, "CPU", s).map(Cpu)
    }
}

impl FromStr for Memory {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, unit) = split_number(t);
        if num.is_empty() {
            return Err(format!(
                "{s:?} is not a valid memory quantity; write e.g. \"64Mi\", \"1Gi\" or a number of bytes"
            ));
        }
        let scale: u64 = match unit {
            "" => 1,
            "k" | "K" => 1000,
            "M" => 1000u64.pow(2),
            "G" => 1000u64.pow(3),
            "T" => 1000u64.pow(4),
            "P" => 1000u64.pow(5),
            "E" => 1000u64.pow(6),
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "Ei" => 1 << 60,
            other => {
                return Err(format!(
                    "{s:?} has unknown memory unit {other:?}; use Ki, Mi, Gi, Ti (or k, M, G, T), e.g. \"64Mi\""
                ));
            }
        };
        scaled(num, scale, "memory", s).map(Memory)
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("duration must not be empty".into());
        }
        let mut rest = t;
        let mut total: u64 = 0;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "{s:?} is not a duration; write e.g. \"500ms\", \"5s\", \"1m30s\", \"2h\""
                ));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("{s:?} is too large"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let factor = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" => return Err(format!("{s:?} needs a unit (ms, s, m or h)")),
                u => return Err(format!("{s:?} has unknown unit {u:?}; use ms, s, m or h")),
            };
            rest = &rest[unit_len..];
            total = n
                .checked_mul(factor)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("{s:?} is too large"))?;
        }
        Ok(Duration(total))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 6] = [
            ("Ei", 1 << 60),
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (unit, size) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let mut s = ms / 1000;
        let h = s / 3600;
        s %= 3600;
        let m = s / 60;
        s %= 60;
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

macro_rules! serde_via_str {
    ($t:ty, $expecting:literal, $int_scale:expr) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$t, E> {
                        match $int_scale {
                            Some(scale) => v
                                .checked_mul(scale)
                                .map(<$t>::from_raw)
                                .ok_or_else(|| E::custom(format!("{v} is too large"))),
                            None => Err(E::custom(format!(
                                "{v} needs a unit; write it as a string such as \"{v}s\""
                            ))),
                        }
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$t, E> {
                        match u64::try_from(v) {
                            Ok(u) => self.visit_u64(u),
                            Err(_) => Err(E::custom(format!("{v} must not be negative"))),
                        }
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

impl Cpu {
    fn from_raw(v: u64) -> Self {
        Cpu(v)
    }
}
impl Memory {
    fn from_raw(v: u64) -> Self {
        Memory(v)
    }
}
impl Duration {
    fn from_raw(v: u64) -> Self {
        Duration(v)
    }
}

serde_via_str!(
    Cpu,
    "a CPU quantity such as \"250m\" or \"2\"",
    Some(1000u64)
);
serde_via_str!(
    Memory,
    "a memory quantity such as \"64Mi\" or \"1Gi\"",
    Some(1u64)
);
serde_via_str!(
    Duration,
    "a duration such as \"5s\" or \"100ms\"",
    None::<u64>
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!("250m".parse::<Cpu>(), Ok(Cpu(250)));
        assert_eq!("2".parse::<Cpu>(), Ok(Cpu(2000)));
        assert_eq!("0.5".parse::<Cpu>(), Ok(Cpu(500)));
        assert_eq!("1.25".parse::<Cpu>(), Ok(Cpu(1250)));
        assert!("0.0005".parse::<Cpu>().is_err());
        assert!("2 cores".parse::<Cpu>().is_err());
        assert!("-1".parse::<Cpu>().is_err());
        assert!("m".parse::<Cpu>().is_err());
        assert!("".parse::<Cpu>().is_err());
        assert_eq!(Cpu(250).to_string(), "250m");
        assert_eq!(Cpu(3000).to_string(), "3");
    }

    #[test]
    fn memory() {
        assert_eq!("64Mi".parse::<Memory>(), Ok(Memory(64 << 20)));
        assert_eq!("1Gi".parse::<Memory>(), Ok(Memory(1 << 30)));
        assert_eq!("1.5Gi".parse::<Memory>(), Ok(Memory(3 << 29)));
        assert_eq!("128M".parse::<Memory>(), Ok(Memory(128_000_000)));
        assert_eq!("1048576".parse::<Memory>(), Ok(Memory(1 << 20)));
        assert!("64MB".parse::<Memory>().is_err());
        assert!("99999999999Ei".parse::<Memory>().is_err());
        // The fraction pushes the integer part past u128 (found by fuzzing).
        assert!("340282366920938463463.9E".parse::<Memory>().is_err());
        assert!(
            "340282366920938463463374607431768211.5"
                .parse::<Cpu>()
                .is_err()
        );
        assert_eq!(Memory(64 << 20).to_string(), "64Mi");
        assert_eq!(Memory(1000).to_string(), "1000");
    }

    #[test]
    fn durations() {
        assert_eq!("5s".parse::<Duration>(), Ok(Duration(5000)));
        assert_eq!("100ms".parse::<Duration>(), Ok(Duration(100)));
        assert_eq!("1m30s".parse::<Duration>(), Ok(Duration(90_000)));
        assert_eq!("2h".parse::<Duration>(), Ok(Duration(7_200_000)));
        assert!("5".parse::<Duration>().is_err());
        assert!("5d".parse::<Duration>().is_err());
        assert!("s".parse::<Duration>().is_err());
        assert_eq!(Duration(90_000).to_string(), "1m30s");
        assert_eq!(Duration(1500).to_string(), "1500ms");
    }

    #[test]
    fn display_round_trips() {
        for s in ["250m", "2", "1500m"] {
            let c: Cpu = s.parse().expect("cpu");
            assert_eq!(c.to_string().parse::<Cpu>(), Ok(c));
        }
        for s in ["64Mi", "1000", "3Gi", "1536Mi"] {
            let m: Memory = s.parse().expect("mem");
            assert_eq!(m.to_string().parse::<Memory>(), Ok(m));
        }
    }
}
