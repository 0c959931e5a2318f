//! lm-eval-format output: the results JSON (`--output-path`) and per-sample JSONL records
//! (`--log-samples`).
//!
//! Key order matters to people diffing against lm-eval, and `serde_json::Map` sorts keys unless
//! its `preserve_order` feature is on (which would rebuild half the dependency tree), so output is
//! built as an ordered [`Json`] tree and serialised through serde.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::metrics::{avg7, DocResult, MetricValue};
use crate::task::{Doc, Metric, Task, TaskKind, AVG7};

/// A JSON value whose objects keep insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    /// Non-finite numbers serialise as `null` (JSON has no NaN; Python would write `NaN`).
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    pub fn obj<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// The value at `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// `json.dumps(value, indent=2, ensure_ascii=False)`.
    pub fn to_pretty_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("serialising an in-memory JSON tree cannot fail")
    }

    /// `json.dumps(value, ensure_ascii=False)`: one line, with Python's `", "` and `": "`
    /// separators.
    pub fn to_python_line(&self) -> String {
        let mut out = Vec::new();
        let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
        self.serialize(&mut ser).expect("serialising an in-memory JSON tree cannot fail");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Int(i) => s.serialize_i64(*i),
            Json::Num(x) if x.is_finite() => s.serialize_f64(*x),
            Json::Num(_) => s.serialize_unit(),
            Json::Str(v) => s.serialize_str(v),
            Json::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Obj(pairs) => {
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Compact output with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// The aggregated outcome of one task, as the results JSON reports it.
#[derive(Debug, Clone)]
pub struct TaskReport {
    pub task: Task,
    /// Documents in the full split (`n-samples.original`).
    pub n_original: usize,
    /// Documents evaluated (after `--limit`; for `wikitext2-128`, windows).
    pub n_effective: usize,
    /// In the task's metric order.
    pub metrics: Vec<MetricValue>,
}

impl TaskReport {
    /// The value of one metric.
    pub fn metric(&self, m: Metric) -> Option<f64> {
        self.metrics.iter().find(|v| v.metric == m).map(|v| v.value)
    }
}

/// The "avg-7" of a set of reports (see [`crate::avg7`]).
pub fn reports_avg7(reports: &[TaskReport]) -> Option<f64> {
    avg7(|name, m| reports.iter().find(|r| r.task.name() == name).and_then(|r| r.metric(m)))
}

/// Run-level facts for the `config` block and the trailing keys of the results JSON.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    /// lm-eval's `--model` (we write "slm").
    pub model: String,
    /// `--model_args` as key/value pairs (e.g. `pretrained` = model path, `dtype`).
    pub model_args: Vec<(String, String)>,
    /// Name reported as `model_name` (the model path as given).
    pub model_name: String,
    pub model_num_parameters: u64,
    pub model_dtype: String,
    pub batch_size: usize,
    pub device: String,
    pub limit: Option<usize>,
    /// The context length requests were truncated to.
    pub max_length: usize,
    /// `(token, id)` of the tokenizer's special tokens, where it has them.
    pub pad_token: Option<(String, u32)>,
    pub eos_token: Option<(String, u32)>,
    pub bos_token: Option<(String, u32)>,
    pub eot_token_id: Option<u32>,
    /// Unix times (seconds).
    pub start_time: f64,
    pub end_time: f64,
}

/// lm-eval's `sanitize_model_name`: runs of `"<>:/|\?*[]` become `__`.
pub fn sanitize_model_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_run = false;
    for c in name.chars() {
        if "\"<>:/|\\?*[]".contains(c) {
            if !in_run {
                out.push_str("__");
            }
            in_run = true;
        } else {
            out.push(c);
            in_run = false;
        }
    }
    out
}

