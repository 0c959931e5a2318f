//! Per-document metrics and their aggregation, as lm-eval computes them
//! (`ConfigurableTask.process_results` for `multiple_choice`, `mean`, `mean_stderr`).

use crate::error::EvalError;
use crate::task::{Doc, Metric, Task, AVG7};

/// What the scoring engine returns for one [`crate::TokenRequest`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestResult {
    /// Sum of the log-probabilities of the continuation tokens.
    pub loglikelihood: f64,
    /// Whether every continuation token is the argmax of its position's logits.
    pub is_greedy: bool,
}

/// The outcome of one multiple-choice document.
#[derive(Debug, Clone, PartialEq)]
pub struct DocResult {
    pub doc_id: usize,
    pub gold: usize,
    pub loglikelihoods: Vec<f64>,
    pub is_greedy: Vec<bool>,
    /// Index of the highest log-likelihood.
    pub pred: usize,
    pub acc: f64,
    /// Present when the task reports `acc_norm`.
    pub acc_norm: Option<f64>,
}

impl DocResult {
    /// The per-document value of a metric, if this document has it.
    pub fn metric(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::Acc => Some(self.acc),
            Metric::AccNorm => self.acc_norm,
            _ => None,
        }
    }
}

/// numpy's `argmax`: the first maximum; a NaN, if present, wins (the first one).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Scores one document from its requests' results (in [`Doc::requests`] order).
///
/// `acc = [argmax(ll) == gold]`; `acc_norm = [argmax(ll[i] / chars(choice[i])) == gold]` with
/// `chars` the number of Unicode code points of the choice without the leading delimiter (Python
/// `len`). A document without choices, a gold index outside them (lm-eval would silently count it wrong), a
/// result count that is not one per request, and a NaN or infinite log-likelihood are errors.
pub fn score_doc(task: &Task, doc: &Doc, results: &[RequestResult]) -> Result<DocResult, EvalError> {
    let bad_doc = |problem: String| EvalError::BadDoc { task: task.name().to_string(), doc_id: doc.doc_id, problem };
    if doc.requests.is_empty() {
        return Err(bad_doc("the document has no requests (no choices to score)".into()));
    }
    if doc.choices.len() != doc.requests.len() {
        let (c, r) = (doc.choices.len(), doc.requests.len());
        return Err(bad_doc(format!("{c} choices for {r} requests (expected one request per choice)")));
    }
    if doc.gold >= doc.choices.len() {
        let (g, n) = (doc.gold, doc.choices.len());
        return Err(bad_doc(format!("gold index {g} is not one of the {n} choices (expected 0 to {})", n - 1)));
    }
    if results.len() != doc.requests.len() {
        return Err(EvalError::ResultCount {
            task: task.name().to_string(),
            doc_id: doc.doc_id,
            expected: doc.requests.len(),
            got: results.len(),
        });
    }
    for (i, r) in results.iter().enumerate() {
        EvalError::check_finite(task.name(), || format!("doc {}, request {i}", doc.doc_id), r.loglikelihood)?;
    }
    let lls: Vec<f64> = results.iter().map(|r| r.loglikelihood).collect();
    let pred = argmax(&lls);
    let hit = |p: usize| if p == doc.gold { 1.0 } else { 0.0 };
    let acc_norm = task.metrics().contains(&Metric::AccNorm).then(|| {
        let normed: Vec<f64> = lls.iter().zip(&doc.choices).map(|(ll, c)| ll / c.chars().count() as f64).collect();
        hit(argmax(&normed))
    });
    Ok(DocResult {
        doc_id: doc.doc_id,
        gold: doc.gold,
        loglikelihoods: lls,
        is_greedy: results.iter().map(|r| r.is_greedy).collect(),
        pred,
        acc: hit(pred),
        acc_norm,
    })
}

/// [`score_doc`] for each document; `results[i]` belongs to `docs[i]`.
pub fn score_docs(task: &Task, docs: &[Doc], results: &[Vec<RequestResult>]) -> Result<Vec<DocResult>, EvalError> {
    if docs.len() != results.len() {
        return Err(EvalError::InvalidArgument(format!(
            "task `{}`: {} result lists for {} documents (expected one per document)",
            task.name(),
            results.len(),
            docs.len()
        )));
    }
    docs.iter().zip(results).map(|(d, r)| score_doc(task, d, r)).collect()
}

/// Naive left-to-right sum, as Python 3.11's built-in `sum` (the golden run used 3.11;
/// 3.12+ compensates).
fn py_sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(0.0, |a, x| a + x)
}

