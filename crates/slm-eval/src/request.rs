//! Token-level requests, built the way lm-eval's `HFLM` builds them
//! (`_encode_pair` and the truncation in `_loglikelihood_tokens`).

use crate::error::EvalError;
use crate::task::Doc;
use crate::text::py_rstrip;

/// Text → token ids as lm-eval encodes them: no special tokens (the default model's tokenizer adds none), or
/// the BOS first where lm-eval adds it ([`TextEncoder::bos`]: Gemma).
pub trait TextEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError>;

    /// The BOS token `encode` puts first, if any.
    fn bos(&self) -> Option<u32> {
        None
    }
}

impl<T: TextEncoder + ?Sized> TextEncoder for &T {
    fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        (**self).encode(text)
    }

    fn bos(&self) -> Option<u32> {
        (**self).bos()
    }
}

/// One log-likelihood request on token ids.
///
/// The model input is `context ++ continuation[..len-1]`; the request's log-likelihood is the sum,
/// over `j`, of `log_softmax(logits[context.len() - 1 + j])[continuation[j]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Conditioning tokens (already left-truncated; never empty).
    pub context: Vec<u32>,
    /// Tokens whose log-probabilities are summed (never empty).
    pub continuation: Vec<u32>,
}

impl TokenRequest {
    /// lm-eval's left truncation: keep the last `max_length + 1` tokens of `context ++
    /// continuation` (the model input is all but the last). Errors like lm-eval's assertions:
    /// an empty context or continuation, or a continuation longer than `max_length`.
    pub fn truncated(context: &[u32], continuation: Vec<u32>, max_length: usize) -> Result<TokenRequest, String> {
        if continuation.is_empty() {
            return Err("continuation encodes to no tokens".into());
        }
        if continuation.len() > max_length {
            return Err(format!(
                "continuation has {} tokens, more than the maximum length {max_length}",
                continuation.len()
            ));
        }
        if context.is_empty() {
            return Err("context encodes to no tokens".into());
        }
        let drop = (context.len() + continuation.len()).saturating_sub(max_length + 1);
        Ok(TokenRequest { context: context[drop..].to_vec(), continuation })
    }

    /// The tokens the model reads: `context ++ continuation[..len-1]`.
    pub fn input(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.context.len() + self.continuation.len() - 1);
        v.extend_from_slice(&self.context);
        v.extend_from_slice(&self.continuation[..self.continuation.len() - 1]);
        v
    }

    /// Number of model input tokens.
    pub fn input_len(&self) -> usize {
        self.context.len() + self.continuation.len() - 1
    }
}

/// The token requests of one document, in the order of [`Doc::requests`]. Requests of one
/// document usually share their context tokens (all but WinoGrande), so a scorer can run the
/// context once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRequests {
    pub doc_id: usize,
    pub requests: Vec<TokenRequest>,
}

/// Moves the context's trailing whitespace (Python `rstrip`) to the front of the continuation.
pub fn move_trailing_whitespace<'a>(context: &'a str, continuation: &str) -> (&'a str, String) {
    let kept = py_rstrip(context);
    let moved = &context[kept.len()..];
    (kept, format!("{moved}{continuation}"))
}

/// lm-eval's `_encode_pair`: trailing whitespace moves from context to continuation; then
/// `whole = enc(context + continuation)`, `ctx = enc(context)`, and the continuation tokens are
/// `whole[len(ctx)..]` (a length slice: the continuation is never encoded alone, and `ctx` is not
/// checked to be a prefix of `whole`). Returns `(ctx, continuation tokens)`.
pub fn encode_pair(
    encoder: &impl TextEncoder,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
    let (context, continuation) = move_trailing_whitespace(context, continuation);
    let whole = encoder.encode(&format!("{context}{continuation}"))?;
    let ctx = encoder.encode(context)?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok((ctx, cont))
}

