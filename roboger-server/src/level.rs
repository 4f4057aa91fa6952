//! Event levels and the subscription rules that compare them.
//!
//! The numeric [`Level`] itself is a wire type and lives in the SDK; this
//! module adds [`LevelMatch`], the per-subscription comparison.

pub use roboger_plugin_sdk::protocol::Level;

/// How a subscription's level is compared with an event's level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LevelMatch {
    /// `e`: the event's level equals the subscription's.
    Equal,
    /// `g` (alias `gt`): the event's level is greater.
    Greater,
    /// `ge`: greater or equal (the default).
    #[default]
    GreaterOrEqual,
    /// `l` (alias `lt`): the event's level is lower.
    Less,
    /// `le`: lower or equal.
    LessOrEqual,
}

impl LevelMatch {
    /// Parses the API spelling; `gt` and `lt` are accepted as aliases of
    /// `g` and `l`. Anything else is refused.
    pub fn parse(s: &str) -> Option<LevelMatch> {
        Some(match s {
            "e" => LevelMatch::Equal,
            "g" | "gt" => LevelMatch::Greater,
            "ge" => LevelMatch::GreaterOrEqual,
            "l" | "lt" => LevelMatch::Less,
            "le" => LevelMatch::LessOrEqual,
            _ => return None,
        })
    }

    /// The canonical spelling stored in the database and sent in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LevelMatch::Equal => "e",
            LevelMatch::Greater => "g",
            LevelMatch::GreaterOrEqual => "ge",
            LevelMatch::Less => "l",
            LevelMatch::LessOrEqual => "le",
        }
    }

    /// Whether an event at `event` passes a subscription at `sub`.
    pub fn matches(self, sub: u8, event: u8) -> bool {
        match self {
            LevelMatch::Equal => event == sub,
            LevelMatch::Greater => event > sub,
            LevelMatch::GreaterOrEqual => event >= sub,
            LevelMatch::Less => event < sub,
            LevelMatch::LessOrEqual => event <= sub,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_aliases() {
        for (s, canon) in [
            ("e", "e"),
            ("g", "g"),
            ("gt", "g"),
            ("ge", "ge"),
            ("l", "l"),
            ("lt", "l"),
            ("le", "le"),
        ] {
            assert_eq!(LevelMatch::parse(s).map(LevelMatch::as_str), Some(canon));
        }
        for bad in ["", "eq", "GE", "x", "gte"] {
            assert_eq!(LevelMatch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn rules_compare_like_the_original() {
        assert!(LevelMatch::Equal.matches(30, 30) && !LevelMatch::Equal.matches(30, 40));
        assert!(LevelMatch::Greater.matches(30, 40) && !LevelMatch::Greater.matches(30, 30));
        assert!(LevelMatch::GreaterOrEqual.matches(30, 30));
        assert!(!LevelMatch::GreaterOrEqual.matches(30, 20));
        assert!(LevelMatch::Less.matches(30, 20) && !LevelMatch::Less.matches(30, 30));
        assert!(LevelMatch::LessOrEqual.matches(30, 30));
        assert!(!LevelMatch::LessOrEqual.matches(30, 40));
    }
}