/// lm-eval's `mean`: `sum(xs) / len(xs)` (NaN for no values).
pub fn mean(xs: &[f64]) -> f64 {
    py_sum(xs.iter().copied()) / xs.len() as f64
}

/// lm-eval's `mean_stderr`: `sqrt(Σ(x−mean)² / (n−1)) / sqrt(n)`; `None` ("N/A") for n ≤ 1.
/// `powf(2.0)` rather than `x * x` to call the same libm `pow` as Python's `** 2`.
pub fn mean_stderr(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n <= 1 {
        return None;
    }
    let mu = mean(xs);
    let var = py_sum(xs.iter().map(|x| (x - mu).powf(2.0))) / (n - 1) as f64;
    Some(var.sqrt() / (n as f64).sqrt())
}

/// One aggregated metric of one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricValue {
    pub metric: Metric,
    pub value: f64,
    /// `None` is lm-eval's "N/A".
    pub stderr: Option<f64>,
}

/// Aggregates per-document results into the task's metrics, in `metric_list` order.
pub fn aggregate(task: &Task, docs: &[DocResult]) -> Vec<MetricValue> {
    task.metrics()
        .iter()
        .filter_map(|&metric| {
            let xs: Vec<f64> = docs.iter().filter_map(|d| d.metric(metric)).collect();
            (xs.len() == docs.len() && !xs.is_empty()).then(|| MetricValue {
                metric,
                value: mean(&xs),
                stderr: mean_stderr(&xs),
            })
        })
        .collect()
}

