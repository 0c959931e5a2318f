//! Calibration windows from the default corpus: exact length, seeded, no document reused.

use slm_model::calib::{calibration_windows, read_jsonl_texts, sample_windows};
use slm_model::testing::{data_dir, default_model_path};
use slm_model::Model;

#[test]
fn windows_are_seeded_and_exact_length() {
    let model = Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let corpus = data_dir().join("lambada_openai.test.jsonl");
    let a = calibration_windows(&corpus, tok, 10, 128, 1234).unwrap();
    let b = calibration_windows(&corpus, tok, 10, 128, 1234).unwrap();
    let c = calibration_windows(&corpus, tok, 10, 128, 99).unwrap();
    assert_eq!(a.len(), 10);
    assert!(a.iter().all(|w| w.len() == 128));
    assert_eq!(a, b, "same seed, same windows");
    assert_ne!(a, c, "another seed, other windows");
    assert!(a.windows(2).all(|p| p[0] != p[1]));
    // The windows are real text from the corpus: the first 20 tokens of a window decode to a substring of it.
    let texts = read_jsonl_texts(&corpus).unwrap();
    let head = tok.decode(&a[0][..20]).unwrap();
    assert!(texts.iter().any(|t| t.contains(head.trim())), "{head:?} not found in the corpus");
    // A tokenizer that starts with BOS (Gemma's) gets it first in every window, same length, the rest the same
    // sampling with one token less.
    let with_bos = tok.clone().with_bos_to_prepend(Some(1));
    let d = calibration_windows(&corpus, &with_bos, 10, 128, 1234).unwrap();
    assert!(d.iter().all(|w| w.len() == 128 && w[0] == 1));
    let e = calibration_windows(&corpus, tok, 10, 127, 1234).unwrap();
    assert!(d.iter().zip(&e).all(|(d, e)| d[1..] == e[..]));
}

#[test]
fn a_corpus_too_small_or_malformed_is_a_clear_error() {
    let model = Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("small.jsonl");
    std::fs::write(&p, "{\"text\": \"one short document\"}\n{\"text\": \"and another\"}\n").unwrap();
    let e = calibration_windows(&p, tok, 2, 128, 0).unwrap_err().to_string();
    assert!(e.contains("small.jsonl") && e.contains("corpus too small"), "{e}");
    std::fs::write(&p, "{\"text\": \"fine\"}\n{\"body\": 3}\n").unwrap();
    let e = calibration_windows(&p, tok, 1, 4, 0).unwrap_err().to_string();
    assert!(e.contains("small.jsonl") && e.contains("line 2") && e.contains("`text`"), "{e}");
    // A long document on its own yields a window inside it.
    let long = vec!["word ".repeat(300)];
    let w = sample_windows(&long, tok, 1, 64, 5, &p).unwrap();
    assert_eq!(w[0].len(), 64);
}
