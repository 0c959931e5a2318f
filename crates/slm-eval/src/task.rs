//! Task definitions as data, and the one interpreter that turns a JSONL record into a [`Doc`].
//!
//! Each multiple-choice task is a [`TaskSpec`]: the lm-eval prompt template (`doc_to_text`, with
//! `{{field}}` placeholders), where the choices come from (`doc_to_choice`), where the gold index
//! comes from (`doc_to_target`), and the metrics. The two tasks that lm-eval defines with Python
//! functions rather than templates (HellaSwag's `process_docs`, WinoGrande's partial scoring) are
//! [`DocFormat`] variants with the functions written out once in [`interpret`].

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::EvalError;
use crate::text::{hellaswag_preprocess, py_capitalize, py_strip};

/// A metric as lm-eval names it (the part before `,none` in the results keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// 1 when the highest log-likelihood choice is gold.
    Acc,
    /// 1 when the highest log-likelihood per character of the choice is gold.
    AccNorm,
    /// `exp(-Σll / Σwords)` over WikiText pages.
    WordPerplexity,
    /// `exp(-Σll / Σbytes)` over WikiText pages.
    BytePerplexity,
    /// `(-Σll / Σbytes) / ln 2` over WikiText pages.
    BitsPerByte,
    /// `exp(-Σll / Σtokens)` over fixed windows (the LLM-Pruner/SLM protocol).
    Perplexity,
}

impl Metric {
    /// lm-eval's name for the metric.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::WordPerplexity => "word_perplexity",
            Metric::BytePerplexity => "byte_perplexity",
            Metric::BitsPerByte => "bits_per_byte",
            Metric::Perplexity => "perplexity",
        }
    }

    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Acc | Metric::AccNorm)
    }
}

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// lm-eval `output_type: multiple_choice`: one log-likelihood request per choice.
    MultipleChoice,
    /// lm-eval `wikitext`: `loglikelihood_rolling` over document-level pages.
    RollingPerplexity,
    /// `wikitext2-128`: rows joined with "\n\n", non-overlapping 128-token windows.
    WindowPerplexity,
}

/// Where a multiple-choice task's choices come from.
#[derive(Debug, Clone, Copy)]
pub enum Choices {
    /// The same list for every document (BoolQ's `["no", "yes"]`).
    Fixed(&'static [&'static str]),
    /// One string field per choice, verbatim (PIQA's `[sol1, sol2]`).
    Fields(&'static [&'static str]),
    /// A list-of-strings field, dotted path (`choices.text`).
    List(&'static str),
}

