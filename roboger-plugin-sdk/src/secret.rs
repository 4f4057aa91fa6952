//! Secrets as the server and plugins both show them: the mask that
//! stands for one, and a URL with its password, credential-like query
//! values and token-like path segments masked, for the errors and log
//! lines that name a URL (a database's, a webhook's).

/// What a secret is shown as.
pub const MASK: &str = "[secret]";

/// Parts of a query parameter's name that make its value a credential:
/// libpq's `password`, and the `token`, `key`, `secret`, `sig` and `auth`
/// of the webhooks that take one in their URL (Google Chat's `key` and
/// `token`, signed URLs' `sig`, `access_token`, `api_key`, …).
const CREDENTIAL_NAMES: [&str; 6] = ["pass", "token", "key", "secret", "sig", "auth"];

/// `url` fit to be said in an error or a log line: the password of its
/// user info (`user:password@`) and the value of each query parameter
/// whose name holds one of [`CREDENTIAL_NAMES`] are [`MASK`], and so is
/// each path segment that looks like a token ([`is_token`]: Discord's,
/// Mattermost's, Slack's and Teams' webhook keys), the rest of the path
/// kept to tell one target from another. It works on the text, so a URL
/// that does not parse (which may be the error being said) is masked
/// too; the user info runs to the last `@` before the query, so a
/// password with an unencoded `/` or `@` in it is masked whole, at the
/// cost of masking more of a URL with an `@` in its path.
pub fn url_without_secrets(url: &str) -> String {
    let (path, query) = url.split_at(url.find(['?', '#']).unwrap_or(url.len()));
    let start = path.find("://").map_or(0, |i| i + 3);
    let mut out = match path.rsplit_once('@') {
        Some((user_info, host)) if user_info.len() > start => {
            match user_info[start..].split_once(':') {
                Some((user, _)) => format!("{}{user}:{MASK}@{host}", &user_info[..start]),
                None => path.to_string(),
            }
        }
        _ => path.to_string(),
    };
    // The path: from the first `/` after the scheme and authority.
    if let Some(at) = out[start..].find('/').map(|i| start + i)
        && out[at..].split('/').any(is_token)
    {
        let segments: Vec<&str> = out[at..]
            .split('/')
            .map(|s| if is_token(s) { MASK } else { s })
            .collect();
        out = format!("{}{}", &out[..at], segments.join("/"));
    }
    match query.strip_prefix('?') {
        Some(pairs) => {
            let pairs: Vec<String> = pairs
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if !v.is_empty() && is_credential(k) => format!("{k}={MASK}"),
                    _ => pair.to_string(),
                })
                .collect();
            out.push('?');
            out.push_str(&pairs.join("&"));
        }
        None => out.push_str(query),
    }
    out
}

/// Whether a URL's path segment looks like a token: 16 or more letters,
/// digits, `-` and `_`, with both letters and digits. Words and numeric
/// ids (`/api/webhooks/1234567890/…`) are kept.
fn is_token(segment: &str) -> bool {
    segment.len() >= 16
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && segment.bytes().any(|b| b.is_ascii_digit())
        && segment.bytes().any(|b| b.is_ascii_alphabetic())
}

fn is_credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    CREDENTIAL_NAMES.iter().any(|c| name.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_password_and_credentials_are_masked_and_nothing_else() {
        for (url, shown) in [
            (
                "http://bob:hunter22@host:9/x",
                "http://bob:[secret]@host:9/x",
            ),
            ("http://bob@host/x", "http://bob@host/x"),
            (
                "http://host:8080/x?token=t&page=2",
                "http://host:8080/x?token=[secret]&page=2",
            ),
            (
                "https://chat.example/v1/spaces/S/messages?key=K&Token=T&thread=1",
                "https://chat.example/v1/spaces/S/messages?key=[secret]&Token=[secret]&thread=1",
            ),
            (
                "https://h/x?access_token=a&api_key=b&sig=c&authorization=d&x=",
                "https://h/x?access_token=[secret]&api_key=[secret]&sig=[secret]&authorization=[secret]&x=",
            ),
            ("https://h/x?token=", "https://h/x?token="),
            (
                "postgresql://db:x/r?user=u&Password=pw&sslmode=require",
                "postgresql://db:x/r?user=u&Password=[secret]&sslmode=require",
            ),
            (
                "https://u:p@h/x?a=1#frag",
                "https://u:[secret]@h/x?a=1#frag",
            ),
            // An unencoded `@` or `/` in the password is masked with it.
            ("mysql://u:p@ss/w@rd@db/r", "mysql://u:[secret]@db/r"),
            ("roboger:pw@db.example/r", "roboger:[secret]@db.example/r"),
            ("not a url", "not a url"),
            ("http://@host/x", "http://@host/x"),
            // Tokens in the path; words, numbers and the host are kept.
            (
                "https://discord.com/api/webhooks/1234567890123/AbC-dEf_GhI0123456789jKlMnOpQ?wait=true",
                "https://discord.com/api/webhooks/1234567890123/[secret]?wait=true",
            ),
            (
                "https://mm.example/hooks/xl4f3fejx7bwdbhcxufhqhmyqa",
                "https://mm.example/hooks/[secret]",
            ),
            (
                "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/aBcDeFgHiJkLmNoPqRsTuV12",
                "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/[secret]",
            ),
            (
                "https://a1b2c3d4e5f6g7h8i9.example.com/alerts/prod-eu-west-1/alertmanager-hook",
                "https://a1b2c3d4e5f6g7h8i9.example.com/alerts/prod-eu-west-1/alertmanager-hook",
            ),
            (
                "postgresql://u:pw@db/roboger2026",
                "postgresql://u:[secret]@db/roboger2026",
            ),
        ] {
            assert_eq!(url_without_secrets(url), shown, "{url}");
        }
    }
}
