//! Wire types shared by the server and plugins.
//!
//! Invariant: this module is the only place that defines how a value is
//! spelled on the wire; the server and plugins both import it from here.

use serde::{Deserialize, Serialize};

/// An event level, as numbered by the original Roboger (Python logging
/// levels): DEBUG 10, INFO 20, WARNING 30, ERROR 40, CRITICAL 50.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(into = "u8", try_from = "u8")]
pub enum Level {
    /// 10
    Debug = 10,
    /// 20, the default when nothing (or nothing recognisable) is given.
    #[default]
    Info = 20,
    /// 30; levels from here up may use the limits' reserve.
    Warning = 30,
    /// 40
    Error = 40,
    /// 50
    Critical = 50,
}

impl Level {
    /// All levels, lowest first.
    pub const ALL: [Level; 5] = [
        Level::Debug,
        Level::Info,
        Level::Warning,
        Level::Error,
        Level::Critical,
    ];

    /// The numeric code (10..=50).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The level for an exact numeric code, if it is one of the five.
    pub fn from_code(code: i64) -> Option<Level> {
        Level::ALL.into_iter().find(|l| i64::from(l.code()) == code)
    }

    /// The upper-case name the original sends as `level_name`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
            Level::Critical => "CRITICAL",
        }
    }

    /// The original's `convert_level` for a string: a numeric string in the
    /// set is that level; otherwise the first letter (d, i, w, e, c, any
    /// case) decides; anything else is INFO.
    pub fn convert_str(s: &str) -> Level {
        let t = s.trim();
        if let Ok(n) = t.parse::<i64>() {
            return Level::from_code(n).unwrap_or(Level::Info);
        }
        match t.chars().next().map(|c| c.to_ascii_lowercase()) {
            Some('d') => Level::Debug,
            Some('i') => Level::Info,
            Some('w') => Level::Warning,
            Some('e') => Level::Error,
            Some('c') => Level::Critical,
            _ => Level::Info,
        }
    }

    /// The original's `convert_level` for any JSON value: integers (and
    /// integral floats) in the set, strings as [`Level::convert_str`],
    /// everything else INFO.
    pub fn convert(v: &serde_json::Value) -> Level {
        match v {
            serde_json::Value::Number(n) => {
                let code = n
                    .as_i64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64));
                code.and_then(Level::from_code).unwrap_or(Level::Info)
            }
            serde_json::Value::String(s) => Level::convert_str(s),
            _ => Level::Info,
        }
    }
}

impl From<Level> for u8 {
    fn from(l: Level) -> u8 {
        l.code()
    }
}

impl TryFrom<u8> for Level {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        Level::from_code(i64::from(v)).ok_or_else(|| format!("invalid level code {v}"))
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn convert_level_matches_the_original() {
        assert_eq!(Level::convert(&json!(30)), Level::Warning);
        assert_eq!(Level::convert(&json!("40")), Level::Error);
        assert_eq!(Level::convert(&json!(30.0)), Level::Warning);
        assert_eq!(Level::convert(&json!(31)), Level::Info);
        assert_eq!(Level::convert(&json!("Warn")), Level::Warning);
        assert_eq!(Level::convert(&json!("CRIT")), Level::Critical);
        assert_eq!(Level::convert(&json!("debug")), Level::Debug);
        assert_eq!(Level::convert(&json!("e")), Level::Error);
        assert_eq!(Level::convert(&json!("x")), Level::Info);
        assert_eq!(Level::convert(&json!("")), Level::Info);
        assert_eq!(Level::convert(&json!(null)), Level::Info);
        assert_eq!(Level::convert(&json!([1])), Level::Info);
    }

    #[test]
    fn levels_serialize_as_numbers() {
        assert_eq!(serde_json::to_string(&Level::Error).unwrap(), "40");
        assert_eq!(serde_json::from_str::<Level>("10").unwrap(), Level::Debug);
        assert!(serde_json::from_str::<Level>("11").is_err());
    }
}
