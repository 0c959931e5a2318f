//! lm-eval-format output: the results JSON (`--output-path`) and per-sample JSONL records
//! (`--log-samples`).
//!
//! Key order matters to people diffing against lm-eval: output is built as a
//! [`serde_json::Value`] whose objects keep insertion order (the workspace enables serde_json's
//! `preserve_order` feature). Non-finite numbers become `null` (`Value::from(f64::NAN)` is
//! `Null`; JSON has no NaN, Python would write `NaN`).

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::metrics::{avg7, DocResult, MetricValue};
use crate::task::{Doc, Metric, Task, TaskKind, AVG7};

/// `json.dumps(value, indent=2, ensure_ascii=False)`.
pub fn to_pretty_string(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("serialising an in-memory JSON value cannot fail")
}

/// `json.dumps(value, ensure_ascii=False)`: one line, with Python's `", "` and `": "` separators.
pub fn to_python_line(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    v.serialize(&mut ser).expect("serialising an in-memory JSON value cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
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

/// An object from pairs, in their order.
fn obj<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
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
/// time), rounded to the microsecond, e.g. `results_2026-11-29T01-53-00.123456.json`. Times
/// outside the years -9999..=9999 are clamped to those ends (NaN reads as 0).
pub fn results_file_name(unix_seconds: f64) -> String {
    let micros = (unix_seconds * 1e6).round() as i64;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).unwrap_or(if micros < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    });
    format!(
        "results_{:04}-{:02}-{:02}T{:02}-{:02}-{:02}.{:06}.json",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

fn task_config(task: &Task, data_dir: &str) -> Value {
    let spec = task.spec();
    let mut c = Map::new();
    c.insert("task".into(), json!(spec.name));
    if let Some(tag) = spec.tag {
        c.insert("tag".into(), json!(tag));
    }
    let data_file = format!("{}/{}", data_dir.trim_end_matches('/'), spec.file);
    c.insert("dataset_path".into(), json!("json"));
    c.insert("dataset_kwargs".into(), json!({ "data_files": { spec.split: data_file } }));
    c.insert(format!("{}_split", spec.split), json!(spec.split));
    if let Some(p) = spec.config_process_docs {
        c.insert("process_docs".into(), json!(p));
    }
    c.insert("doc_to_text".into(), json!(spec.config_doc_to_text));
    c.insert("doc_to_target".into(), json!(spec.config_doc_to_target));
    c.insert("unsafe_code".into(), json!(false));
    if task.kind() == TaskKind::MultipleChoice {
        let choice = match serde_json::from_str::<Vec<String>>(spec.config_doc_to_choice) {
            Ok(list) => json!(list),
            Err(_) => json!(spec.config_doc_to_choice),
        };
        c.insert("doc_to_choice".into(), choice);
    }
    c.insert("description".into(), json!(""));
    c.insert("target_delimiter".into(), json!(" "));
    c.insert("fewshot_delimiter".into(), json!("\n\n"));
    c.insert("num_fewshot".into(), json!(0));
    c.insert("metric_list".into(), spec.metrics.iter().map(|m| json!({ "metric": m.name() })).collect());
    let output_type = match task.kind() {
        TaskKind::MultipleChoice => "multiple_choice",
        TaskKind::RollingPerplexity => "loglikelihood_rolling",
        TaskKind::WindowPerplexity => "loglikelihood_windows_128",
    };
    c.insert("output_type".into(), json!(output_type));
    c.insert("repeats".into(), json!(1));
    c.insert("should_decontaminate".into(), json!(false));
    c.insert("metadata".into(), json!({ "version": spec.version }));
    Value::Object(c)
}

fn token_pair(t: &Option<(String, u32)>) -> Value {
    match t {
        Some((tok, id)) => json!([tok, id.to_string()]),
        None => Value::Null,
    }
}

/// The results JSON, in lm-eval 0.4.13's layout: `results` and `n-samples` in run order;
/// `configs`, `versions`, `n-shot`, `higher_is_better` sorted by task name; then `avg-7` (when all
/// seven tasks are present: `{"value", "components": {task: {"metric", "value"}}}`), `config`
/// and the trailing run facts. `data_dir` is reported in each task's `dataset_kwargs`.
/// Write it with [`to_pretty_string`].
pub fn results_json(reports: &[TaskReport], info: &RunInfo, data_dir: &str) -> Value {
    let mut sorted: Vec<&TaskReport> = reports.iter().collect();
    sorted.sort_by_key(|r| r.task.name());
    let per_sorted = |f: &dyn Fn(&TaskReport) -> Value| obj(sorted.iter().map(|r| (r.task.name(), f(r))));

    let results = obj(reports.iter().map(|r| {
        let mut e = Map::new();
        e.insert("name".into(), json!(r.task.name()));
        e.insert("alias".into(), json!(r.task.name()));
        e.insert("sample_len".into(), json!(r.n_effective));
        for m in &r.metrics {
            e.insert(format!("{},none", m.metric.name()), json!(m.value));
            e.insert(format!("{}_stderr,none", m.metric.name()), m.stderr.map_or(json!("N/A"), |s| json!(s)));
        }
        (r.task.name(), Value::Object(e))
    }));

    let mut top = Map::new();
    top.insert("results".into(), results);
    top.insert("group_subtasks".into(), json!({}));
    top.insert("configs".into(), per_sorted(&|r| task_config(&r.task, data_dir)));
    top.insert("versions".into(), per_sorted(&|r| json!(r.task.spec().version)));
    top.insert("n-shot".into(), per_sorted(&|_| json!(0)));
    top.insert(
        "higher_is_better".into(),
        per_sorted(&|r| obj(r.task.metrics().iter().map(|m| (m.name(), json!(m.higher_is_better()))))),
    );
    top.insert(
        "n-samples".into(),
        obj(reports.iter().map(|r| (r.task.name(), json!({ "original": r.n_original, "effective": r.n_effective })))),
    );
    if let Some(value) = reports_avg7(reports) {
        let components = AVG7.iter().map(|&(name, m)| {
            let v = reports.iter().find(|r| r.task.name() == name).and_then(|r| r.metric(m)).unwrap_or(f64::NAN);
            (name, json!({ "metric": m.name(), "value": v }))
        });
        top.insert("avg-7".into(), json!({ "value": value, "components": obj(components) }));
    }
    let model_args = obj(info.model_args.iter().map(|(k, v)| (k.clone(), json!(v))));
    top.insert(
        "config".into(),
        json!({
            "model": info.model,
            "model_args": model_args,
            "model_num_parameters": info.model_num_parameters,
            "model_dtype": info.model_dtype,
            "model_revision": "main",
            "model_sha": "",
            "batch_size": info.batch_size.to_string(),
            "batch_sizes": [],
            "device": info.device,
            "use_cache": null,
            // lm-eval writes the limit as a float (25.0).
            "limit": info.limit.map(|l| l as f64),
            "bootstrap_iters": 100_000,
            "gen_kwargs": {},
            "random_seed": 0,
            "numpy_seed": 1234,
            "torch_seed": 1234,
            "fewshot_seed": 1234,
        }),
    );
    let trailing = json!({
        "git_hash": null,
        "date": info.start_time,
        "lm_eval_version": "0.4.13",
        "slm_version": env!("CARGO_PKG_VERSION"),
        (slm_model::output::STAMP_KEY): {
            "kind": slm_model::output::OutputKind::EvalResults.name(),
            "version": slm_model::output::STAMP_VERSION,
        },
        "tokenizer_pad_token": token_pair(&info.pad_token),
        "tokenizer_eos_token": token_pair(&info.eos_token),
        "tokenizer_bos_token": token_pair(&info.bos_token),
        "eot_token_id": info.eot_token_id,
        "max_length": info.max_length,
        "task_hashes": {},
        "model_source": "slm",
        "model_name": info.model_name,
        "model_name_sanitized": sanitize_model_name(&info.model_name),
        "system_instruction": null,
        "system_instruction_sha": null,
        "fewshot_as_multiturn": null,
        "chat_template": null,
        "chat_template_sha": null,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "total_evaluation_time_seconds": (info.end_time - info.start_time).to_string(),
    });
    let Value::Object(trailing) = trailing else { unreachable!("json! of an object literal is an object") };
    top.extend(trailing);
    Value::Object(top)
}

/// One `--log-samples` record for a multiple-choice document, in the layout of
/// `golden/lm-eval-first25/<task>.jsonl`: `doc_id`, `gold`, `requests` (context,
/// continuation), `loglikelihood`, `is_greedy`, `metrics`. Write it with [`to_python_line`].
pub fn sample_record(doc: &Doc, result: &DocResult) -> Value {
    let mut metrics = Map::new();
    metrics.insert("acc".into(), json!(result.acc));
    if let Some(n) = result.acc_norm {
        metrics.insert("acc_norm".into(), json!(n));
    }
    json!({
        "doc_id": doc.doc_id,
        "gold": doc.gold,
        "requests": doc
            .requests
            .iter()
            .map(|r| json!({ "context": r.context, "continuation": r.continuation }))
            .collect::<Vec<_>>(),
        "loglikelihood": result.loglikelihoods,
        "is_greedy": result.is_greedy,
        "metrics": metrics,
    })
}

/// The part of a results file that later steps read (`slm run`'s report): every task's metrics and the avg-7.
/// Read through [`ResultsSummary::read`], which checks the file's `slm_output` stamp; lm-eval's other fields
/// are ignored.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ResultsSummary {
    /// Task → metric key (`acc,none`, `perplexity,none`, ...) → value (a number, or lm-eval's "N/A").
    pub results: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>,
    #[serde(rename = "avg-7")]
    pub avg7: Option<Avg7Entry>,
}

/// `avg-7` of a results file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Avg7Entry {
    pub value: f64,
}

