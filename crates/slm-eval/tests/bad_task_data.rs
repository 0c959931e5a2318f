//! Bad task data (issue 13): each crafted JSONL file gets an error that names the file, the 1-based line and the
//! field; an empty file or a limit of 0 is an error naming the file, never an empty table or a perplexity of 1.0.
//! The input file is byte-identical afterwards.

use std::path::{Path, PathBuf};

use slm_eval::{load_wikitext_docs, wikitext2_windows, EvalError, Task, TextEncoder};

/// Writes `content` as `task`'s data file in a fresh directory.
fn data_dir(task: &str, content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = Task::from_name(task).unwrap().data_path(dir.path());
    std::fs::write(&path, content).unwrap();
    (dir, path)
}

/// Runs `load` on a data directory holding `content` for `task`; returns the error message with the data file's
/// path replaced by `FILE`, after checking that the file is unchanged.
fn error_of(task: &str, content: &str, load: impl FnOnce(&Path) -> Result<(), EvalError>) -> String {
    let (dir, path) = data_dir(task, content);
    let before = std::fs::read(&path).unwrap();
    let msg = load(dir.path()).expect_err("bad data must be refused").to_string();
    assert_eq!(std::fs::read(&path).unwrap(), before, "{task}: the input file changed");
    let shown = path.display().to_string();
    assert!(msg.contains(&shown), "{task}: the message does not name the file: {msg}");
    msg.replace(&shown, "FILE")
}

fn docs_error(task: &str, content: &str, limit: Option<usize>) -> String {
    error_of(task, content, |dir| Task::from_name(task).unwrap().load_docs(dir, limit).map(drop))
}

const BOOLQ_GOOD: &str = r#"{"question": "q", "passage": "p", "idx": 0, "label": 1}"#;

/// Six good records (with a blank line among them) and then `bad` on physical line 7.
fn boolq_with_line7(bad: &str) -> String {
    format!("{BOOLQ_GOOD}\n{BOOLQ_GOOD}\n\n{BOOLQ_GOOD}\n{BOOLQ_GOOD}\n{BOOLQ_GOOD}\n{bad}\n{BOOLQ_GOOD}\n")
}