/// The paper's "avg-7": the mean of acc (boolq, piqa, winogrande, arc_easy) and acc_norm
/// (hellaswag, arc_challenge, openbookqa). `None` unless all seven are present.
/// `lookup(task_name, metric)` returns a task's aggregated value.
pub fn avg7(lookup: impl Fn(&str, Metric) -> Option<f64>) -> Option<f64> {
    let values: Option<Vec<f64>> = AVG7.iter().map(|&(t, m)| lookup(t, m)).collect();
    values.map(|v| mean(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::tests::raw_numbers;
    use crate::task::Request;

    fn doc(choices: &[&str], gold: usize) -> Doc {
        Doc {
            doc_id: 0,
            requests: choices.iter().map(|c| Request { context: "q".into(), continuation: format!(" {c}") }).collect(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            gold,
        }
    }

    fn rr(lls: &[f64]) -> Vec<RequestResult> {
        lls.iter().map(|&l| RequestResult { loglikelihood: l, is_greedy: false }).collect()
    }

    #[test]
    fn argmax_is_numpy() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[-1.0, f64::NAN, 5.0, f64::NAN]), 1);
        assert_eq!(argmax(&[f64::NEG_INFINITY, -2.0]), 1);
    }

    #[test]
    fn acc_norm_divides_by_code_points() {
        let piqa = Task::from_name("piqa").unwrap();
        // "été" is 3 code points but 5 UTF-8 bytes; "abcd" is 4 of both.
        // ll/chars: -6/3 = -2.0 vs -7/4 = -1.75 → choice 1. By bytes it would be -6/5 = -1.2 → choice 0.
        let d = doc(&["été", "abcd"], 1);
        let r = score_doc(&piqa, &d, &rr(&[-6.0, -7.0])).unwrap();
        assert_eq!((r.pred, r.acc, r.acc_norm), (0, 0.0, Some(1.0)));
        // A leading/trailing space in the choice counts (PIQA keeps them): " ab " is 4 chars.
        let d = doc(&[" ab ", "abc"], 0);
        // -7/4 = -1.75 vs -6/3 = -2.0 → choice 0.
        let r = score_doc(&piqa, &d, &rr(&[-7.0, -6.0])).unwrap();
        assert_eq!((r.acc, r.acc_norm), (0.0, Some(1.0)));
        // Tasks without acc_norm do not report it.
        let boolq = Task::from_name("boolq").unwrap();
        let r = score_doc(&boolq, &doc(&["no", "yes"], 1), &rr(&[-1.0, -0.5])).unwrap();
        assert_eq!((r.acc, r.acc_norm), (1.0, None));
        // Gold outside the choices, a result-count mismatch and a non-finite score are errors.
        let e = score_doc(&boolq, &doc(&["no", "yes"], 5), &rr(&[-1.0, -0.5])).unwrap_err().to_string();
        assert_eq!(e, "task `boolq`, doc 0: gold index 5 is not one of the 2 choices (expected 0 to 1)");
        let e = score_doc(&boolq, &doc(&["no", "yes"], 1), &rr(&[-1.0])).unwrap_err().to_string();
        assert_eq!(e, "task `boolq`, doc 0: 1 results for 2 requests (expected one result per request)");
        let e = score_doc(&boolq, &doc(&[], 0), &rr(&[])).unwrap_err().to_string();
        assert_eq!(e, "task `boolq`, doc 0: the document has no requests (no choices to score)");
        for bad in [f64::NAN, f64::NEG_INFINITY, f64::INFINITY] {
            let e = score_doc(&boolq, &doc(&["no", "yes"], 1), &rr(&[-1.0, bad])).unwrap_err().to_string();
            assert!(e.starts_with("task `boolq`, doc 0, request 1: the log-likelihood is "), "{e}");
            assert!(e.contains(&bad.to_string()) && e.ends_with("not a finite number; refusing to average it"));
        }
        let docs = [doc(&["no", "yes"], 1)];
        let e = score_docs(&boolq, &docs, &[]).unwrap_err().to_string();
        assert!(e.contains("task `boolq`: 0 result lists for 1 documents (expected one per document)"), "{e}");
    }

    #[test]
    fn stderr_is_sample_stderr_of_the_mean() {
        // [1, 0, 0, 1]: mean 0.5, Σ(x-m)² = 1, /3, sqrt → 0.57735, /2 → 0.288675.
        let s = mean_stderr(&[1.0, 0.0, 0.0, 1.0]).unwrap();
        assert!((s - 0.288_675_134_594_812_9).abs() < 1e-15);
        assert_eq!(mean_stderr(&[1.0]), None);
        assert_eq!(mean_stderr(&[0.0, 0.0, 0.0]), Some(0.0));
        assert_eq!(mean(&[1.0, 0.0, 1.0, 1.0]), 0.75);
    }

    #[test]
    fn aggregate_and_avg7() {
        let piqa = Task::from_name("piqa").unwrap();
        let d = doc(&["a", "bb"], 0);
        let results: Vec<DocResult> =
            [[-1.0, -3.0], [-2.0, -1.0], [-3.0, -5.0]].iter().map(|l| score_doc(&piqa, &d, &rr(l)).unwrap()).collect();
        let agg = aggregate(&piqa, &results);
        assert_eq!(agg.len(), 2);
        assert_eq!(agg[0].metric, Metric::Acc);
        assert!((agg[0].value - 2.0 / 3.0).abs() < 1e-15);
        // acc_norm: [-1, -1.5]→0 ✓, [-2, -0.5]→1 ✗, [-3, -2.5]→1 ✗.
        assert!((agg[1].value - 1.0 / 3.0).abs() < 1e-15);
        let v = avg7(|t, m| {
            Some(if m == Metric::AccNorm {
                0.5
            } else if t == "boolq" {
                0.8
            } else {
                0.6
            })
        });
        assert!((v.unwrap() - (0.8 + 0.6 * 3.0 + 0.5 * 3.0) / 7.0).abs() < 1e-15);
        assert_eq!(avg7(|t, _| (t != "piqa").then_some(0.5)), None);
    }

    /// lm-eval's own aggregates for the golden run, from its per-document metrics, bit for bit.
    #[test]
    fn aggregates_match_golden_results_json() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../golden/lm-eval-first25");
        let results = std::fs::read_to_string(format!("{dir}/results.json")).unwrap();
        for task in ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] {
            let lines = std::fs::read_to_string(format!("{dir}/{task}.jsonl")).unwrap();
            let docs: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            let t = Task::from_name(task).unwrap();
            let section = &results[results.find(&format!("\"{task}_local\": {{")).unwrap()..];
            for m in t.metrics() {
                let xs: Vec<f64> = docs.iter().map(|d| d["metrics"][m.name()].as_f64().unwrap()).collect();
                assert_eq!(mean(&xs), raw_numbers(section, &format!("{},none", m.name()))[0], "{task} {m:?}");
                assert_eq!(
                    mean_stderr(&xs).unwrap(),
                    raw_numbers(section, &format!("{}_stderr,none", m.name()))[0],
                    "{task} {m:?} stderr"
                );
            }
            // Golden per-doc metrics follow from the golden log-likelihoods.
            let loaded = t.load_docs(&crate::task::tests::repo_data_dir(), Some(25)).unwrap();
            for ((d, g), line) in loaded.iter().zip(&docs).zip(lines.lines()) {
                let lls = raw_numbers(line, "loglikelihood");
                let r = score_doc(&t, d, &rr(&lls)).unwrap();
                assert_eq!(r.acc, g["metrics"]["acc"].as_f64().unwrap(), "{task} doc {}", d.doc_id);
                assert_eq!(r.acc_norm, g["metrics"]["acc_norm"].as_f64(), "{task} doc {}", d.doc_id);
            }
        }
    }
}
