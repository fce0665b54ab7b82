//! Generation, kept apart from the models (as candle does): greedy decoding and beam search
//! exactly as transformers 4.57's `generate`, over any encoder-decoder model that implements
//! [`Seq2SeqGenerate`] (one decoding step with a KV cache).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// The ids generation starts, stops and pads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// The first decoder input.
    pub decoder_start: usize,
    /// End of sequence.
    pub eos: Option<usize>,
    /// Padding (`pad_token_id`).
    pub pad: Option<usize>,
}

/// An encoder-decoder model that generation drives one step at a time.
pub trait Seq2SeqGenerate<B: Backend> {
    /// The decoder's incremental state (keys and values of earlier steps).
    type Cache: Default;

    /// Encodes the source: `[batch, src_len, hidden]`.
    fn encode_source(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3>;

    /// Decodes the next tokens `ids` `[rows, 1]` against `encoder` and the cache: logits
    /// `[rows, 1, vocab]`.
    fn decode_step(
        &self,
        ids: Tensor<B, 2, Int>,
        encoder: Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: &mut Self::Cache,
    ) -> Tensor<B, 3>;

    /// Keeps the cache rows `rows` (in that order), for beams that survive a step.
    fn reorder_cache(cache: &mut Self::Cache, rows: Tensor<B, 1, Int>);

    /// Start, end and pad ids.
    fn special_tokens(&self) -> SpecialTokens;

    /// The output vocabulary size.
    fn vocab_size(&self) -> usize;
}

/// Greedy decoding with a KV cache, as transformers' `generate(do_sample=False,
/// num_beams=1, max_new_tokens=n)`: starts from the decoder start token, stops when every
/// sequence has produced EOS, pads finished sequences with the pad token. Returns the
/// generated ids including the start token, `[batch, <= 1 + max_new_tokens]`.
pub fn greedy<B: Backend, M: Seq2SeqGenerate<B>>(
    model: &M,
    input_ids: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2, Int>>,
    max_new_tokens: usize,
) -> Vec<Vec<usize>> {
    let device = input_ids.device();
    let b = input_ids.dims()[0];
    let enc = model.encode_source(input_ids, attention_mask.clone());
    let tokens = model.special_tokens();
    let start = tokens.decoder_start;
    let eos = tokens.eos;
    let pad = tokens.pad.unwrap_or(0);
    let mut out: Vec<Vec<usize>> = vec![vec![start]; b];
    let mut done = vec![false; b];
    let mut cache = M::Cache::default();
    let mut next: Vec<i64> = vec![start as i64; b];
    for _ in 0..max_new_tokens {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(next.clone(), [b, 1]), &device);
        let logits = model.decode_step(ids, enc.clone(), attention_mask.clone(), &mut cache);
        let best = peft_core::ops::argmax_last(logits);
        for i in 0..b {
            let tok = if done[i] { pad } else { best[i] };
            out[i].push(tok);
            if Some(tok) == eos {
                done[i] = true;
            }
            next[i] = tok as i64;
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    out
}

/// Beam search exactly as transformers 4.57's `generate(num_beams=K, do_sample=False)` with
/// its defaults (`length_penalty = 1.0`, `early_stopping = False`, one returned sequence), with
/// at most `max_new_tokens` new tokens. Returns, per input, the best finished hypothesis (start
/// token included), right-padded to the longest returned hypothesis as transformers pads them
/// (`pad_token_id or eos_token_id`, so EOS for T5).
pub fn beam<B: Backend, M: Seq2SeqGenerate<B>>(
    model: &M,
    input_ids: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2, Int>>,
    max_new_tokens: usize,
    num_beams: usize,
) -> Vec<Vec<usize>> {
    if num_beams <= 1 {
        return greedy(model, input_ids, attention_mask, max_new_tokens);
    }
    const NEG: f32 = -1.0e9;
    let device = input_ids.device();
    let (batch, k) = (input_ids.dims()[0], num_beams);
    // Every input repeated once per beam: rows b*K .. b*K+K-1.
    let expand: Vec<i64> = (0..batch)
        .flat_map(|b| std::iter::repeat_n(b as i64, k))
        .collect();
    let expand = Tensor::<B, 1, Int>::from_data(TensorData::new(expand, [batch * k]), &device);
    let enc = model.encode_source(input_ids, attention_mask.clone());
    let enc = enc.select(0, expand.clone());
    let mask = attention_mask.map(|m| m.select(0, expand));
    let tokens = model.special_tokens();
    let start = tokens.decoder_start;
    let eos = tokens.eos;
    let pad = tokens.pad.unwrap_or(0);
    let max_length = 1 + max_new_tokens;
    let keep = 2 * k; // max(2, 1 + #eos) * num_beams
    let vocab = model.vocab_size();

    let mut running: Vec<Vec<Vec<usize>>> = vec![vec![vec![start]; k]; batch];
    let mut running_scores: Vec<Vec<f32>> =
        vec![(0..k).map(|i| if i == 0 { 0.0 } else { NEG }).collect(); batch];
    let mut finished: Vec<Vec<(f32, Vec<usize>, bool)>> =
        vec![vec![(NEG, vec![start], false); k]; batch];
    let mut unsatisfied = vec![true; batch];
    let mut cache = M::Cache::default();
    let mut cur_len = 1usize;
    let mut next: Vec<i64> = vec![start as i64; batch * k];
    loop {
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(next.clone(), [batch * k, 1]), &device);
        let logits = model.decode_step(ids, enc.clone(), mask.clone(), &mut cache);
        let lp = peft_core::ops::log_softmax(logits.reshape([batch * k, vocab]), 1);
        let lp: Vec<f32> = lp
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 log-probs");
        let mut all_hit = true;
        let mut reorder = Vec::with_capacity(batch * k);
        for b in 0..batch {
            // Top `keep` continuations over all beams.
            let mut cand: Vec<(f32, usize)> = Vec::with_capacity(k * vocab);
            for beam in 0..k {
                let row = &lp[(b * k + beam) * vocab..(b * k + beam + 1) * vocab];
                for (v, x) in row.iter().enumerate() {
                    cand.push((x + running_scores[b][beam], beam * vocab + v));
                }
            }
            cand.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            cand.truncate(keep);
            let tops: Vec<(f32, usize, usize, bool)> = cand
                .iter()
                .map(|&(score, idx)| {
                    let (beam, tok) = (idx / vocab, idx % vocab);
                    let hit = Some(tok) == eos || cur_len + 1 >= max_length;
                    (score, beam, tok, hit)
                })
                .collect();
            all_hit &= tops.iter().all(|t| t.3);
            // Next running beams: the best non-finished continuations.
            let mut order: Vec<usize> = (0..keep).collect();
            let run_score = |i: usize| tops[i].0 + if tops[i].3 { NEG } else { 0.0 };
            order.sort_by(|&x, &y| run_score(y).total_cmp(&run_score(x)).then(x.cmp(&y)));
            let mut new_running = Vec::with_capacity(k);
            let mut new_scores = Vec::with_capacity(k);
            for &i in order.iter().take(k) {
                let (_, beam, tok, _) = tops[i];
                let mut seq = running[b][beam].clone();
                seq.push(tok);
                new_running.push(seq);
                new_scores.push(run_score(i));
                reorder.push((b * k + beam) as i64);
            }
            // Finished hypotheses: merge the newly finished among the top K with the kept ones.
            let penalty = (cur_len + 1 - 1) as f32;
            let mut merged = finished[b].clone();
            for (i, &(score, beam, tok, hit)) in tops.iter().enumerate() {
                let just_finished = hit && i < k;
                let mut s = score / penalty;
                if !unsatisfied[b] {
                    s += NEG;
                }
                if !just_finished {
                    s += NEG;
                }
                let mut seq = running[b][beam].clone();
                seq.push(tok);
                merged.push((s, seq, just_finished));
            }
            let mut idx: Vec<usize> = (0..merged.len()).collect();
            idx.sort_by(|&x, &y| merged[y].0.total_cmp(&merged[x].0).then(x.cmp(&y)));
            finished[b] = idx.iter().take(k).map(|&i| merged[i].clone()).collect();
            running[b] = new_running;
            running_scores[b] = new_scores;
        }
        cur_len += 1;
        for b in 0..batch {
            let best_possible = running_scores[b][0] / (cur_len - 1) as f32;
            let min_finished = finished[b]
                .iter()
                .map(|f| f.0)
                .fold(f32::INFINITY, f32::min);
            let improvable = finished[b]
                .iter()
                .any(|f| best_possible > if f.2 { min_finished } else { NEG });
            unsatisfied[b] &= improvable;
        }
        if !unsatisfied.iter().any(|u| *u) || all_hit {
            break;
        }
        // Reorder the cache to the surviving beams and feed their last tokens.
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(reorder, [batch * k]), &device);
        M::reorder_cache(&mut cache, idx);
        next = running
            .iter()
            .flat_map(|beams| beams.iter().map(|s| *s.last().expect("non-empty") as i64))
            .collect();
    }
    // transformers fills finished beams with `pad_token_id or eos_token_id`: with pad id 0
    // (T5's) that is EOS.
    let fill = match (tokens.pad, eos) {
        (Some(p), _) if p != 0 => p,
        (_, Some(e)) => e,
        _ => pad,
    };
    let mut out: Vec<Vec<usize>> = finished.into_iter().map(|f| f[0].1.clone()).collect();
    let len = out.iter().map(Vec::len).max().unwrap_or(1);
    for o in out.iter_mut() {
        o.resize(len, fill);
    }
    out
}
