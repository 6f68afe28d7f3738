//! Docker's image reference grammar, checked before a name reaches the engine.

/// Docker's reference grammar: `[domain[:port]/]path[:tag][@algorithm:hex]`. Checked here so
/// a malformed name is the caller's `invalid_argument` (it would otherwise reach the engine's
/// URL unescaped and come back as some other error).
pub(super) fn is_image_reference(reference: &str) -> bool {
    let (rest, digest) = match reference.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (reference, None),
    };
    if digest.is_some_and(|d| !is_digest(d)) {
        return false;
    }
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if tag.is_some_and(|t| !is_tag(t)) {
        return false;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // As Docker splits it: a first part with a dot, a colon or upper case, or `localhost`,
    // is a registry.
    let first = parts[0];
    if parts.len() > 1
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase()))
    {
        if !is_registry(first) {
            return false;
        }
        parts.remove(0);
    }
    parts.iter().all(|p| is_path_component(p))
}

fn is_path_component(part: &str) -> bool {
    let lower_alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = part.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !lower_alnum(first) || !lower_alnum(last) {
        return false;
    }
    // Runs of [a-z0-9] joined by ".", "_", "__" or any number of "-".
    part.split(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        .filter(|sep| !sep.is_empty())
        .all(|sep| matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-'))
}

fn is_registry(registry: &str) -> bool {
    // An IPv6 host is bracketed and full of colons: the port, if any, follows the bracket.
    let port_at = match registry.rfind(']') {
        Some(end) => registry[end..].find(':').map(|i| end + i),
        None => registry.rfind(':'),
    };
    let (host, port) = match port_at {
        Some(i) => (&registry[..i], Some(&registry[i + 1..])),
        None => (registry, None),
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit())) {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !inner.is_empty() && inner.bytes().all(|c| c.is_ascii_hexdigit() || c == b':');
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            matches!((b.first(), b.last()), (Some(f), Some(l)) if f.is_ascii_alphanumeric() && l.is_ascii_alphanumeric())
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

fn is_tag(tag: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

fn is_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let algorithm_ok = algorithm.split(['+', '.', '-', '_']).all(|part| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric())
    });
    algorithm_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}
