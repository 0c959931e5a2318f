//! String operations with Python's exact semantics, and the text preprocessing lm-eval applies
//! (HellaSwag's `preprocess`, WikiText's `wikitext_detokenizer`).
//!
//! Python's `str.isspace` (and `\s` in `re` for str patterns) is Unicode `White_Space` plus the
//! four separators U+001C..U+001F, which Rust's `char::is_whitespace` does not count.

/// Python's `str.isspace` for one character.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `str.rstrip()`.
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_isspace)
}

/// Python's `str.capitalize()` (3.8+): the first character title-cased, every other character
/// lower-cased (final-sigma rule applied with the whole string as context).
pub fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return String::new();
    };
    let mut out = titlecase(first);
    // Lower-case the whole string so that context-dependent mappings (final sigma) see the
    // first character, then drop the first character's own lower-case expansion.
    let lower = s.to_lowercase();
    let first_lower: String = first.to_lowercase().collect();
    out.push_str(lower.strip_prefix(first_lower.as_str()).unwrap_or(&lower));
    out
}

/// Unicode title case of one character. Differs from upper case only for the Latin digraphs,
/// ß and the Latin ligatures (Greek iota-subscript letters are left to upper case).
fn titlecase(c: char) -> String {
    match c {
        '\u{1c4}'..='\u{1c6}' => "\u{1c5}".into(),
        '\u{1c7}'..='\u{1c9}' => "\u{1c8}".into(),
        '\u{1ca}'..='\u{1cc}' => "\u{1cb}".into(),
        '\u{1f1}'..='\u{1f3}' => "\u{1f2}".into(),
        'ß' => "Ss".into(),
        '\u{fb00}' => "Ff".into(),
        '\u{fb01}' => "Fi".into(),
        '\u{fb02}' => "Fl".into(),
        '\u{fb03}' => "Ffi".into(),
        '\u{fb04}' => "Ffl".into(),
        '\u{fb05}' | '\u{fb06}' => "St".into(),
        _ => c.to_uppercase().collect(),
    }
}

/// HellaSwag's `preprocess` (lm_eval/tasks/hellaswag/utils.py):
/// strip; `" [title]"` → `". "`; delete every `\[.*?\]` (`.` not matching a newline);
/// `"  "` → `" "` in one left-to-right pass. No strip afterwards.
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = py_strip(text).replace(" [title]", ". ");
    remove_bracket_groups(&t).replace("  ", " ")
}

