//! Named SQL parameters (`:name`, as plugins of the original write them)
//! turned into the backend's positional placeholders, outside quotes.

use serde_json::Value;

/// Rewrites `:name` placeholders as `$1, $2…` (PostgreSQL) or `?`, and
/// returns the names in order. `::` (a cast) and quoted text are kept.
pub fn positional(sql: &str, dollar: bool) -> (String, Vec<String>) {
    let mut out = String::with_capacity(sql.len());
    let mut names = Vec::new();
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            ':' if chars.peek() == Some(&':') => {
                out.push_str("::");
                chars.next();
            }
            ':' if chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') =>
            {
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        name.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                names.push(name);
                if dollar {
                    out.push_str(&format!("${}", names.len()));
                } else {
                    out.push('?');
                }
            }
            _ => out.push(c),
        }
    }
    (out, names)
}

/// A JSON parameter as a database value.
pub fn to_value(v: &Value) -> sea_orm::Value {
    match v {
        Value::Null => sea_orm::Value::String(None),
        Value::Bool(b) => sea_orm::Value::Bool(Some(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => sea_orm::Value::BigInt(Some(i)),
            None => sea_orm::Value::Double(n.as_f64()),
        },
        Value::String(s) => sea_orm::Value::String(Some(s.clone())),
        other => sea_orm::Value::String(Some(other.to_string())),
    }
}

/// A column whose type the driver does not report, as JSON: integer,
/// real, text, or null (blobs become null).
pub fn untyped_column(row: &sea_orm::QueryResult, name: &str) -> Value {
    if let Ok(Some(i)) = row.try_get_by::<Option<i64>, _>(name) {
        return Value::from(i);
    }
    if let Ok(Some(f)) = row.try_get_by::<Option<f64>, _>(name) {
        return Value::from(f);
    }
    if let Ok(Some(s)) = row.try_get_by::<Option<String>, _>(name) {
        return Value::from(s);
    }
    Value::Null
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_outside_quotes() {
        let (q, n) = positional(
            "SELECT * FROM t WHERE a=:a AND b = ':x' AND c=:c_1::text",
            true,
        );
        assert_eq!(q, "SELECT * FROM t WHERE a=$1 AND b = ':x' AND c=$2::text");
        assert_eq!(n, ["a", "c_1"]);
        let (q, _) = positional("UPDATE t SET v=:v WHERE id=:id", false);
        assert_eq!(q, "UPDATE t SET v=? WHERE id=?");
    }
}
