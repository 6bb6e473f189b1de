//! Structured output: constraints compiled by llguidance, and the threads that compute their token masks.
//!
//! A request's constraint (a JSON schema, a regex or a Lark grammar: [`ConstraintSpec`]) is compiled while the
//! request is prepared ([`Constraints::compile`]), so a bad one is refused before it is queued. The engine then
//! hands each constrained sample's matcher to a [`MaskPool`] thread, which computes the mask of its first token;
//! after each sampled token the engine sends the token there, and the thread commits it and computes the next
//! mask, or reports that the grammar has ended. Masks come back to the engine as [`crate::engine::Command::Mask`]
//! messages: the engine thread never runs a grammar, and the core knows only whether a request's mask is ready.
//!
//! The token environment is built by hand from our tokenizer's token bytes ([`TokenTable`]) rather than by
//! `toktrie_hf_tokenizers`, which pins a `tokenizers` older than ours.

use crate::core::ReqId;
use crate::engine::Command;
use crate::text::{TokenTable, Tokenizer};
use anyhow::{Result, bail};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

/// What a request constrains its output to. Tool calling builds a [`ConstraintSpec::Lark`] for a forced call.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// JSON that validates against the schema (`{"type": "object"}` for OpenAI's `json_object`).
    JsonSchema(Value),
    /// Text the whole of which matches the regex.
    Regex(String),
    /// Text the Lark grammar (llguidance's dialect) derives.
    Lark(String),
}

impl ConstraintSpec {
    /// The HTTP API's field that carries this kind of constraint: an error's `param`.
    pub fn param(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "response_format",
            _ => self.key(),
        }
    }

    /// The sampling key that carries it on the wire (docs/protocol.md): what an error's message starts with.
    pub fn key(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "json_schema",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Lark(_) => "grammar",
        }
    }
}

/// A compiled constraint, ready to start a sample from. Cloning it is cheap next to compiling it again.
pub struct Compiled(Matcher);

impl Compiled {
    /// A matcher of its own for one sample.
    pub fn matcher(&self) -> Matcher {
        self.0.deep_clone()
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compiled")
    }
}

/// Compiles constraints against the served model's vocabulary. Built once at startup (the token trie and
/// llguidance's precomputed token slices take a few hundred milliseconds for a 150k vocabulary).
pub struct Constraints {
    factory: ParserFactory,
    mask_words: usize,
}

impl Constraints {
    /// `vocab_size` is the model's (its logits' width), which may exceed the tokenizer's: the ids past the
    /// tokenizer's are never allowed. `eos_token_ids` are what ends a generation; a grammar that is complete
    /// allows them.
    pub fn new(tokenizer: Arc<Tokenizer>, table: &TokenTable, eos_token_ids: &[u32], vocab_size: u32) -> Result<Self> {
        let env = TokenEnv::new(tokenizer, table, eos_token_ids, vocab_size)?;
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env)?;
        // Grammar warnings and errors go back to the client; nothing to print on the daemon's stderr.
        factory.quiet();
        Ok(Constraints { factory, mask_words: vocab_size.div_ceil(32) as usize })
    }

    /// W: the words of one mask.
    pub fn mask_words(&self) -> usize {
        self.mask_words
    }

    /// Compiles `spec`; the error says what is wrong with it, for a 400 naming [`ConstraintSpec::param`].
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Compiled, String> {
        let grammar = match spec {
            ConstraintSpec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("the JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(with_json_layout(schema.clone()))
            }
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        // The first mask is computed here once, which also surfaces what fails only when parsing starts.
        matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok(Compiled(matcher))
    }
}

/// JSON laid out as people and models write it (`{"a": 1, "b": [2, 3]}`), and no whitespace anywhere else: with
/// llguidance's default (any whitespace between tokens) a small model can spend its whole budget on newlines.
/// A schema that sets its own `x-guidance` options keeps them.
fn with_json_layout(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut()
        && !obj.contains_key("x-guidance")
    {
        let layout = serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        obj.insert("x-guidance".into(), layout);
    }
    schema
}