/// Where the gold index comes from.
#[derive(Debug, Clone, Copy)]
pub enum Gold {
    /// An integer field, or a string holding one (`label`).
    Int(&'static str),
    /// `labels.index(key)`: position of the key field's value in a list field
    /// (`choices.label.index(answerKey)`), optionally after `lstrip()` of the key.
    IndexOf { key: &'static str, labels: &'static str, lstrip_key: bool },
}

/// How a record becomes contexts, continuations and a gold index.
#[derive(Debug, Clone, Copy)]
pub enum DocFormat {
    /// lm-eval's template tasks: context = `doc_to_text` filled in, one request per choice with
    /// continuation = `" " + choice`.
    Template {
        /// `doc_to_text`, with `{{field}}` placeholders, or a bare field name.
        text: &'static str,
        choices: Choices,
        gold: Gold,
    },
    /// HellaSwag's `process_docs`: query = preprocess(activity_label + ": " + ctx_a + " " +
    /// ctx_b.capitalize()), choices = preprocess(each ending), gold = int(label).
    HellaSwag,
    /// WinoGrande's partial evaluation: contexts sentence[:i] + option (one per option), shared
    /// continuation " " + strip(sentence[i+1:]), i = index of the first "_"; gold = answer - 1.
    WinoGrande,
    /// A perplexity task (no documents of this shape).
    Perplexity,
}

/// One task, as data. The `config_*` strings are what the results JSON reports as the task config
/// (lm-eval's own YAML values).
#[derive(Debug)]
pub struct TaskSpec {
    pub name: &'static str,
    pub kind: TaskKind,
    /// File name inside the data directory.
    pub file: &'static str,
    /// The split lm-eval evaluates (`validation` or `test`).
    pub split: &'static str,
    pub version: f64,
    pub tag: Option<&'static str>,
    pub metrics: &'static [Metric],
    pub format: DocFormat,
    pub config_doc_to_text: &'static str,
    pub config_doc_to_target: &'static str,
    /// `doc_to_choice` as lm-eval's config shows it: a template string, or a JSON list.
    pub config_doc_to_choice: &'static str,
    pub config_process_docs: Option<&'static str>,
}

const ARC_TEXT: &str = "Question: {{question}}\nAnswer:";
const ARC_GOLD: Gold = Gold::IndexOf { key: "answerKey", labels: "choices.label", lstrip_key: false };
const ACC: &[Metric] = &[Metric::Acc];
const ACC_BOTH: &[Metric] = &[Metric::Acc, Metric::AccNorm];

const HELLASWAG_PROCESS_DOCS: &str = "def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:\n    def _process_doc(doc):\n        ctx = doc[\"ctx_a\"] + \" \" + doc[\"ctx_b\"].capitalize()\n        out_doc = {\n            \"query\": preprocess(doc[\"activity_label\"] + \": \" + ctx),\n            \"choices\": [preprocess(ending) for ending in doc[\"endings\"]],\n            \"gold\": int(doc[\"label\"]),\n        }\n        return out_doc\n\n    return dataset.map(_process_doc)\n";

/// All tasks, in the order `slm eval` lists them.
pub static TASKS: &[TaskSpec] = &[
    TaskSpec {
        name: "boolq",
        kind: TaskKind::MultipleChoice,
        file: "boolq.validation.jsonl",
        split: "validation",
        version: 2.0,
        tag: Some("super-glue-lm-eval-v1"),
        metrics: ACC,
        format: DocFormat::Template {
            text: "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            choices: Choices::Fixed(&["no", "yes"]),
            gold: Gold::Int("label"),
        },
        config_doc_to_text: "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        config_doc_to_target: "label",
        config_doc_to_choice: "[\"no\", \"yes\"]",
        config_process_docs: None,
    },
    TaskSpec {
        name: "piqa",
        kind: TaskKind::MultipleChoice,
        file: "piqa.validation.jsonl",
        split: "validation",
        version: 1.0,
        tag: None,
        metrics: ACC_BOTH,
        format: DocFormat::Template {
            text: "Question: {{goal}}\nAnswer:",
            choices: Choices::Fields(&["sol1", "sol2"]),
            gold: Gold::Int("label"),
        },
        config_doc_to_text: "Question: {{goal}}\nAnswer:",
        config_doc_to_target: "label",
        config_doc_to_choice: "{{[sol1, sol2]}}",
        config_process_docs: None,
    },
    TaskSpec {
        name: "hellaswag",
        kind: TaskKind::MultipleChoice,
        file: "hellaswag.validation.jsonl",
        split: "validation",
        version: 1.0,
        tag: Some("multiple_choice"),
        metrics: ACC_BOTH,
        format: DocFormat::HellaSwag,
        config_doc_to_text: "{{query}}",
        config_doc_to_target: "{{label}}",
        config_doc_to_choice: "choices",
        config_process_docs: Some(HELLASWAG_PROCESS_DOCS),
    },
    TaskSpec {
        name: "winogrande",
        kind: TaskKind::MultipleChoice,
        file: "winogrande_xl.validation.jsonl",
        split: "validation",
        version: 1.0,
        tag: None,
        metrics: ACC,
        format: DocFormat::WinoGrande,
        config_doc_to_text: "def doc_to_text(doc):\n    answer_to_num = {\"1\": 0, \"2\": 1}\n    return answer_to_num[doc[\"answer\"]]\n",
        config_doc_to_target: "def doc_to_target(doc):\n    idx = doc[\"sentence\"].index(\"_\") + 1\n    return doc[\"sentence\"][idx:].strip()\n",
        config_doc_to_choice: "def doc_to_choice(doc):\n    idx = doc[\"sentence\"].index(\"_\")\n    options = [doc[\"option1\"], doc[\"option2\"]]\n    return [doc[\"sentence\"][:idx] + opt for opt in options]\n",
        config_process_docs: None,
    },
    TaskSpec {
        name: "arc_easy",
        kind: TaskKind::MultipleChoice,
        file: "arc_easy.test.jsonl",
        split: "test",
        version: 1.0,
        tag: Some("ai2_arc"),
        metrics: ACC_BOTH,
        format: DocFormat::Template {
            text: ARC_TEXT,
            choices: Choices::List("choices.text"),
            gold: ARC_GOLD,
        },
        config_doc_to_text: ARC_TEXT,
        config_doc_to_target: "{{choices.label.index(answerKey)}}",
        config_doc_to_choice: "{{choices.text}}",
        config_process_docs: None,
    },
    TaskSpec {
        name: "arc_challenge",
        kind: TaskKind::MultipleChoice,
        file: "arc_challenge.test.jsonl",
        split: "test",
        version: 1.0,
        tag: Some("ai2_arc"),
        metrics: ACC_BOTH,
        format: DocFormat::Template {
            text: ARC_TEXT,
            choices: Choices::List("choices.text"),
            gold: ARC_GOLD,
        },
        config_doc_to_text: ARC_TEXT,
        config_doc_to_target: "{{choices.label.index(answerKey)}}",
        config_doc_to_choice: "{{choices.text}}",
        config_process_docs: None,
    },
    TaskSpec {
        name: "openbookqa",
        kind: TaskKind::MultipleChoice,
        file: "openbookqa.test.jsonl",
        split: "test",
        version: 1.0,
        tag: None,
        metrics: ACC_BOTH,
        format: DocFormat::Template {
            text: "question_stem",
            choices: Choices::List("choices.text"),
            gold: Gold::IndexOf {
                key: "answerKey",
                labels: "choices.label",
                lstrip_key: true,
            },
        },
        config_doc_to_text: "question_stem",
        config_doc_to_target: "{{choices.label.index(answerKey.lstrip())}}",
        config_doc_to_choice: "{{choices.text}}",
        config_process_docs: None,
    },
    TaskSpec {
        name: "wikitext",
        kind: TaskKind::RollingPerplexity,
        file: "wikitext-2-raw-v1.test.jsonl",
        split: "test",
        version: 2.0,
        tag: None,
        metrics: &[
            Metric::WordPerplexity,
            Metric::BytePerplexity,
            Metric::BitsPerByte,
        ],
        format: DocFormat::Perplexity,
        config_doc_to_text: "",
        config_doc_to_target: "def wikitext_detokenizer(doc): ...",
        config_doc_to_choice: "",
        config_process_docs: None,
    },
    TaskSpec {
        name: "wikitext2-128",
        kind: TaskKind::WindowPerplexity,
        file: "wikitext-2-raw-v1.test.jsonl",
        split: "test",
        version: 1.0,
        tag: None,
        metrics: &[Metric::Perplexity],
        format: DocFormat::Perplexity,
        config_doc_to_text: "\"\\n\\n\".join(rows)",
        config_doc_to_target: "",
        config_doc_to_choice: "",
        config_process_docs: None,
    },
];

/// The seven zero-shot tasks of the paper's average, with the metric each contributes.
pub const AVG7: &[(&str, Metric)] = &[
    ("boolq", Metric::Acc),
    ("piqa", Metric::Acc),
    ("hellaswag", Metric::AccNorm),
    ("winogrande", Metric::Acc),
    ("arc_easy", Metric::Acc),
    ("arc_challenge", Metric::AccNorm),
    ("openbookqa", Metric::AccNorm),
];

/// One (context, continuation) log-likelihood request as lm-eval builds it, before tokenisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// One evaluation document of a multiple-choice task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Position in the data file (0-based, counting records).
    pub doc_id: usize,
    /// One request per choice, in choice order (WinoGrande: one per option context).
    pub requests: Vec<Request>,
    /// lm-eval's `doc_to_choice` strings, without the target delimiter. `acc_norm` divides by
    /// their length in characters (Unicode code points).
    pub choices: Vec<String>,
    /// Gold choice index, always one of the choices: the interpreter refuses a label outside them (lm-eval would
    /// silently count the document as wrong), and so does [`crate::score_doc`].
    pub gold: usize,
}