/// `results_<ISO-8601 timestamp with ':' → '-'>.json` for a Unix time (UTC; lm-eval uses local
/// time), e.g. `results_2026-11-29T01-53-00.123456.json`.
pub fn results_file_name(unix_seconds: f64) -> String {
    let micros = (unix_seconds * 1e6).round() as i64;
    let (secs, micro) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "results_{year:04}-{month:02}-{day:02}T{:02}-{:02}-{:02}.{micro:06}.json",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

fn task_config(task: &Task, data_dir: &str) -> Json {
    let spec = task.spec();
    let mut c: Vec<(String, Json)> = vec![("task".into(), Json::str(spec.name))];
    if let Some(tag) = spec.tag {
        c.push(("tag".into(), Json::str(tag)));
    }
    let data_file = format!("{}/{}", data_dir.trim_end_matches('/'), spec.file);
    c.push(("dataset_path".into(), Json::str("json")));
    c.push(("dataset_kwargs".into(), Json::obj([("data_files", Json::obj([(spec.split, Json::str(data_file))]))])));
    c.push((format!("{}_split", spec.split), Json::str(spec.split)));
    if let Some(p) = spec.config_process_docs {
        c.push(("process_docs".into(), Json::str(p)));
    }
    c.push(("doc_to_text".into(), Json::str(spec.config_doc_to_text)));
    c.push(("doc_to_target".into(), Json::str(spec.config_doc_to_target)));
    c.push(("unsafe_code".into(), Json::Bool(false)));
    if task.kind() == TaskKind::MultipleChoice {
        let choice = match serde_json::from_str::<Vec<String>>(spec.config_doc_to_choice) {
            Ok(list) => Json::Arr(list.into_iter().map(Json::Str).collect()),
            Err(_) => Json::str(spec.config_doc_to_choice),
        };
        c.push(("doc_to_choice".into(), choice));
    }
    c.push(("description".into(), Json::str("")));
    c.push(("target_delimiter".into(), Json::str(" ")));
    c.push(("fewshot_delimiter".into(), Json::str("\n\n")));
    c.push(("num_fewshot".into(), Json::Int(0)));
    c.push((
        "metric_list".into(),
        Json::Arr(spec.metrics.iter().map(|m| Json::obj([("metric", Json::str(m.name()))])).collect()),
    ));
    let output_type = match task.kind() {
        TaskKind::MultipleChoice => "multiple_choice",
        TaskKind::RollingPerplexity => "loglikelihood_rolling",
        TaskKind::WindowPerplexity => "loglikelihood_windows_128",
    };
    c.push(("output_type".into(), Json::str(output_type)));
    c.push(("repeats".into(), Json::Int(1)));
    c.push(("should_decontaminate".into(), Json::Bool(false)));
    c.push(("metadata".into(), Json::obj([("version", Json::Num(spec.version))])));
    Json::Obj(c)
}

fn token_pair(t: &Option<(String, u32)>) -> Json {
    match t {
        Some((tok, id)) => Json::Arr(vec![Json::str(tok.clone()), Json::str(id.to_string())]),
        None => Json::Null,
    }
}

/// The results JSON, in lm-eval 0.4.13's layout: `results` and `n-samples` in run order;
/// `configs`, `versions`, `n-shot`, `higher_is_better` sorted by task name; then `avg-7` (when all
/// seven tasks are present: `{"value", "components": {task: {"metric", "value"}}}`), `config`
/// and the trailing run facts. `data_dir` is reported in each task's `dataset_kwargs`.
pub fn results_json(reports: &[TaskReport], info: &RunInfo, data_dir: &str) -> Json {
    let mut sorted: Vec<&TaskReport> = reports.iter().collect();
    sorted.sort_by_key(|r| r.task.name());
    let per_sorted =
        |f: &dyn Fn(&TaskReport) -> Json| Json::Obj(sorted.iter().map(|r| (r.task.name().to_string(), f(r))).collect());

    let results = Json::Obj(
        reports
            .iter()
            .map(|r| {
                let mut e = vec![
                    ("name".to_string(), Json::str(r.task.name())),
                    ("alias".to_string(), Json::str(r.task.name())),
                    ("sample_len".to_string(), Json::Int(r.n_effective as i64)),
                ];
                for m in &r.metrics {
                    e.push((format!("{},none", m.metric.name()), Json::Num(m.value)));
                    e.push((format!("{}_stderr,none", m.metric.name()), m.stderr.map_or(Json::str("N/A"), Json::Num)));
                }
                (r.task.name().to_string(), Json::Obj(e))
            })
            .collect(),
    );

    let mut top: Vec<(String, Json)> = vec![
        ("results".into(), results),
        ("group_subtasks".into(), Json::Obj(vec![])),
        ("configs".into(), per_sorted(&|r| task_config(&r.task, data_dir))),
        ("versions".into(), per_sorted(&|r| Json::Num(r.task.spec().version))),
        ("n-shot".into(), per_sorted(&|_| Json::Int(0))),
        (
            "higher_is_better".into(),
            per_sorted(&|r| {
                Json::Obj(
                    r.task.metrics().iter().map(|m| (m.name().to_string(), Json::Bool(m.higher_is_better()))).collect(),
                )
            }),
        ),
        (
            "n-samples".into(),
            Json::Obj(
                reports
                    .iter()
                    .map(|r| {
                        (
                            r.task.name().to_string(),
                            Json::obj([
                                ("original", Json::Int(r.n_original as i64)),
                                ("effective", Json::Int(r.n_effective as i64)),
                            ]),
                        )
                    })
                    .collect(),
            ),
        ),
    ];
    if let Some(value) = reports_avg7(reports) {
        let components = AVG7.iter().map(|&(name, m)| {
            let v = reports.iter().find(|r| r.task.name() == name).and_then(|r| r.metric(m)).unwrap_or(f64::NAN);
            (name, Json::obj([("metric", Json::str(m.name())), ("value", Json::Num(v))]))
        });
        top.push(("avg-7".into(), Json::obj([("value", Json::Num(value)), ("components", Json::obj(components))])));
    }
    let config = Json::obj([
        ("model", Json::str(info.model.clone())),
        ("model_args", Json::obj(info.model_args.iter().map(|(k, v)| (k.clone(), Json::str(v.clone()))))),
        ("model_num_parameters", Json::Int(info.model_num_parameters as i64)),
        ("model_dtype", Json::str(info.model_dtype.clone())),
        ("model_revision", Json::str("main")),
        ("model_sha", Json::str("")),
        ("batch_size", Json::str(info.batch_size.to_string())),
        ("batch_sizes", Json::Arr(vec![])),
        ("device", Json::str(info.device.clone())),
        ("use_cache", Json::Null),
        ("limit", info.limit.map_or(Json::Null, |l| Json::Num(l as f64))),
        ("bootstrap_iters", Json::Int(100_000)),
        ("gen_kwargs", Json::Obj(vec![])),
        ("random_seed", Json::Int(0)),
        ("numpy_seed", Json::Int(1234)),
        ("torch_seed", Json::Int(1234)),
        ("fewshot_seed", Json::Int(1234)),
    ]);
    top.push(("config".into(), config));
    let trailing = [
        ("git_hash", Json::Null),
        ("date", Json::Num(info.start_time)),
        ("lm_eval_version", Json::str("0.4.13")),
        ("slm_version", Json::str(env!("CARGO_PKG_VERSION"))),
        (
            slm_model::output::STAMP_KEY,
            Json::obj([
                ("kind", Json::str(slm_model::output::OutputKind::EvalResults.name())),
                ("version", Json::Int(slm_model::output::STAMP_VERSION as i64)),
            ]),
        ),
        ("tokenizer_pad_token", token_pair(&info.pad_token)),
        ("tokenizer_eos_token", token_pair(&info.eos_token)),
        ("tokenizer_bos_token", token_pair(&info.bos_token)),
        ("eot_token_id", info.eot_token_id.map_or(Json::Null, |t| Json::Int(t as i64))),
        ("max_length", Json::Int(info.max_length as i64)),
        ("task_hashes", Json::Obj(vec![])),
        ("model_source", Json::str("slm")),
        ("model_name", Json::str(info.model_name.clone())),
        ("model_name_sanitized", Json::str(sanitize_model_name(&info.model_name))),
        ("system_instruction", Json::Null),
        ("system_instruction_sha", Json::Null),
        ("fewshot_as_multiturn", Json::Null),
        ("chat_template", Json::Null),
        ("chat_template_sha", Json::Null),
        ("start_time", Json::Num(info.start_time)),
        ("end_time", Json::Num(info.end_time)),
        ("total_evaluation_time_seconds", Json::str((info.end_time - info.start_time).to_string())),
    ];
    top.extend(trailing.into_iter().map(|(k, v)| (k.to_string(), v)));
    Json::Obj(top)
}

/// One `--log-samples` record for a multiple-choice document, in the layout of
/// `golden/lm-eval-first25/<task>.jsonl`: `doc_id`, `gold`, `requests` (context,
/// continuation), `loglikelihood`, `is_greedy`, `metrics`. Write it with [`Json::to_python_line`].
pub fn sample_record(doc: &Doc, result: &DocResult) -> Json {
    let mut metrics = vec![("acc".to_string(), Json::Num(result.acc))];
    if let Some(n) = result.acc_norm {
        metrics.push(("acc_norm".to_string(), Json::Num(n)));
    }
    Json::obj([
        ("doc_id", Json::Int(doc.doc_id as i64)),
        ("gold", Json::Int(doc.gold as i64)),
        (
            "requests",
            Json::Arr(
                doc.requests
                    .iter()
                    .map(|r| {
                        Json::obj([
                            ("context", Json::str(r.context.clone())),
                            ("continuation", Json::str(r.continuation.clone())),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("loglikelihood", Json::Arr(result.loglikelihoods.iter().map(|&l| Json::Num(l)).collect())),
        ("is_greedy", Json::Arr(result.is_greedy.iter().map(|&g| Json::Bool(g)).collect())),
        ("metrics", Json::Obj(metrics)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{aggregate, score_doc, RequestResult};
    use crate::task::tests::{raw_numbers, repo_data_dir};

    fn golden(name: &str) -> String {
        std::fs::read_to_string(format!("{}/../../golden/lm-eval-first25/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    /// Scoring the golden log-likelihoods and writing sample records reproduces the golden lines
    /// byte for byte; aggregating them reproduces lm-eval's results entries.
    #[test]
    fn sample_records_and_results_match_golden() {
        let results_golden: serde_json::Value = serde_json::from_str(&golden("results.json")).unwrap();
        let mut reports = Vec::new();
        for name in ["piqa", "boolq", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] {
            let task = Task::from_name(name).unwrap();
            let docs = task.load_docs(&repo_data_dir(), Some(25)).unwrap();
            let lines = golden(&format!("{name}.jsonl"));
            let mut doc_results = Vec::new();
            for (doc, line) in docs.iter().zip(lines.lines()) {
                let g: serde_json::Value = serde_json::from_str(line).unwrap();
                let rr: Vec<RequestResult> = raw_numbers(line, "loglikelihood")
                    .into_iter()
                    .zip(g["is_greedy"].as_array().unwrap())
                    .map(|(l, gr)| RequestResult { loglikelihood: l, is_greedy: gr.as_bool().unwrap() })
                    .collect();
                let r = score_doc(&task, doc, &rr).unwrap();
                assert_eq!(sample_record(doc, &r).to_python_line(), line, "{name} doc {}", doc.doc_id);
                doc_results.push(r);
            }
            let report = TaskReport {
                task,
                n_original: task.count_docs(&repo_data_dir()).unwrap(),
                n_effective: 25,
                metrics: aggregate(&task, &doc_results),
            };
            let ours: serde_json::Value = serde_json::from_str(
                &results_json(std::slice::from_ref(&report), &RunInfo::default(), "d").to_pretty_string(),
            )
            .unwrap();
            let mut theirs = results_golden["results"][format!("{name}_local")].clone();
            for k in ["name", "alias"] {
                theirs[k] = serde_json::Value::String(name.into());
            }
            assert_eq!(ours["results"][name], theirs, "{name}");
            assert_eq!(ours["n-samples"][name], results_golden["n-samples"][format!("{name}_local")]);
            assert_eq!(ours["higher_is_better"][name], results_golden["higher_is_better"][format!("{name}_local")]);
            reports.push(report);
        }

        let info = RunInfo {
            model: "slm".into(),
            model_args: vec![("pretrained".into(), "models/x".into()), ("dtype".into(), "float32".into())],
            model_name: "models/x".into(),
            batch_size: 16,
            limit: Some(25),
            max_length: 8192,
            start_time: 10.0,
            end_time: 12.5,
            ..RunInfo::default()
        };
        let json = results_json(&reports, &info, "data");
        let text = json.to_pretty_string();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Top-level key order as lm-eval writes it, with avg-7 before config.
        let keys: Vec<&str> = match &json {
            Json::Obj(p) => p.iter().map(|(k, _)| k.as_str()).collect(),
            _ => unreachable!(),
        };
        assert_eq!(
            &keys[..9],
            [
                "results",
                "group_subtasks",
                "configs",
                "versions",
                "n-shot",
                "higher_is_better",
                "n-samples",
                "avg-7",
                "config"
            ]
        );
        // results in run order, versions sorted.
        assert!(text.find("\"piqa\": {\n      \"name\"").unwrap() < text.find("\"boolq\": {\n      \"name\"").unwrap());
        let versions: Vec<&str> = match json.get("versions").unwrap() {
            Json::Obj(p) => p.iter().map(|(k, _)| k.as_str()).collect(),
            _ => unreachable!(),
        };
        assert_eq!(versions, ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]);
        assert_eq!(v["versions"]["boolq"], 2.0);
        assert_eq!(v["config"]["limit"], 25.0);
        assert_eq!(v["config"]["batch_size"], "16");
        assert_eq!(v["model_name_sanitized"], "models__x");
        assert_eq!(v["total_evaluation_time_seconds"], "2.5");
        assert_eq!(v["configs"]["boolq"]["doc_to_choice"], serde_json::json!(["no", "yes"]));
        assert_eq!(v["configs"]["boolq"]["dataset_kwargs"]["data_files"]["validation"], "data/boolq.validation.jsonl");
        assert_eq!(
            v["configs"]["hellaswag"]["process_docs"],
            results_golden["configs"]["hellaswag_local"]["process_docs"]
        );
        // avg-7 = mean of acc (boolq .32, piqa .72, winogrande .48, arc_easy .52) and acc_norm
        // (hellaswag .32, arc_challenge .24, openbookqa .28).
        let expected = (0.32 + 0.72 + 0.32 + 0.48 + 0.52 + 0.24 + 0.28) / 7.0;
        assert!((v["avg-7"]["value"].as_f64().unwrap() - expected).abs() < 1e-12);
        assert_eq!(v["avg-7"]["components"]["hellaswag"]["metric"], "acc_norm");
        // Without all seven tasks there is no avg-7.
        let partial = results_json(&reports[..3], &info, "d");
        assert!(partial.get("avg-7").is_none());
    }

    #[test]
    fn perplexity_entries_and_formatting() {
        let task = Task::from_name("wikitext").unwrap();
        let report = TaskReport {
            task,
            n_original: 62,
            n_effective: 62,
            metrics: vec![
                MetricValue { metric: Metric::WordPerplexity, value: 20.5, stderr: None },
                MetricValue { metric: Metric::BytePerplexity, value: 1.75, stderr: None },
                MetricValue { metric: Metric::BitsPerByte, value: f64::NAN, stderr: None },
            ],
        };
        let json = results_json(&[report], &RunInfo::default(), "d");
        let text = json.to_pretty_string();
        assert!(text.contains(
            "\"word_perplexity,none\": 20.5,\n      \"word_perplexity_stderr,none\": \"N/A\",\n      \"byte_perplexity,none\": 1.75"
        ), "{text}");
        assert!(text.contains("\"bits_per_byte,none\": null"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["higher_is_better"]["wikitext"]["word_perplexity"], false);
        assert_eq!(v["configs"]["wikitext"]["output_type"], "loglikelihood_rolling");
        assert_eq!(
            Json::obj([("a", Json::Arr(vec![Json::Int(1), Json::Num(-0.5)])), ("b", Json::str("é\n"))])
                .to_python_line(),
            "{\"a\": [1, -0.5], \"b\": \"é\\n\"}"
        );
    }

    #[test]
    fn names_and_file_names() {
        assert_eq!(sanitize_model_name("a/b:c<<d"), "a__b__c__d");
        assert_eq!(sanitize_model_name("plain"), "plain");
        // 2026-11-29T01:53:00.25 UTC
        assert_eq!(results_file_name(1_795_917_180.25), "results_2026-11-29T01-53-00.250000.json");
        assert_eq!(results_file_name(0.0), "results_1970-01-01T00-00-00.000000.json");
        assert_eq!(results_file_name(951_782_400.0), "results_2000-02-29T00-00-00.000000.json");
    }
}