/// llguidance's view of the vocabulary: every token's bytes (special tokens behind the trie's marker byte), and
/// our tokenizer for the text it needs tokenized.
struct TokenEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenEnv {
    fn new(tokenizer: Arc<Tokenizer>, table: &TokenTable, eos_token_ids: &[u32], vocab_size: u32) -> Result<Self> {
        let known = tokenizer.vocab_size() as u32;
        if known > vocab_size {
            bail!("the tokenizer has {known} tokens, more than the model's {vocab_size}");
        }
        let Some(&eos) = eos_token_ids.first() else { bail!("the model has no EOS token") };
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| {
                let bytes = table.bytes(id);
                if id >= known || tokenizer.is_special(id) || bytes.is_empty() {
                    // Special tokens, and the model's ids past the tokenizer: reachable only by name.
                    let name =
                        if id < known && !bytes.is_empty() { bytes.to_vec() } else { format!("<[{id}]>").into() };
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&name);
                    marked
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab_size, eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos_token_ids.len() > 1 {
            trie = trie.with_eos_tokens(eos_token_ids);
        }
        Ok(TokenEnv { trie, tokenizer })
    }
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode_with(text, false).unwrap_or_default())
    }
}

/// What a mask thread reports to the engine.
#[derive(Debug)]
pub enum MaskEvent {
    /// The mask of request `id`'s next sample (W words).
    Ready { id: ReqId, words: Box<[u32]> },
    /// The grammar is complete and allows nothing more: the request ends with `stop`.
    Stopped { id: ReqId },
    /// The matcher failed (a token outside its mask, or an internal error): the request ends with an error.
    Failed { id: ReqId, why: String },
}

enum Job {
    Start { id: ReqId, matcher: Box<Matcher> },
    Commit { id: ReqId, token: u32 },
    Drop { id: ReqId },
}

/// Threads that hold the matchers of live constrained samples and compute their masks, each sample on one
/// thread (by id) so its jobs run in order.
pub struct MaskPool {
    jobs: Vec<Sender<Job>>,
}

/// Mask threads: two keep a batch's masks ahead of the steps without taking the cores the tokenizer needs.
pub const MASK_THREADS: usize = 2;

impl MaskPool {
    /// Starts `threads` mask threads that report to the engine through `engine`.
    pub fn spawn(threads: usize, mask_words: usize, engine: Sender<Command>) -> std::io::Result<Self> {
        let mut jobs = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (tx, rx) = channel();
            let engine = engine.clone();
            std::thread::Builder::new()
                .name(format!("masks-{i}"))
                .spawn(move || mask_thread(rx, engine, mask_words))?;
            jobs.push(tx);
        }
        Ok(MaskPool { jobs })
    }

    fn send(&self, id: ReqId, job: Job) {
        // A thread is gone only when the engine's channel is, and then nobody waits for its masks.
        let _ = self.jobs[(id % self.jobs.len() as u64) as usize].send(job);
    }

    /// Computes the first mask of a new sample.
    pub fn start(&self, id: ReqId, matcher: Matcher) {
        self.send(id, Job::Start { id, matcher: Box::new(matcher) });
    }

    /// Commits `token` and computes the next mask.
    pub fn commit(&self, id: ReqId, token: u32) {
        self.send(id, Job::Commit { id, token });
    }

    /// Forgets the sample (it ended).
    pub fn drop_sample(&self, id: ReqId) {
        self.send(id, Job::Drop { id });
    }
}

fn mask_thread(jobs: Receiver<Job>, engine: Sender<Command>, mask_words: usize) {
    let mut live: HashMap<ReqId, Box<Matcher>> = HashMap::new();
    while let Ok(job) = jobs.recv() {
        let (id, event) = match job {
            Job::Drop { id } => {
                live.remove(&id);
                continue;
            }
            Job::Start { id, matcher } => {
                let event = next_mask(live.entry(id).insert_entry(matcher).into_mut(), id, mask_words);
                (id, event)
            }
            Job::Commit { id, token } => {
                let Some(m) = live.get_mut(&id) else { continue };
                let event = match m.consume_token(token) {
                    Err(e) => MaskEvent::Failed { id, why: format!("token {token} refused by the grammar: {e}") },
                    Ok(()) if m.is_stopped() => MaskEvent::Stopped { id },
                    Ok(()) => next_mask(m, id, mask_words),
                };
                (id, event)
            }
        };
        if !matches!(event, MaskEvent::Ready { .. }) {
            live.remove(&id);
        }
        if engine.send(Command::Mask(event)).is_err() {
            return;
        }
    }
}

