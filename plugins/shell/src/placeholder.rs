//! The original's placeholders inside single quotes. The original spliced
//! each `$msg`, `$subject`, ... into the command's text wherever it stood,
//! so `echo '$msg' >> log` wrote the message; here the fields are
//! environment variables, which a shell does not expand inside single
//! quotes. [`expand_in_single_quotes`] rewrites such a placeholder to
//! close the quote, expand the variable in double quotes and reopen it
//! (`'"${msg}"'`): the same text as the original's, and still data, never
//! parsed as shell.

use std::borrow::Cow;

/// The fields the original replaced, as it matched them: `$name` followed
/// by any character but `_` (so `$level` is not a prefix of
/// `$level_name`). `$media` is not among them here: no environment holds
/// it (`ROBOGER_MEDIA_FILE` does).
pub const NAMES: [&str; 10] = [
    "event_id",
    "addr",
    "msg",
    "subject",
    "formatted_subject",
    "level",
    "level_name",
    "location",
    "tag",
    "sender",
];

#[derive(Clone, Copy, PartialEq)]
enum Quoting {
    None,
    Single,
    Double,
}

/// `command` with each placeholder inside single quotes made an
/// expansion; unchanged (borrowed) when it has none. It follows `sh`'s
/// quoting: backslash escapes outside single quotes, and a comment (a `#`
/// starting a word, to the end of its line) is not read for quotes.
pub fn expand_in_single_quotes(command: &str) -> Cow<'_, str> {
    if !command.contains('\'') || !command.contains('$') {
        return Cow::Borrowed(command);
    }
    let mut out = String::with_capacity(command.len() + 16);
    let mut changed = false;
    let mut quoting = Quoting::None;
    let mut rest = command;
    // Whether the previous character ended a word (a `#` there opens a
    // comment).
    let mut word_start = true;
    while let Some(c) = rest.chars().next() {
        let len = c.len_utf8();
        match (quoting, c) {
            (Quoting::Single, '\'') => quoting = Quoting::None,
            (Quoting::Single, '$') => {
                if let Some(name) = placeholder(&rest[1..]) {
                    out.push_str("'\"${");
                    out.push_str(name);
                    out.push_str("}\"'");
                    rest = &rest[1 + name.len()..];
                    changed = true;
                    continue;
                }
            }
            (Quoting::None | Quoting::Double, '\\') => {
                // The escaped character is copied as it is.
                let escaped = rest[1..].chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..1 + escaped]);
                rest = &rest[1 + escaped..];
                word_start = false;
                continue;
            }
            (Quoting::None, '\'') => quoting = Quoting::Single,
            (Quoting::None, '"') => quoting = Quoting::Double,
            (Quoting::Double, '"') => quoting = Quoting::None,
            (Quoting::None, '#') if word_start => {
                let end = rest.find('\n').unwrap_or(rest.len());
                out.push_str(&rest[..end]);
                rest = &rest[end..];
                continue;
            }
            _ => {}
        }
        word_start = quoting == Quoting::None
            && (c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')'));
        out.push(c);
        rest = &rest[len..];
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(command)
    }
}

/// The placeholder `after` (the text after a `$`) opens with, by the
/// original's rule: its name, then a character other than `_`.
fn placeholder(after: &str) -> Option<&'static str> {
    NAMES.into_iter().find(|name| {
        after.starts_with(name) && after[name.len()..].chars().next().is_some_and(|c| c != '_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_in_single_quotes_become_expansions() {
        let cases = [
            ("echo '$msg' >> log", "echo ''\"${msg}\"'' >> log"),
            (
                "echo 'at $location: $level_name!'",
                "echo 'at '\"${location}\"': '\"${level_name}\"'!'",
            ),
            // As the original matched it: `$msgs` is `$msg` then `s`.
            ("echo '$msgs'", "echo ''\"${msg}\"'s'"),
            ("echo '$level'", "echo ''\"${level}\"''"),
        ];
        for (command, want) in cases {
            assert_eq!(expand_in_single_quotes(command), want, "{command}");
        }
    }

    #[test]
    fn other_text_is_left_as_it_is() {
        for command in [
            "echo \"$msg\" $tag",
            // Not a placeholder, or not in single quotes.
            "echo '$HOME' '$msg_x' \"'$msg'\"",
            "echo \\'$msg\\'",
            // A quote in a comment opens nothing.
            "echo hi # don't\necho $msg",
            "echo 'unterminated $other",
            "no quotes at all",
        ] {
            assert!(
                matches!(expand_in_single_quotes(command), Cow::Borrowed(_)),
                "{command}"
            );
        }
    }

    /// What `sh` prints for each rewritten command is what the original's
    /// splicing printed, and a message full of shell still stays data.
    #[test]
    fn sh_prints_what_the_original_spliced() {
        let msg = "it's $(touch /tmp/nope) `id` \"quoted\" \\ done";
        for (command, want) in [
            ("printf %s '$msg'", msg.to_string()),
            ("printf %s 'x$msg y'", format!("x{msg} y")),
            ("printf %s '[$level_name]'", "[WARNING]".to_string()),
        ] {
            let rewritten = expand_in_single_quotes(command);
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(rewritten.as_ref())
                .env("msg", msg)
                .env("level_name", "WARNING")
                .output()
                .expect("sh runs");
            assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{command}");
        }
    }
}
