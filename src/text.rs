//! Messages for PostgreSQL's log, which takes one line per error: text from other crates (a
//! server's message, a parser's, age's) can span several. No dependencies, so any layer can use it.

/// `text` with every run of whitespace, line breaks included, as one space.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_breaks_and_runs_of_space_become_one_space() {
        assert_eq!(
            super::one_line(" Unknown age format.\nHave you tried  upgrading?\n"),
            "Unknown age format. Have you tried upgrading?"
        );
    }
}
