//! Event text put into a message that a chat service reads as markup
//! (Telegram's HTML, Slack's mrkdwn): escaped, so it is shown as sent and
//! cannot format, link or mention anything of its own.

/// `text` with the three characters both HTML and Slack's mrkdwn read as
/// markup (`&`, `<`, `>`) written as the entities both decode.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_three_markup_characters_are_escaped() {
        assert_eq!(
            super::escape("<!channel> & <b>\"é\"</b>"),
            "&lt;!channel&gt; &amp; &lt;b&gt;\"é\"&lt;/b&gt;"
        );
    }
}