/// `re.sub(r"\[.*?\]", "", s)`: from each `[`, the shortest run up to the next `]` on the same line.
fn remove_bracket_groups(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let closes = after.find(']').filter(|&j| !after[..j].contains('\n'));
        match closes {
            Some(j) => rest = &after[j + 1..],
            None => {
                // No match starting at this '[': keep it and try from the next character.
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `re.sub(r"O\s*([^C]*?)\s*C", r"O\1C", s)` for an opener `O` and closer `C` (which may be the
/// same character): whitespace just inside each pair is removed, pairs taken left to right.
fn trim_inside_pairs(s: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(open) {
        out.push_str(&rest[..i]);
        let after = &rest[i + open.len_utf8()..];
        match after.find(close) {
            Some(j) => {
                out.push(open);
                out.push_str(py_strip(&after[..j]));
                out.push(close);
                rest = &after[j + close.len_utf8()..];
            }
            None => {
                // No closer after this opener, hence none after any later one either.
                out.push_str(&rest[i..]);
                return out;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `re.sub(r"/' [0-9]/", r"/'[0-9]/", s)`: lm-eval's (buggy, literal-slash) pattern, replicated.
fn replace_slash_quote_digit(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut i = 0;
    while i + 5 <= b.len() {
        if &b[i..i + 3] == b"/' " && b[i + 3].is_ascii_digit() && b[i + 4] == b'/' {
            out.push_str(&s[last..i]);
            out.push_str("/'[0-9]/");
            i += 5;
            last = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&s[last..]);
    out
}

/// lm-eval's `wikitext_detokenizer` (lm_eval/tasks/wikitext/preprocess_wikitext.py), step by step.
pub fn wikitext_detokenize(page: &str) -> String {
    let mut s = page.replace("s '", "s'");
    s = replace_slash_quote_digit(&s);
    for (from, to) in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")] {
        s = s.replace(from, to);
    }
    for (from, to) in [(" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")] {
        s = s.replace(from, to);
    }
    for (open, close) in [('(', ')'), ('[', ']'), ('{', '}'), ('"', '"'), ('\'', '\'')] {
        s = trim_inside_pairs(&s, open, close);
    }
    for (from, to) in [
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \u{b0} ", "\u{b0}"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" N ", " 1 "),
        (" 's", "'s"),
    ] {
        s = s.replace(from, to);
    }
    s
}

/// `len(re.split(r"\s+", s))`: the number of pieces between maximal whitespace runs (leading and
/// trailing runs yield empty pieces, which count).
pub fn py_split_whitespace_count(s: &str) -> usize {
    let mut runs = 0;
    let mut in_run = false;
    for c in s.chars() {
        let ws = py_isspace(c);
        if ws && !in_run {
            runs += 1;
        }
        in_run = ws;
    }
    runs + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace() {
        assert!(py_isspace('\u{1f}') && py_isspace('\u{a0}') && py_isspace('\u{3000}'));
        assert!(!py_isspace('\u{200b}') && !py_isspace('x'));
        assert_eq!(py_strip("\u{1c} a b \n"), "a b");
        assert_eq!(py_rstrip("  a \t"), "  a");
    }

    #[test]
    fn capitalize_lowers_the_rest() {
        assert_eq!(py_capitalize("the lady"), "The lady");
        assert_eq!(py_capitalize("he USES a BBQ"), "He uses a bbq");
        assert_eq!(py_capitalize(""), "");
        assert_eq!(py_capitalize("éLAN"), "Élan");
        assert_eq!(py_capitalize("ǆungla"), "ǅungla");
        assert_eq!(py_capitalize("ßA"), "Ssa");
        // Final sigma needs the first letter as context: Python gives 'Ας'.
        assert_eq!(py_capitalize("ΑΣ"), "Ας");
        assert_eq!(py_capitalize("1ABC"), "1abc");
    }

    #[test]
    fn hellaswag_preprocessing() {
        // strip, then " [title]" → ". ", then bracket groups removed, then double spaces halved once.
        assert_eq!(
            hellaswag_preprocess("  Home and Garden: [header] How to x [title] Buy a   thing. "),
            "Home and Garden: How to x. Buy a  thing."
        );
        // "[a [b]" is one lazy match; the stray "c]" stays.
        assert_eq!(hellaswag_preprocess("x [a [b] c] y"), "x c] y");
        // '.' does not match a newline: the first '[' has no match, the second does.
        assert_eq!(hellaswag_preprocess("a [b\n[c] d]"), "a [b\n d]");
        // Removal leaves a leading space that is not stripped again.
        assert_eq!(hellaswag_preprocess("[step] do it"), " do it");
        assert_eq!(hellaswag_preprocess("no brackets ["), "no brackets [");
    }

    #[test]
    fn detokenizer_steps() {
        assert_eq!(
            wikitext_detokenize(" = = Career = = \n The 1 @,@ 000 @-@ odd men 's ( mostly ) \" old \" ones . \n"),
            " == Career ==\nThe 1,000-odd men's (mostly) \"old\" ones.\n"
        );
        // Apostrophes pair up left to right across words.
        assert_eq!(wikitext_detokenize("a ' b ' c ' d"), "a 'b' c ' d");
        assert_eq!(wikitext_detokenize("x /' 5/ y"), "x /'[0-9]/ y");
        assert_eq!(wikitext_detokenize("the players ' team"), "the players' team");
        assert_eq!(wikitext_detokenize("5 ° C"), "5°C");
    }

    #[test]
    fn whitespace_split_count() {
        assert_eq!(py_split_whitespace_count(" a b\n"), 4);
        assert_eq!(py_split_whitespace_count("a"), 1);
        assert_eq!(py_split_whitespace_count(""), 1);
        assert_eq!(py_split_whitespace_count("a \n\t b"), 2);
    }
}