/// Builds the token requests of each document, as lm-eval would, left-truncated to `max_length`
/// (the model's context length; lm-eval reads `max_position_embeddings`). A context string shared
/// by consecutive requests of a document is encoded once.
pub fn build_token_requests(
    encoder: &impl TextEncoder,
    docs: &[Doc],
    max_length: usize,
) -> Result<Vec<DocRequests>, EvalError> {
    docs.iter()
        .map(|doc| {
            let mut last_ctx: Option<(&str, Vec<u32>)> = None;
            let requests = doc
                .requests
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let (context, continuation) = move_trailing_whitespace(&r.context, &r.continuation);
                    let whole = encoder.encode(&format!("{context}{continuation}"))?;
                    let ctx = match &last_ctx {
                        Some((c, toks)) if *c == context => toks.clone(),
                        _ => {
                            let toks = encoder.encode(context)?;
                            last_ctx = Some((context, toks.clone()));
                            toks
                        }
                    };
                    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
                    TokenRequest::truncated(&ctx, cont, max_length).map_err(|problem| EvalError::BadRequest {
                        doc_id: doc.doc_id,
                        request: i,
                        problem,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(DocRequests { doc_id: doc.doc_id, requests })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::task::Request;

    /// A toy tokenizer: every maximal run of non-space characters, with one preceding space
    /// attached (GPT-2 style "Ġword"), is a token; a run of spaces not followed by a word is one
    /// token per space. Ids are assigned by a fixed hash so tests are deterministic.
    pub(crate) struct ToyEncoder;

    pub(crate) fn toy_id(piece: &str) -> u32 {
        piece.bytes().fold(17u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % 50_000
    }

    impl TextEncoder for ToyEncoder {
        fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
            let mut pieces: Vec<String> = Vec::new();
            let mut cur = String::new();
            for c in text.chars() {
                if c == ' ' {
                    if !cur.is_empty() {
                        pieces.push(std::mem::take(&mut cur));
                    }
                    cur.push(' ');
                } else {
                    cur.push(c);
                }
            }
            if !cur.is_empty() {
                pieces.push(cur);
            }
            Ok(pieces.iter().map(|p| toy_id(p)).collect())
        }
    }

    #[test]
    fn trailing_whitespace_moves_to_the_continuation() {
        assert_eq!(move_trailing_whitespace("Fog is ", " a marsh"), ("Fog is", "  a marsh".to_string()));
        assert_eq!(move_trailing_whitespace("Answer:", " yes"), ("Answer:", " yes".to_string()));
        assert_eq!(move_trailing_whitespace("a \n\u{a0}", "b"), ("a", " \n\u{a0}b".to_string()));
        // The toy tokenizer attaches a space to the following word, so "x ", " y" encoded apart
        // would give [x, " ", " y"]; lm-eval's split gives ctx [x], continuation [" ", " y"]
        // (the whole is "x  y" → [x, " ", " y"]).
        let (ctx, cont) = encode_pair(&ToyEncoder, "x ", " y").unwrap();
        assert_eq!(ctx, vec![toy_id("x")]);
        assert_eq!(cont, vec![toy_id(" "), toy_id(" y")]);
        let (ctx, cont) = encode_pair(&ToyEncoder, "Answer:", " yes").unwrap();
        assert_eq!((ctx, cont), (vec![toy_id("Answer:")], vec![toy_id(" yes")]));
    }

    /// An encoder that merges across the context/continuation boundary: the continuation tokens
    /// are a pure length slice of the whole, not the continuation encoded alone.
    struct MergingEncoder;
    impl TextEncoder for MergingEncoder {
        fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
            // "ab" is one token (9); other characters are their code points.
            let mut out = Vec::new();
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                if c == 'a' && chars.peek() == Some(&'b') {
                    chars.next();
                    out.push(9);
                } else {
                    out.push(c as u32);
                }
            }
            Ok(out)
        }
    }

    #[test]
    fn continuation_is_a_length_slice_of_the_whole() {
        // whole "xab" = [x, ab]; ctx "xa" = [x, a]; continuation = whole[2..] = [] → lm-eval
        // would assert; we refuse it as a bad request.
        let (ctx, cont) = encode_pair(&MergingEncoder, "xa", "b").unwrap();
        assert_eq!(ctx, vec!['x' as u32, 'a' as u32]);
        assert!(cont.is_empty());
        let docs = vec![Doc {
            doc_id: 7,
            requests: vec![Request { context: "xa".into(), continuation: "b".into() }],
            choices: vec!["b".into()],
            gold: 0,
        }];
        let e = build_token_requests(&MergingEncoder, &docs, 10).unwrap_err();
        assert!(matches!(e, EvalError::BadRequest { doc_id: 7, request: 0, .. }), "{e}");
        // "xa" + "bc": whole [x, ab, c], ctx [x, a] → continuation [c] only.
        let (ctx, cont) = encode_pair(&MergingEncoder, "xa", "bc").unwrap();
        assert_eq!((ctx.len(), cont), (2, vec!['c' as u32]));
    }

    #[test]
    fn left_truncation_keeps_last_max_length_plus_one() {
        let r = TokenRequest::truncated(&[1, 2, 3, 4, 5], vec![6, 7], 4).unwrap();
        // ctx+cont = 1..=7, keep the last 5 = [3,4,5,6,7]; model input = [3,4,5,6].
        assert_eq!(r.context, vec![3, 4, 5]);
        assert_eq!(r.input(), vec![3, 4, 5, 6]);
        assert_eq!(r.input_len(), 4);
        let r = TokenRequest::truncated(&[1, 2], vec![3], 4).unwrap();
        assert_eq!(r.context, vec![1, 2]);
        assert_eq!(r.input(), vec![1, 2]);
        let r = TokenRequest::truncated(&[1, 2], vec![3, 4, 5, 6], 4).unwrap();
        assert_eq!((r.context.clone(), r.input()), (vec![2], vec![2, 3, 4, 5]));
        assert!(TokenRequest::truncated(&[1], vec![2, 3, 4, 5, 6], 4).is_err());
        assert!(TokenRequest::truncated(&[1], vec![], 4).is_err());
        assert!(TokenRequest::truncated(&[], vec![1], 4).is_err());
    }

    #[test]
    fn doc_requests_share_context_tokens() {
        let docs = vec![Doc {
            doc_id: 0,
            requests: vec![
                Request { context: "Q: a b\nA:".into(), continuation: " yes".into() },
                Request { context: "Q: a b\nA:".into(), continuation: " no way".into() },
            ],
            choices: vec!["yes".into(), "no way".into()],
            gold: 0,
        }];
        let reqs = build_token_requests(&ToyEncoder, &docs, 100).unwrap();
        let ctx = ToyEncoder.encode("Q: a b\nA:").unwrap();
        assert_eq!(reqs[0].requests[0].context, ctx);
        assert_eq!(reqs[0].requests[1].context, ctx);
        assert_eq!(reqs[0].requests[1].continuation, vec![toy_id(" no"), toy_id(" way")]);
        // Truncation to 3: context keeps its last 2 tokens for the 2-token continuation.
        let reqs = build_token_requests(&ToyEncoder, &docs, 3).unwrap();
        assert_eq!(reqs[0].requests[1].context, ctx[ctx.len() - 2..].to_vec());
        assert_eq!(reqs[0].requests[0].context, ctx[ctx.len() - 3..].to_vec());
    }
}
