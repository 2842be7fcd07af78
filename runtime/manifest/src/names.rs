//! Name rules: DNS-1123 labels for names and namespaces, label keys, environment variables,
//! Linux capability names.

/// Checks a DNS-1123 label: 1-63 characters of `a-z`, `0-9` and `-`, starting and ending with
/// an alphanumeric character. Returns the reason when it is not one.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "{s:?} is {} characters long; at most 63 are allowed",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{s:?} contains {c:?}; only lowercase letters, digits and '-' are allowed (a DNS-1123 label)"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{s:?} must start and end with a letter or digit"));
    }
    Ok(())
}

/// Checks a DNS name (dot-separated DNS-1123 labels, at most 253 characters).
pub fn check_dns_name(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    for label in s.split('.') {
        check_dns_label(label).map_err(|e| format!("{s:?} is not a DNS name: label {e}"))?;
    }
    Ok(())
}

/// Checks a label key or value: at most 63 characters of letters, digits, `-`, `_`, `.`,
/// starting and ending alphanumeric; keys may carry one `prefix/`.
pub fn check_label(s: &str, is_key: bool) -> Result<(), String> {
    let what = if is_key { "label key" } else { "label value" };
    if s.is_empty() {
        return if is_key {
            Err("label key must not be empty".into())
        } else {
            Ok(())
        };
    }
    let (prefix, name) = match (is_key, s.split_once('/')) {
        (true, Some((p, n))) => (Some(p), n),
        _ => (None, s),
    };
    if let Some(p) = prefix {
        check_dns_name(p).map_err(|e| format!("{what} prefix: {e}"))?;
    }
    if name.len() > 63 {
        return Err(format!("{what} {s:?} is longer than 63 characters"));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty()
        || !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "{what} {s:?} must be letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn check_env_name(s: &str) -> Result<(), String> {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => {
            return Err(format!(
                "{s:?} is not a valid environment variable name (must start with a letter or '_')"
            ));
        }
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!(
            "{s:?} is not a valid environment variable name (contains {c:?})"
        ));
    }
    Ok(())
}

/// Linux capabilities a manifest may ask for (without the `CAP_` prefix).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// Checks a capability name (`NET_BIND_SERVICE`; a `CAP_` prefix is refused to keep one spelling).
pub fn check_capability(s: &str) -> Result<(), String> {
    if CAPABILITIES.contains(&s) {
        Ok(())
    } else if let Some(bare) = s.strip_prefix("CAP_")
        && CAPABILITIES.contains(&bare)
    {
        Err(format!("write {bare:?} without the CAP_ prefix"))
    } else {
        Err(format!("{s:?} is not a Linux capability name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "hello", "web-1", "0abc", &"a".repeat(63)] {
            assert!(check_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Hello", "a_b", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_and_env() {
        assert!(check_label("app.kubernetes.io/name", true).is_ok());
        assert!(check_label("zone", true).is_ok());
        assert!(check_label("", false).is_ok());
        assert!(check_label("", true).is_err());
        assert!(check_label("-x", false).is_err());
        assert!(check_env_name("GREETING_1").is_ok());
        assert!(check_env_name("1X").is_err());
        assert!(check_env_name("A-B").is_err());
    }

    #[test]
    fn capabilities() {
        assert!(check_capability("NET_BIND_SERVICE").is_ok());
        assert!(
            check_capability("CAP_NET_BIND_SERVICE")
                .expect_err("prefix")
                .contains("without the CAP_ prefix")
        );
        assert!(check_capability("FLY").is_err());
    }
}