/// A task by name. Cheap to copy; all data lives in [`TASKS`].
#[derive(Debug, Clone, Copy)]
pub struct Task {
    spec: &'static TaskSpec,
}

impl PartialEq for Task {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.spec, other.spec)
    }
}

impl Task {
    /// Names of all tasks, in listing order.
    pub const NAMES: &'static [&'static str] = &[
        "boolq",
        "piqa",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
        "wikitext",
        "wikitext2-128",
    ];

    /// Looks a task up by its lm-eval name.
    pub fn from_name(name: &str) -> Result<Task, EvalError> {
        TASKS
            .iter()
            .find(|s| s.name == name)
            .map(|spec| Task { spec })
            .ok_or_else(|| EvalError::UnknownTask { name: name.to_string(), known: Task::NAMES.join(", ") })
    }

    /// All tasks.
    pub fn all() -> impl Iterator<Item = Task> {
        TASKS.iter().map(|spec| Task { spec })
    }

    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    pub fn kind(&self) -> TaskKind {
        self.spec.kind
    }

    /// The task's definition.
    pub fn spec(&self) -> &'static TaskSpec {
        self.spec
    }

    /// Metrics reported, in lm-eval's `metric_list` order.
    pub fn metrics(&self) -> &'static [Metric] {
        self.spec.metrics
    }

    /// The data file this task reads inside `data_dir`.
    pub fn data_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(self.spec.file)
    }

    /// Builds the first `limit` documents (all when `None`) of a multiple-choice task, in file order.
    pub fn load_docs(&self, data_dir: &Path, limit: Option<usize>) -> Result<Vec<Doc>, EvalError> {
        if self.spec.kind != TaskKind::MultipleChoice {
            return Err(self.wrong_kind("load_docs"));
        }
        let path = self.data_path(data_dir);
        let mut docs = Vec::new();
        for_each_record(&path, self.spec.name, |line, record| {
            if limit.is_some_and(|n| docs.len() >= n) {
                return Ok(false);
            }
            let doc = interpret(&self.spec.format, docs.len(), record).map_err(|e| e.at(&path, line))?;
            docs.push(doc);
            Ok(true)
        })?;
        if docs.is_empty() {
            return Err(EvalError::nothing(self.spec.name, &path, no_records_problem(limit, "documents")));
        }
        Ok(docs)
    }

    /// Number of documents in the full evaluation split (lm-eval's `n-samples.original`).
    /// For `wikitext` these are the pages; for `wikitext2-128` the rows.
    pub fn count_docs(&self, data_dir: &Path) -> Result<usize, EvalError> {
        if self.spec.kind == TaskKind::RollingPerplexity {
            return Ok(crate::perplexity::load_wikitext_docs(data_dir, None)?.len());
        }
        let mut n = 0;
        for_each_record(&self.data_path(data_dir), self.spec.name, |_, _| {
            n += 1;
            Ok(true)
        })?;
        Ok(n)
    }

    pub(crate) fn wrong_kind(&self, what: &'static str) -> EvalError {
        EvalError::WrongTaskKind {
            task: self.spec.name.to_string(),
            kind: match self.spec.kind {
                TaskKind::MultipleChoice => "multiple-choice",
                TaskKind::RollingPerplexity => "rolling-perplexity",
                TaskKind::WindowPerplexity => "window-perplexity",
            },
            what,
        }
    }
}