impl ResultsSummary {
    /// Reads a results file that `slm eval` wrote (its stamp must name `eval-results`).
    pub fn read(path: &std::path::Path) -> Result<Self, crate::EvalError> {
        let bytes = slm_model::files::read_regular_file(path, 256 << 20).map_err(|e| crate::EvalError::Io {
            path: path.to_path_buf(),
            error: std::io::Error::other(e.to_string()),
        })?;
        let bad = |problem: String| crate::EvalError::MalformedRecord { path: path.to_path_buf(), line: 1, problem };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        slm_model::output::from_stamped_json(v, slm_model::output::OutputKind::EvalResults, path).map_err(bad)
    }

    /// One metric of one task (`metric("openbookqa", "acc_norm")`), when it is a number.
    pub fn metric(&self, task: &str, metric: &str) -> Option<f64> {
        self.results.get(task)?.get(&format!("{metric},none"))?.as_f64()
    }
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
                assert_eq!(to_python_line(&sample_record(doc, &r)), line, "{name} doc {}", doc.doc_id);
                doc_results.push(r);
            }
            let report = TaskReport {
                task,
                n_original: task.count_docs(&repo_data_dir()).unwrap(),
                n_effective: 25,
                metrics: aggregate(&task, &doc_results),
            };
            let ours: serde_json::Value = serde_json::from_str(&to_pretty_string(&results_json(
                std::slice::from_ref(&report),
                &RunInfo::default(),
                "d",
            )))
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
        let text = to_pretty_string(&json);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Top-level key order as lm-eval writes it, with avg-7 before config.
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
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
        let versions: Vec<&str> = json["versions"].as_object().unwrap().keys().map(String::as_str).collect();
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
        let text = to_pretty_string(&json);
        assert!(text.contains(
            "\"word_perplexity,none\": 20.5,\n      \"word_perplexity_stderr,none\": \"N/A\",\n      \"byte_perplexity,none\": 1.75"
        ), "{text}");
        assert!(text.contains("\"bits_per_byte,none\": null"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["higher_is_better"]["wikitext"]["word_perplexity"], false);
        assert_eq!(v["configs"]["wikitext"]["output_type"], "loglikelihood_rolling");
        assert_eq!(to_python_line(&json!({ "a": [1, -0.5], "b": "é\n" })), "{\"a\": [1, -0.5], \"b\": \"é\\n\"}");
    }

    #[test]
    fn names_and_file_names() {
        assert_eq!(sanitize_model_name("a/b:c<<d"), "a__b__c__d");
        assert_eq!(sanitize_model_name("plain"), "plain");
        // 2026-11-29T01:53:00.25 UTC
        assert_eq!(results_file_name(1_795_917_180.25), "results_2026-11-29T01-53-00.250000.json");
        assert_eq!(results_file_name(0.0), "results_1970-01-01T00-00-00.000000.json");
        assert_eq!(results_file_name(951_782_400.0), "results_2000-02-29T00-00-00.000000.json");
        // Hand-checked with `date -u -d @T +%Y-%m-%dT%H-%M-%S`.
        assert_eq!(results_file_name(1_764_460_380.123456), "results_2025-11-29T23-53-00.123456.json");
        assert_eq!(results_file_name(1_709_164_800.0), "results_2024-02-29T00-00-00.000000.json");
        assert_eq!(results_file_name(1_709_251_199.5), "results_2024-02-29T23-59-59.500000.json");
        assert_eq!(results_file_name(4_102_444_799.0), "results_2099-12-31T23-59-59.000000.json");
        // Rounded to the microsecond, carrying into the next second, day and year.
        assert_eq!(results_file_name(4_102_444_799.999_999_7), "results_2100-01-01T00-00-00.000000.json");
        // Before 1970: the second, microsecond and day still count forward.
        assert_eq!(results_file_name(-1.0), "results_1969-12-31T23-59-59.000000.json");
        assert_eq!(results_file_name(-0.25), "results_1969-12-31T23-59-59.750000.json");
        assert_eq!(results_file_name(-86_400.0), "results_1969-12-31T00-00-00.000000.json");
        assert_eq!(results_file_name(-2_208_988_800.0), "results_1900-01-01T00-00-00.000000.json");
        // Out of range: clamped; NaN is 0.
        assert_eq!(results_file_name(1e300), "results_9999-12-31T23-59-59.999999.json");
        assert_eq!(results_file_name(-1e300), "results_-9999-01-01T00-00-00.000000.json");
        assert_eq!(results_file_name(f64::NAN), "results_1970-01-01T00-00-00.000000.json");
    }
}