#[test]
fn boolq_label_out_of_range_names_file_line_and_field() {
    let cases = [
        (r#"{"question": "q", "passage": "p", "label": 5}"#, "field `label`: 5 is not a valid label (expected 0 or 1)"),
        (
            r#"{"question": "q", "passage": "p", "label": -1}"#,
            "field `label`: -1 is not a valid label (expected 0 or 1)",
        ),
        (
            r#"{"question": "q", "passage": "p", "label": "2"}"#,
            "field `label`: \"2\" is not a valid label (expected 0 or 1)",
        ),
        (
            r#"{"question": "q", "passage": "p", "label": "yes"}"#,
            "field `label`: expected an integer label (expected 0 or 1), got the string \"yes\"",
        ),
        (
            r#"{"question": "q", "passage": "p", "label": 1.5}"#,
            "field `label`: expected an integer label (expected 0 or 1), got the number 1.5",
        ),
        (
            r#"{"question": "q", "passage": "p", "label": null}"#,
            "field `label`: expected an integer label (expected 0 or 1), got null",
        ),
        (r#"{"question": "q", "passage": "p"}"#, "field `label`: missing from the record"),
        (r#"{"question": "q", "passage": 3, "label": 0}"#, "field `passage`: expected a string, got the number 3"),
        (r#"{"passage": "p", "label": 0}"#, "field `question`: missing from the record"),
    ];
    for (bad, want) in cases {
        assert_eq!(docs_error("boolq", &boolq_with_line7(bad), None), format!("FILE: line 7: {want}"), "{bad}");
    }
    // The limit stops before the bad record.
    let (dir, _path) = data_dir("boolq", &boolq_with_line7(cases[0].0));
    assert_eq!(Task::from_name("boolq").unwrap().load_docs(dir.path(), Some(5)).unwrap().len(), 5);
}

#[test]
fn piqa_bad_records() {
    let good = r#"{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}"#;
    let cases = [
        (
            r#"{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}"#,
            "field `label`: 2 is not a valid label (expected 0 or 1)",
        ),
        (r#"{"goal": "g", "sol1": "a", "label": 1}"#, "field `sol2`: missing from the record"),
        (
            r#"{"goal": "g", "sol1": ["a", "b"], "sol2": "b", "label": 1}"#,
            "field `sol1`: expected a string, got a list of 2 items",
        ),
        (
            r#"{"goal": true, "sol1": "a", "sol2": "b", "label": 1}"#,
            "field `goal`: expected a string, got the boolean true",
        ),
    ];
    for (bad, want) in cases {
        let msg = docs_error("piqa", &format!("{good}\n{bad}\n"), None);
        assert_eq!(msg, format!("FILE: line 2: {want}"), "{bad}");
    }
}

#[test]
fn hellaswag_bad_records() {
    let rec = |endings: &str, label: &str| {
        format!(r#"{{"activity_label": "A", "ctx_a": "x.", "ctx_b": "y", "endings": {endings}, "label": {label}}}"#)
    };
    let good = rec(r#"["a", "b", "c", "d"]"#, r#""0""#);
    let cases = [
        (rec(r#"["a", "b", "c", "d"]"#, r#""9""#), "field `label`: \"9\" is not a valid label (expected 0 to 3)"),
        (rec(r#"["a", "b", "c", "d"]"#, "4"), "field `label`: 4 is not a valid label (expected 0 to 3)"),
        (rec("[]", "0"), "field `endings`: the choice list is empty (a document needs at least one choice)"),
        (rec(r#"["a", 3, "c", "d"]"#, "0"), "field `endings[1]`: expected a string, got the number 3"),
        (rec(r#""abcd""#, "0"), "field `endings`: expected a list of strings, got the string \"abcd\""),
        (
            r#"{"activity_label": "A", "ctx_a": "x.", "endings": ["a"], "label": 0}"#.to_string(),
            "field `ctx_b`: missing from the record",
        ),
    ];
    for (bad, want) in cases {
        let msg = docs_error("hellaswag", &format!("{good}\n{good}\n{bad}\n"), None);
        assert_eq!(msg, format!("FILE: line 3: {want}"), "{bad}");
    }
}

#[test]
fn winogrande_bad_records() {
    let rec = |sentence: &str, answer: &str| {
        format!(r#"{{"sentence": "{sentence}", "option1": "A", "option2": "B", "answer": {answer}}}"#)
    };
    let cases = [
        (rec("_ ran.", r#""3""#), "field `answer`: \"3\" is not a valid label (expected \"1\" or \"2\")"),
        (rec("_ ran.", r#""0""#), "field `answer`: \"0\" is not a valid label (expected \"1\" or \"2\")"),
        (rec("_ ran.", "1"), "field `answer`: expected a string, got the number 1"),
        (rec("nobody ran.", r#""1""#), "field `sentence`: has no \"_\" blank for the options to fill"),
        (
            r#"{"sentence": "_ ran.", "option1": "A", "answer": "1"}"#.to_string(),
            "field `option2`: missing from the record",
        ),
    ];
    for (bad, want) in cases {
        let msg = docs_error("winogrande", &format!("{}\n{bad}\n", rec("_ ran.", r#""2""#)), None);
        assert_eq!(msg, format!("FILE: line 2: {want}"), "{bad}");
    }
}

#[test]
fn arc_and_openbookqa_bad_records() {
    let arc = |text: &str, labels: &str, key: &str| {
        format!(r#"{{"question": "q", "choices": {{"text": {text}, "label": {labels}}}, "answerKey": {key}}}"#)
    };
    let abcd = r#"["A", "B", "C", "D"]"#;
    let four = r#"["w", "x", "y", "z"]"#;
    let cases = [
        (
            arc(four, abcd, r#""E""#),
            "field `answerKey`: \"E\" is not a valid label \
             (expected one of `choices.label`: \"A\", \"B\", \"C\", \"D\")",
        ),
        (
            arc("[]", "[]", r#""A""#),
            "field `choices.text`: the choice list is empty (a document needs at least one choice)",
        ),
        (arc(r#"["w", null]"#, r#"["A", "B"]"#, r#""A""#), "field `choices.text[1]`: expected a string, got null"),
        (
            arc(four, r#"["A", "B", "C"]"#, r#""A""#),
            "field `choices.label`: 3 labels for 4 choices (expected one label per choice)",
        ),
        (arc(four, abcd, "1"), "field `answerKey`: expected a string, got the number 1"),
        (r#"{"question": "q", "answerKey": "A"}"#.to_string(), "field `choices.text`: missing from the record"),
        (
            r#"{"question": "q", "choices": ["w", "x"], "answerKey": "A"}"#.to_string(),
            "field `choices.text`: missing: `choices` is a list of 2 items, not an object",
        ),
    ];
    for task in ["arc_easy", "arc_challenge"] {
        for (bad, want) in &cases {
            let msg = docs_error(task, &format!("{}\n\n{bad}\n", arc(four, abcd, r#""B""#)), None);
            assert_eq!(msg, format!("FILE: line 3: {want}"), "{task}: {bad}");
        }
    }
    let obqa = r#"{"question_stem": "q", "choices": {"text": ["w", "x"], "label": ["A", "B"]}, "answerKey": " C"}"#;
    assert_eq!(
        docs_error("openbookqa", &format!("{obqa}\n"), None),
        "FILE: line 1: field `answerKey`: \" C\" is not a valid label (expected one of `choices.label`: \"A\", \"B\")"
    );
}

#[test]
fn records_that_are_not_objects_name_the_line() {
    let msg = docs_error("boolq", &format!("{BOOLQ_GOOD}\n[1, 2]\n"), None);
    assert_eq!(msg, "FILE: line 2: malformed record: expected a JSON object, got a list of 2 items");
    let msg = docs_error("boolq", &format!("{BOOLQ_GOOD}\n\"text\"\n"), None);
    assert_eq!(msg, "FILE: line 2: malformed record: expected a JSON object, got the string \"text\"");
    let msg = docs_error("boolq", &format!("{BOOLQ_GOOD}\n{{\"label\": \n"), None);
    assert!(msg.starts_with("FILE: line 2: malformed record: invalid JSON: "), "{msg}");
}

#[test]
fn empty_file_and_limit_zero_are_errors() {
    let no_records = "the file holds no records (it is empty or has only blank lines)";
    for task in ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] {
        for content in ["", "\n\n   \n"] {
            assert_eq!(docs_error(task, content, None), format!("FILE: task `{task}`: {no_records}"), "{task}");
            assert_eq!(docs_error(task, content, Some(10)), format!("FILE: task `{task}`: {no_records}"), "{task}");
        }
    }
    assert_eq!(
        docs_error("boolq", &format!("{BOOLQ_GOOD}\n"), Some(0)),
        "FILE: task `boolq`: a limit of 0 leaves no documents to evaluate (the limit must be at least 1)"
    );
}

/// Whitespace-separated words as tokens.
struct Words;

impl TextEncoder for Words {
    fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        Ok(text.split_whitespace().map(|w| w.len() as u32).collect())
    }
}

fn wikitext_error(content: &str, limit: Option<usize>) -> String {
    error_of("wikitext", content, |dir| load_wikitext_docs(dir, limit).map(drop))
}

fn wikitext2_error(content: &str, limit: Option<usize>) -> String {
    error_of("wikitext2-128", content, |dir| wikitext2_windows(&Words, dir, 128, limit).map(drop))
}

#[test]
fn wikitext_without_text_is_an_error_not_perplexity_one() {
    let no_records = "the file holds no records (it is empty or has only blank lines)";
    assert_eq!(wikitext_error("", None), format!("FILE: task `wikitext`: {no_records}"));
    assert_eq!(wikitext2_error("", None), format!("FILE: task `wikitext`: {no_records}"));
    let blank = "{\"text\": \"\"}\n{\"text\": \" \\n\"}\n{\"text\": \"\"}\n";
    let want = "FILE: task `wikitext`: all 3 rows have a blank `text` field: there is no text to score";
    assert_eq!(wikitext_error(blank, None), want);
    assert_eq!(wikitext2_error(blank, None), want);
    let good = "{\"text\": \" = A = \\n\"}\n{\"text\": \" a b c \\n\"}\n";
    assert_eq!(
        wikitext_error(good, Some(0)),
        "FILE: task `wikitext`: a limit of 0 leaves no pages to evaluate (the limit must be at least 1)"
    );
    assert_eq!(
        wikitext2_error(good, Some(0)),
        "FILE: task `wikitext2-128`: a limit of 0 leaves no windows to evaluate (the limit must be at least 1)"
    );
    // "= A =" and "a b c", joined: 6 words, fewer than one window.
    assert_eq!(
        wikitext2_error(good, None),
        "FILE: task `wikitext2-128`: the text tokenises to 6 tokens, fewer than one 128-token window needs"
    );
    let (dir, _path) = data_dir("wikitext", good);
    assert_eq!(load_wikitext_docs(dir.path(), None).unwrap().len(), 1);
    let long = format!("{{\"text\": \"{}\"}}\n", "w ".repeat(300));
    let (dir, _path) = data_dir("wikitext2-128", &long);
    assert_eq!(wikitext2_windows(&Words, dir.path(), 128, None).unwrap().len(), 2);
    assert_eq!(wikitext2_windows(&Words, dir.path(), 128, Some(1)).unwrap().len(), 1);
}

#[test]
fn wikitext_bad_rows_name_file_line_and_field() {
    let good = "{\"text\": \" a \\n\"}";
    assert_eq!(
        wikitext_error(&format!("{good}\n{{\"txt\": \"a\"}}\n"), None),
        "FILE: line 2: field `text`: missing from the record"
    );
    assert_eq!(
        wikitext_error(&format!("{good}\n\n{{\"text\": 7}}\n"), None),
        "FILE: line 3: field `text`: expected a string, got the number 7"
    );
    assert_eq!(
        wikitext2_error(&format!("{good}\n{{\"text\": [\"a\"]}}\n"), None),
        "FILE: line 2: field `text`: expected a string, got a list of 1 item"
    );
    // count_docs (lm-eval's n-samples.original) refuses the same files.
    let msg = error_of("wikitext", "", |dir| Task::from_name("wikitext").unwrap().count_docs(dir).map(drop));
    assert!(msg.starts_with("FILE: task `wikitext`: the file holds no records"), "{msg}");
}

/// The same refusals through `evaluate`, before any scoring: no empty table, no perplexity of 1.0.
#[test]
fn evaluate_refuses_nothing_to_evaluate() {
    let model = slm_model::Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let run = |task: &str, content: &str, limit: Option<usize>| {
        error_of(task, content, |dir| {
            let s = slm_eval::Settings {
                data_dir: dir,
                limit,
                max_length: model.spec.max_position_embeddings,
                batch_size: 4,
                share_context: true,
            };
            slm_eval::evaluate(&model, Task::from_name(task).unwrap(), &s, &mut slm_eval::Silent).map(drop)
        })
    };
    let no_records = "the file holds no records (it is empty or has only blank lines)";
    assert_eq!(run("boolq", "", None), format!("FILE: task `boolq`: {no_records}"));
    assert_eq!(
        run("boolq", &format!("{BOOLQ_GOOD}\n"), Some(0)),
        "FILE: task `boolq`: a limit of 0 leaves no documents to evaluate (the limit must be at least 1)"
    );
    assert_eq!(
        run("boolq", &boolq_with_line7(r#"{"question": "q", "passage": "p", "label": 5}"#), None),
        "FILE: line 7: field `label`: 5 is not a valid label (expected 0 or 1)"
    );
    assert_eq!(run("wikitext", "", None), format!("FILE: task `wikitext`: {no_records}"));
    assert_eq!(run("wikitext2-128", "", None), format!("FILE: task `wikitext`: {no_records}"));
    let good = "{\"text\": \" = A = \\n\"}\n{\"text\": \" a b c \\n\"}\n";
    assert_eq!(
        run("wikitext", good, Some(0)),
        "FILE: task `wikitext`: a limit of 0 leaves no pages to evaluate (the limit must be at least 1)"
    );
    let msg = run("wikitext2-128", good, None);
    assert!(msg.starts_with("FILE: task `wikitext2-128`: the text tokenises to "), "{msg}");
    assert!(msg.ends_with(" tokens, fewer than one 128-token window needs"), "{msg}");
}