/// Why a load gave nothing: a limit of 0, or a file without records.
pub(crate) fn no_records_problem(limit: Option<usize>, what: &str) -> String {
    if limit == Some(0) {
        format!("a limit of 0 leaves no {what} to evaluate (the limit must be at least 1)")
    } else {
        "the file holds no records (it is empty or has only blank lines)".to_string()
    }
}

/// Calls `f(line_number, record)` for each non-blank line of a JSONL file until `f` returns
/// `Ok(false)`. Line numbers are 1-based physical lines; a line that is not a JSON object is refused.
pub(crate) fn for_each_record(
    path: &Path,
    task: &str,
    mut f: impl FnMut(usize, &Value) -> Result<bool, EvalError>,
) -> Result<(), EvalError> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EvalError::MissingDataFile { task: task.to_string(), path: path.to_path_buf() }
        } else {
            EvalError::Io { path: path.to_path_buf(), error: e }
        }
    })?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => EvalError::malformed(path, line_no, "line is not valid UTF-8"),
            _ => EvalError::Io { path: path.to_path_buf(), error: e },
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(&line)
            .map_err(|e| EvalError::malformed(path, line_no, format!("invalid JSON: {e}")))?;
        if !record.is_object() {
            let problem = format!("expected a JSON object, got {}", describe(&record));
            return Err(EvalError::malformed(path, line_no, problem));
        }
        if !f(line_no, &record)? {
            break;
        }
    }
    Ok(())
}

