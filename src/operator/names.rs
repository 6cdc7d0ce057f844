//! Names and label values derived from a policy's name, so that every valid RateLimitPolicy
//! name works.
//!
//! A policy name is a DNS-1123 subdomain: up to 253 characters of lowercase letters, digits,
//! `-` and `.`, starting and ending with a letter or digit. The objects the operator owns need
//! more: a Service name is a DNS-1035 label (at most 63 characters, no dots, a leading letter),
//! and a label value is at most 63 characters.
//!
//! - [`gateway_name`]: `<policy>-sluice` when that is already a DNS-1035 label of at most 63
//!   characters (so the common names stay readable and stable); otherwise the name with dots
//!   turned into `-`, a `p-` in front of a leading digit, cut to fit, and the FNV-1a hash of the
//!   full policy name: `<head>-<8 hex digits>-sluice`. Two policies whose names sanitise alike
//!   (`a.b` and `a-b`) get different names: only the name that needed no change goes without a
//!   hash.
//! - [`label_value`]: the policy name when it fits in 63 characters (every policy name is a
//!   valid label value otherwise), else its first 54 characters and the hash.
//!
//! The hash is specified (FNV-1a, 64 bits, low 32 bits printed) and pinned by a golden test:
//! derived names never change between versions. A name that still collides with an object
//! owned by someone else is reported as a conflict, never taken over (see the reconcile).

/// Longest DNS-1035 label and label value.
pub const MAX_LABEL: usize = 63;
const SUFFIX: &str = "-sluice";

/// FNV-1a, 64 bits (offset basis 0xcbf29ce484222325, prime 0x100000001b3): a specified hash,
/// so derived names do not change with a hasher's implementation or between versions.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn hash8(policy: &str) -> String {
    format!("{:08x}", fnv1a_64(policy.as_bytes()) as u32)
}

/// Whether `s` is a DNS-1035 label: `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// Name of the gateway's Deployment, Service, ServiceAccount, Role, RoleBinding and
/// PodDisruptionBudget for a policy.
pub fn gateway_name(policy: &str) -> String {
    let plain = format!("{policy}{SUFFIX}");
    if is_dns1035_label(&plain) {
        return plain;
    }
    let mut head: String = policy
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    if !head.starts_with(|c: char| c.is_ascii_lowercase()) {
        head.insert_str(0, "p-");
    }
    let room = MAX_LABEL - SUFFIX.len() - 9; // "-" + 8 hex digits
    head.truncate(room);
    let head = head.trim_end_matches('-');
    format!("{head}-{}{SUFFIX}", hash8(policy))
}

/// The value of the `sluice.dev/policy` label (and the gateway pods' selector) for a policy.
pub fn label_value(policy: &str) -> String {
    if policy.len() <= MAX_LABEL {
        return policy.to_owned();
    }
    let head: String = policy.chars().take(MAX_LABEL - 9).collect();
    let head = head.trim_end_matches(['-', '.']);
    format!("{head}-{}", hash8(policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid label value: at most 63 characters, alphanumeric at both ends, `-_.` inside.
    fn is_label_value(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() <= MAX_LABEL
            && (b.is_empty()
                || (b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|&c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))))
    }

    #[test]
    fn fnv1a_matches_its_published_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn derived_names_are_pinned() {
        // Changing any of these renames users' objects: they are part of the contract.
        let cases = [
            ("llama", "llama-sluice", "llama"),
            (
                "llama-3.1-8b",
                "llama-3-1-8b-732b2a04-sluice",
                "llama-3.1-8b",
            ),
            ("8b-chat", "p-8b-chat-4bdb9128-sluice", "8b-chat"),
            ("a.b", "a-b-0466522c-sluice", "a.b"),
            ("a-b", "a-b-sluice", "a-b"),
        ];
        for (policy, name, label) in cases {
            assert_eq!(gateway_name(policy), name, "{policy}");
            assert_eq!(label_value(policy), label, "{policy}");
        }
        let long = "a".repeat(200);
        assert_eq!(
            gateway_name(&long),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-4f7a5b0d-sluice"
        );
        assert_eq!(
            label_value(&long),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-4f7a5b0d"
        );
    }

    #[test]
    fn every_class_of_policy_name_gives_valid_distinct_names() {
        let names = [
            "llama".to_owned(),
            "llama-3.1-8b".to_owned(),
            "8b-chat".to_owned(),
            "0".to_owned(),
            "a.b".to_owned(),
            "a-b".to_owned(),
            "x".repeat(56),                                     // "-sluice" makes 63
            "x".repeat(57),                                     // 64 with "-sluice"
            "y".repeat(63),                                     // the longest label value
            "y".repeat(64),                                     // one over
            format!("{}.{}", "z".repeat(126), "z".repeat(126)), // 253, the longest name
            "1.2.3".to_owned(),
        ];
        let mut seen = std::collections::HashSet::new();
        for p in &names {
            let n = gateway_name(p);
            assert!(is_dns1035_label(&n), "{p} → {n}");
            assert!(seen.insert(n.clone()), "{p} → {n} twice");
            let l = label_value(p);
            assert!(is_label_value(&l), "{p} → label {l}");
        }
        assert_eq!(gateway_name(&"x".repeat(56)).len(), 63);
        assert!(gateway_name(&"x".repeat(57)).len() <= 63);
        assert_eq!(label_value(&"y".repeat(63)), "y".repeat(63));
        assert_ne!(label_value(&"y".repeat(64)), label_value(&"y".repeat(65)));
    }
}