fn next_mask(m: &mut Matcher, id: ReqId, mask_words: usize) -> MaskEvent {
    match m.compute_mask() {
        Ok(mask) => {
            let mut words = vec![0u32; mask_words].into_boxed_slice();
            let src = mask.as_slice();
            let n = src.len().min(mask_words);
            words[..n].copy_from_slice(&src[..n]);
            MaskEvent::Ready { id, words }
        }
        Err(e) => MaskEvent::Failed { id, why: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_tokenizer::byte_level_tokenizer;

    fn constraints() -> (Constraints, Arc<Tokenizer>) {
        let tokenizer = byte_level_tokenizer();
        let table = TokenTable::new(&tokenizer);
        let vocab = tokenizer.vocab_size() as u32 + 5;
        let eos = tokenizer.token_id(crate::text::test_tokenizer::SPECIAL).unwrap();
        (Constraints::new(tokenizer.clone(), &table, &[eos], vocab).unwrap(), tokenizer)
    }

    fn allowed(words: &[u32], id: u32) -> bool {
        words[id as usize / 32] & (1 << (id % 32)) != 0
    }

    #[test]
    fn a_regex_allows_only_what_can_continue_it() {
        let (c, tok) = constraints();
        let mut m = c.compile(&ConstraintSpec::Regex("ab+".into())).unwrap().matcher();
        let mask = m.compute_mask().unwrap();
        let words = mask.as_slice();
        let (a, b) = (tok.encode("a").unwrap()[0], tok.encode("b").unwrap()[0]);
        assert!(allowed(words, a) && !allowed(words, b));
        m.consume_token(a).unwrap();
        let mask = m.compute_mask().unwrap();
        assert!(allowed(mask.as_slice(), b) && !allowed(mask.as_slice(), a));
    }

    #[test]
    fn bad_constraints_are_refused_with_a_reason() {
        let (c, _) = constraints();
        for bad in [
            ConstraintSpec::Regex("a(".into()),
            ConstraintSpec::Lark("start: undefined_rule".into()),
            ConstraintSpec::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            ConstraintSpec::JsonSchema(serde_json::json!(3)),
        ] {
            let e = c.compile(&bad).expect_err(&format!("{bad:?}"));
            assert!(!e.is_empty());
        }
        assert_eq!(ConstraintSpec::Lark(String::new()).param(), "grammar");
    }

    #[test]
    fn the_pool_reports_masks_and_the_grammar_ending() {
        let (c, tok) = constraints();
        let (tx, rx) = channel();
        let pool = MaskPool::spawn(2, c.mask_words(), tx).unwrap();
        pool.start(7, c.compile(&ConstraintSpec::Regex("ab".into())).unwrap().matcher());
        let Ok(Command::Mask(MaskEvent::Ready { id: 7, words })) = rx.recv() else { panic!("a first mask") };
        assert_eq!(words.len(), c.mask_words());
        let (a, b) = (tok.encode("a").unwrap()[0], tok.encode("b").unwrap()[0]);
        assert!(allowed(&words, a));
        pool.commit(7, a);
        let Ok(Command::Mask(MaskEvent::Ready { id: 7, words })) = rx.recv() else { panic!("a second mask") };
        assert!(allowed(&words, b) && !allowed(&words, a));
        pool.commit(7, b);
        // "ab" is complete: only EOS may follow, or the grammar has stopped.
        match rx.recv() {
            Ok(Command::Mask(MaskEvent::Stopped { id: 7 })) => {}
            Ok(Command::Mask(MaskEvent::Ready { id: 7, words })) => {
                let eos = tok.token_id(crate::text::test_tokenizer::SPECIAL).unwrap();
                assert!(allowed(&words, eos) && !allowed(&words, a) && !allowed(&words, b));
            }
            _ => panic!("the end of the grammar"),
        }
        pool.start(8, c.compile(&ConstraintSpec::Regex("a".into())).unwrap().matcher());
        let _ = rx.recv();
        pool.commit(8, b);
        assert!(matches!(rx.recv(), Ok(Command::Mask(MaskEvent::Failed { id: 8, .. }))));
    }
}