/// What is wrong with one field of a record, before the file and line are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// Dotted path, with an index for a list item (`choices.text[2]`).
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError { field: field.into(), problem: problem.into() }
    }

    /// The error for this field of the record on `line` (1-based) of `path`.
    pub(crate) fn at(self, path: &Path, line: usize) -> EvalError {
        EvalError::BadField { path: path.to_path_buf(), line, field: self.field, problem: self.problem }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.problem)
    }
}

/// A JSON value as written, cut to a readable length (a label, a key).
fn show(v: &Value) -> String {
    const MAX: usize = 40;
    let s = v.to_string();
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

/// The kind and (short) value of a JSON value, for "expected X, got Y" messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(_) => format!("the boolean {v}"),
        Value::Number(_) => format!("the number {v}"),
        Value::String(_) => format!("the string {}", show(v)),
        Value::Array(a) if a.len() == 1 => "a list of 1 item".to_string(),
        Value::Array(a) => format!("a list of {} items", a.len()),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Looks up a dotted path (`choices.text`) in a record.
fn field<'a>(record: &'a Value, path: &str) -> Result<&'a Value, FieldError> {
    let mut v = record;
    let mut walked = 0usize;
    for part in path.split('.') {
        if !v.is_object() {
            let parent = match walked {
                0 => "the record".to_string(),
                n => format!("`{}`", &path[..n - 1]),
            };
            let problem = format!("missing: {parent} is {}, not an object", describe(v));
            return Err(FieldError::new(path, problem));
        }
        v = v.get(part).ok_or_else(|| FieldError::new(path, "missing from the record"))?;
        walked += part.len() + 1;
    }
    Ok(v)
}

fn str_field<'a>(record: &'a Value, path: &str) -> Result<&'a str, FieldError> {
    let v = field(record, path)?;
    v.as_str().ok_or_else(|| FieldError::new(path, format!("expected a string, got {}", describe(v))))
}

fn str_list_field(record: &Value, path: &str) -> Result<Vec<String>, FieldError> {
    let v = field(record, path)?;
    let items = v
        .as_array()
        .ok_or_else(|| FieldError::new(path, format!("expected a list of strings, got {}", describe(v))))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                FieldError::new(format!("{path}[{i}]"), format!("expected a string, got {}", describe(v)))
            })
        })
        .collect()
}

/// A list-of-strings field that holds the choices: at least one.
fn choice_list(record: &Value, path: &str) -> Result<Vec<String>, FieldError> {
    let choices = str_list_field(record, path)?;
    if choices.is_empty() {
        return Err(FieldError::new(path, "the choice list is empty (a document needs at least one choice)"));
    }
    Ok(choices)
}

/// "expected 0 or 1": the valid gold indices for `n` (≥ 1) choices.
fn expected_indices(n: usize) -> String {
    match n {
        0 | 1 => "expected 0".to_string(),
        2 => "expected 0 or 1".to_string(),
        _ => format!("expected 0 to {}", n - 1),
    }
}

/// A gold index among `n` choices: an integer field, or a string holding one (Python `int()`: surrounding
/// whitespace allowed).
fn index_field(record: &Value, path: &str, n: usize) -> Result<usize, FieldError> {
    let v = field(record, path)?;
    let i = match v {
        Value::Number(x) => x.as_i64(),
        Value::String(s) => py_strip(s).parse::<i64>().ok(),
        _ => None,
    };
    let expected = expected_indices(n);
    let i =
        i.ok_or_else(|| FieldError::new(path, format!("expected an integer label ({expected}), got {}", describe(v))))?;
    usize::try_from(i)
        .ok()
        .filter(|&i| i < n)
        .ok_or_else(|| FieldError::new(path, format!("{} is not a valid label ({expected})", show(v))))
}

/// Fills `{{field}}` placeholders; a template without placeholders is a bare field name
/// (lm-eval's convention for `doc_to_text: question_stem`).
fn fill_template(template: &str, record: &Value) -> Result<String, FieldError> {
    if !template.contains("{{") {
        return str_field(record, template).map(str::to_string);
    }
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| FieldError::new(template, "the task's template has an unclosed `{{` placeholder"))?;
        out.push_str(str_field(record, after[..close].trim())?);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The interpreter: one record → one [`Doc`]. Errors name the bad or missing field; a gold label that is not
