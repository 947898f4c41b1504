//! Tables that tasks write into README.md, between marker comments.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};

/// Replaces the text between the lines `begin` and `end` of `readme` with
/// `table`.
pub fn replace_section(readme: &Path, begin: &str, end: &str, table: &str) -> Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let updated = replaced(&text, begin, end, table)
        .with_context(|| format!("{} has no `{begin}` ... `{end}` markers", readme.display()))?;
    fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
}

/// `text` with the part between `begin` and `end` replaced by `table`.
fn replaced(text: &str, begin: &str, end: &str, table: &str) -> Option<String> {
    let start = text.find(begin)? + begin.len();
    let stop = start + text[start..].find(end)?;
    Some(format!("{}\n{table}{}", &text[..start], &text[stop..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_text_between_the_markers_changes() {
        let text = "intro\n<!-- b -->\nold\n<!-- e -->\nrest\n";
        assert_eq!(
            replaced(text, "<!-- b -->", "<!-- e -->", "| new |\n").as_deref(),
            Some("intro\n<!-- b -->\n| new |\n<!-- e -->\nrest\n")
        );
        assert!(replaced(text, "<!-- x -->", "<!-- e -->", "").is_none());
        assert!(replaced("<!-- e --> <!-- b -->", "<!-- b -->", "<!-- e -->", "").is_none());
    }
}