/// one of the choices is an error, as are an empty or non-string choice list.
pub(crate) fn interpret(format: &DocFormat, doc_id: usize, record: &Value) -> Result<Doc, FieldError> {
    const DELIM: &str = " ";
    let choice_requests = |context: String, choices: Vec<String>, gold: usize| Doc {
        doc_id,
        requests: choices
            .iter()
            .map(|c| Request { context: context.clone(), continuation: format!("{DELIM}{c}") })
            .collect(),
        choices,
        gold,
    };
    match format {
        DocFormat::Template { text, choices, gold } => {
            let context = fill_template(text, record)?;
            let choices: Vec<String> = match choices {
                Choices::Fixed(list) => list.iter().map(|s| s.to_string()).collect(),
                Choices::Fields(names) => {
                    names.iter().map(|n| str_field(record, n).map(str::to_string)).collect::<Result<_, _>>()?
                }
                Choices::List(path) => choice_list(record, path)?,
            };
            let gold = match gold {
                Gold::Int(path) => index_field(record, path, choices.len())?,
                Gold::IndexOf { key, labels, lstrip_key } => {
                    let raw_key = str_field(record, key)?;
                    let k = if *lstrip_key { raw_key.trim_start_matches(crate::text::py_isspace) } else { raw_key };
                    let label_list = str_list_field(record, labels)?;
                    if label_list.len() != choices.len() {
                        let problem = format!(
                            "{} labels for {} choices (expected one label per choice)",
                            label_list.len(),
                            choices.len()
                        );
                        return Err(FieldError::new(*labels, problem));
                    }
                    label_list.iter().position(|l| l == k).ok_or_else(|| {
                        let valid: Vec<String> = label_list.iter().map(|l| show(&Value::from(l.as_str()))).collect();
                        let raw = show(&Value::from(raw_key));
                        let problem =
                            format!("{raw} is not a valid label (expected one of `{labels}`: {})", valid.join(", "));
                        FieldError::new(*key, problem)
                    })?
                }
            };
            Ok(choice_requests(context, choices, gold))
        }
        DocFormat::HellaSwag => {
            let ctx = format!("{} {}", str_field(record, "ctx_a")?, py_capitalize(str_field(record, "ctx_b")?));
            let query = hellaswag_preprocess(&format!("{}: {ctx}", str_field(record, "activity_label")?));
            let choices: Vec<String> =
                choice_list(record, "endings")?.iter().map(|e| hellaswag_preprocess(e)).collect();
            let gold = index_field(record, "label", choices.len())?;
            Ok(choice_requests(query, choices, gold))
        }
        DocFormat::WinoGrande => {
            let sentence = str_field(record, "sentence")?;
            let i = sentence
                .find('_')
                .ok_or_else(|| FieldError::new("sentence", "has no \"_\" blank for the options to fill"))?;
            let continuation = format!("{DELIM}{}", py_strip(&sentence[i + 1..]));
            let choices: Vec<String> = ["option1", "option2"]
                .iter()
                .map(|o| str_field(record, o).map(|opt| format!("{}{opt}", &sentence[..i])))
                .collect::<Result<_, _>>()?;
            let gold = match str_field(record, "answer")? {
                "1" => 0,
                "2" => 1,
                other => {
                    let problem =
                        format!("{} is not a valid label (expected \"1\" or \"2\")", show(&Value::from(other)));
                    return Err(FieldError::new("answer", problem));
                }
            };
            Ok(Doc {
                doc_id,
                requests: choices
                    .iter()
                    .map(|c| Request { context: c.clone(), continuation: continuation.clone() })
                    .collect(),
                choices,
                gold,
            })
        }
        DocFormat::Perplexity => Err(FieldError::new("text", "a perplexity record is not a multiple-choice document")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn repo_data_dir() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"))
    }

    /// The numbers after the first `"key": ` in `text` (a number or a flat list of numbers),
    /// parsed with Rust's correctly rounded `str::parse`: serde_json's default float parser can be
    /// one ULP off, and the golden values are compared bit for bit.
    pub(crate) fn raw_numbers(text: &str, key: &str) -> Vec<f64> {
        let pat = format!("\"{key}\": ");
        let start = text.find(&pat).unwrap_or_else(|| panic!("no {pat} in golden text")) + pat.len();
        let rest = &text[start..];
        let body = match rest.strip_prefix('[') {
            Some(list) => &list[..list.find(']').unwrap()],
            None => &rest[..rest.find([',', '}', '\n']).unwrap_or(rest.len())],
        };
        body.split(',').map(|x| x.trim().parse::<f64>().unwrap()).collect()
    }

    pub(crate) fn golden_dir() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../golden/lm-eval-first25"))
    }

    fn spec(name: &str) -> &'static DocFormat {
        &Task::from_name(name).unwrap().spec.format
    }

    #[test]
    fn winogrande_splits_at_the_blank() {
        let r = json!({"sentence": "Tom gave _ the book .  ", "option1": "Ann", "option2": "Bob", "answer": "2"});
        let d = interpret(spec("winogrande"), 3, &r).unwrap();
        assert_eq!(d.gold, 1);
        assert_eq!(d.choices, ["Tom gave Ann", "Tom gave Bob"]);
        assert_eq!(d.requests[0].context, "Tom gave Ann");
        assert_eq!(d.requests[1].context, "Tom gave Bob");
        // Shared continuation: delimiter + stripped remainder after the first '_'.
        assert_eq!(d.requests[0].continuation, " the book .");
        assert_eq!(d.requests[1].continuation, " the book .");
        // Only the first '_' counts.
        let r = json!({"sentence": "_ saw _.", "option1": "A", "option2": "B", "answer": "1"});
        let d = interpret(spec("winogrande"), 0, &r).unwrap();
        assert_eq!((d.requests[0].context.as_str(), d.requests[0].continuation.as_str()), ("A", " saw _."));
        assert_eq!(d.gold, 0);
    }

    #[test]
    fn hellaswag_doc() {
        let r = json!({"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.",
            "ctx_b": "he IS", "endings": [" starts [step] pulling. ", "b", "c", "d"], "label": "3"});
        let d = interpret(spec("hellaswag"), 0, &r).unwrap();
        assert_eq!(d.requests[0].context, "Roof shingle removal: A man is on a roof. He is");
        assert_eq!(d.choices[0], "starts pulling.");
        assert_eq!(d.requests[0].continuation, " starts pulling.");
        assert_eq!(d.gold, 3);
    }

    #[test]
    fn templates_and_gold() {
        let r = json!({"question": "is it", "passage": "T -- p", "idx": 0, "label": 1});
        let d = interpret(spec("boolq"), 0, &r).unwrap();
        assert_eq!(d.requests[1].context, "T -- p\nQuestion: is it?\nAnswer:");
        assert_eq!(d.requests[1].continuation, " yes");
        assert_eq!(d.gold, 1);
        let r = json!({"question_stem": "Fog is ", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": " B"});
        let d = interpret(spec("openbookqa"), 0, &r).unwrap();
        assert_eq!(d.requests[0].context, "Fog is ");
        assert_eq!(d.gold, 1);
        let r =
            json!({"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"});
        assert_eq!(interpret(spec("arc_easy"), 0, &r).unwrap().gold, 2);
        let r = json!({"goal": "g", "sol1": " a ", "sol2": "b", "label": 0});
        let d = interpret(spec("piqa"), 0, &r).unwrap();
        assert_eq!(d.requests[0].continuation, "  a ");
        assert_eq!(d.choices[0], " a ");
    }

    #[test]
    fn bad_records_name_the_field() {
        let r = json!({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"});
        let e = interpret(spec("arc_easy"), 0, &r).unwrap_err().to_string();
        assert_eq!(e, "field `answerKey`: \"B\" is not a valid label (expected one of `choices.label`: \"A\")");
        let r = json!({"goal": "g", "sol1": "a", "label": 0});
        let e = interpret(spec("piqa"), 0, &r).unwrap_err();
        assert_eq!(e, FieldError::new("sol2", "missing from the record"));
        let r = json!({"goal": "g", "sol1": "a", "sol2": 3, "label": 0});
        assert_eq!(
            interpret(spec("piqa"), 0, &r).unwrap_err().to_string(),
            "field `sol2`: expected a string, got the number 3"
        );
        let r = json!({"goal": "g", "sol1": "a", "sol2": "b", "label": -1});
        assert_eq!(
            interpret(spec("piqa"), 0, &r).unwrap_err().to_string(),
            "field `label`: -1 is not a valid label (expected 0 or 1)"
        );
        let r = json!({"goal": "g", "sol1": "a", "sol2": "b", "label": " 1 "});
        assert_eq!(interpret(spec("piqa"), 0, &r).unwrap().gold, 1);
        let r = json!({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"});
        assert_eq!(interpret(spec("winogrande"), 0, &r).unwrap_err().field, "sentence");
        // A dotted path through something that is not an object.
        let r = json!({"question": "q", "choices": ["a", "b"], "answerKey": "A"});
        assert_eq!(
            interpret(spec("arc_easy"), 0, &r).unwrap_err().to_string(),
            "field `choices.text`: missing: `choices` is a list of 2 items, not an object"
        );
        assert_eq!(
            interpret(spec("boolq"), 0, &json!(3)).unwrap_err().to_string(),
            "field `passage`: missing: the record is the number 3, not an object"
        );
    }

    #[test]
    fn file_errors_name_path_and_line() {
        let dir = std::env::temp_dir().join(format!("slm-eval-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let task = Task::from_name("piqa").unwrap();
        match task.load_docs(&dir, None) {
            Err(EvalError::MissingDataFile { path, .. }) => {
                assert_eq!(path, dir.join("piqa.validation.jsonl"))
            }
            other => panic!("expected MissingDataFile, got {other:?}"),
        }
        let good = r#"{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}"#;
        std::fs::write(
            dir.join("piqa.validation.jsonl"),
            format!("{good}\n\n{good}\n{{\"goal\": \"g\", \"sol1\": \"a\", \"label\": 0}}\n"),
        )
        .unwrap();
        let e = task.load_docs(&dir, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, EvalError::BadField { line: 4, .. }), "{msg}");
        assert!(msg.contains("piqa.validation.jsonl: line 4: field `sol2`"), "{msg}");
        // The limit stops before the bad record.
        assert_eq!(task.load_docs(&dir, Some(2)).unwrap().len(), 2);
        std::fs::write(dir.join("piqa.validation.jsonl"), format!("{good}\n{{not json\n")).unwrap();
        let msg = task.load_docs(&dir, None).unwrap_err().to_string();
        assert!(msg.contains(": line 2: malformed record: invalid JSON"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();

        let e = Task::from_name("mmlu").unwrap_err().to_string();
        assert!(e.contains("unknown task `mmlu`") && e.contains("hellaswag"), "{e}");
        assert!(Task::from_name("wikitext").unwrap().load_docs(&dir, None).is_err());
    }

    /// Golden per-doc requests from lm-eval 0.4.13 on the first 25 documents of each task.
    #[test]
    fn requests_match_lm_eval_golden() {
        let data = repo_data_dir();
        for (task_name, metrics) in [
            ("boolq", ACC),
            ("piqa", ACC_BOTH),
            ("hellaswag", ACC_BOTH),
            ("winogrande", ACC),
            ("arc_easy", ACC_BOTH),
            ("arc_challenge", ACC_BOTH),
            ("openbookqa", ACC_BOTH),
        ] {
            let task = Task::from_name(task_name).unwrap();
            assert_eq!(task.metrics(), metrics);
            let docs = task.load_docs(&data, Some(25)).unwrap();
            assert_eq!(docs.len(), 25);
            let golden = std::fs::read_to_string(golden_dir().join(format!("{task_name}.jsonl"))).unwrap();
            let golden: Vec<Value> = golden.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(golden.len(), 25);
            for (doc, g) in docs.iter().zip(&golden) {
                assert_eq!(doc.doc_id as u64, g["doc_id"].as_u64().unwrap());
                assert_eq!(doc.gold as u64, g["gold"].as_u64().unwrap(), "{task_name} doc {}", doc.doc_id);
                let reqs = g["requests"].as_array().unwrap();
                assert_eq!(doc.requests.len(), reqs.len());
                for (r, gr) in doc.requests.iter().zip(reqs) {
                    assert_eq!(r.context, gr["context"].as_str().unwrap(), "{task_name} doc {}", doc.doc_id);
                    assert_eq!(r.continuation, gr["continuation"].as_str().unwrap(), "{task_name} doc {}", doc.doc_id);
                }
            }
        }
    }

    #[test]
    fn full_splits_load_with_lm_eval_sizes() {
        let data = repo_data_dir();
        for (name, n) in [
            ("boolq", 3270),
            ("piqa", 1838),
            ("hellaswag", 10042),
            ("winogrande", 1267),
            ("arc_easy", 2376),
            ("arc_challenge", 1172),
            ("openbookqa", 500),
        ] {
            let task = Task::from_name(name).unwrap();
            assert_eq!(task.load_docs(&data, None).unwrap().len(), n, "{name}");
            assert_eq!(task.count_docs(&data).unwrap(), n, "{name}");
        }
        assert_eq!(Task::from_name("wikitext").unwrap().count_docs(&data).unwrap(), 62);
    }
}
