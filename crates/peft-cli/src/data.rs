//! Training data: JSONL or CSV rows with a text and a label column, a prompt template, and the
//! seq2seq batches built from them (HF conventions: labels padded with -100, decoder inputs are
//! the labels shifted right behind the decoder start token).

use std::path::Path;

use anyhow::{Context, Result, bail};
use peft_io::TextTokenizer;

/// One example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The input text (before the prompt template).
    pub text: String,
    /// The target label.
    pub label: String,
}

/// Reads `path` as JSONL (`.jsonl`/`.json`) or CSV (`.csv`), taking `text_col` and `label_col`.
pub fn read_examples(path: &Path, text_col: &str, label_col: &str) -> Result<Vec<Example>> {
    let body =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let rows = if ext.eq_ignore_ascii_case("csv") {
        read_csv(&body, text_col, label_col)
            .with_context(|| format!("parsing {}", path.display()))?
    } else {
        let mut rows = Vec::new();
        for (i, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let get = |c: &str| -> Result<String> {
                match v.get(c) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(other) if !other.is_null() => Ok(other.to_string()),
                    _ => bail!("{}:{}: no `{c}` field", path.display(), i + 1),
                }
            };
            rows.push(Example {
                text: get(text_col)?,
                label: get(label_col)?,
            });
        }
        rows
    };
    if rows.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(rows)
}

/// Minimal RFC 4180 CSV: quoted fields with `""` escapes, a header row.
fn read_csv(body: &str, text_col: &str, label_col: &str) -> Result<Vec<Example>> {
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut field = String::new();
    let mut record = Vec::new();
    let mut quoted = false;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => record.push(std::mem::take(&mut field)),
            ('\n', false) => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            ('\r', false) => {}
            (c, _) => field.push(c),
        }
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    let header = records.first().context("empty CSV")?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| format!("no column `{name}` in header {header:?}"))
    };
    let (t, l) = (col(text_col)?, col(label_col)?);
    records[1..]
        .iter()
        .filter(|r| !(r.len() == 1 && r[0].is_empty()))
        .enumerate()
        .map(|(i, r)| {
            Ok(Example {
                text: r
                    .get(t)
                    .with_context(|| format!("row {}: too few fields", i + 2))?
                    .clone(),
                label: r
                    .get(l)
                    .with_context(|| format!("row {}: too few fields", i + 2))?
                    .clone(),
            })
        })
        .collect()
}

/// `Tweet text: {text} Label:` style templates; `{text}` is replaced by the example's text.
pub fn apply_template(template: &str, text: &str) -> String {
    template.replace("{text}", text)
}

/// A tokenized seq2seq batch (row-major `[batch, len]`).
#[derive(Clone, Debug)]
pub struct Seq2SeqBatch {
    /// Source ids, right-padded.
    pub input_ids: Vec<Vec<u32>>,
    /// Source mask.
    pub attention_mask: Vec<Vec<u32>>,
    /// Decoder inputs: start token, then labels shifted right (pad after the end).
    pub decoder_input_ids: Vec<Vec<u32>>,
    /// Targets, -100 where padded.
    pub labels: Vec<Vec<i64>>,
    /// Real (non-pad) tokens in sources and targets, for throughput.
    pub tokens: usize,
}

/// Builds a batch like `DataCollatorForSeq2Seq` with `label_pad_token_id = -100`.
pub fn seq2seq_batch(
    tok: &TextTokenizer,
    examples: &[&Example],
    template: &str,
    max_source: usize,
    max_target: usize,
    pad: u32,
    decoder_start: u32,
) -> Result<Seq2SeqBatch> {
    let prompts: Vec<String> = examples
        .iter()
        .map(|e| apply_template(template, &e.text))
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let src = tok.encode_batch(&refs, Some(max_source), pad)?;
    let targets = examples
        .iter()
        .map(|e| tok.encode(&e.label, Some(max_target)))
        .collect::<peft_io::Result<Vec<_>>>()?;
    let t_len = targets.iter().map(Vec::len).max().unwrap_or(1);
    let mut labels = Vec::new();
    let mut dec = Vec::new();
    let mut tokens: usize = src.mask.iter().flatten().map(|m| *m as usize).sum();
    for t in &targets {
        tokens += t.len();
        let mut l: Vec<i64> = t.iter().map(|v| *v as i64).collect();
        l.resize(t_len, -100);
        let mut d = vec![decoder_start];
        d.extend(
            l[..t_len - 1]
                .iter()
                .map(|v| if *v < 0 { pad } else { *v as u32 }),
        );
        labels.push(l);
        dec.push(d);
    }
    Ok(Seq2SeqBatch {
        input_ids: src.ids,
        attention_mask: src.mask,
        decoder_input_ids: dec,
        labels,
        tokens,
    })
}

/// The shuffling RNG (splitmix64), so that a resumed run sees the same order as an
/// uninterrupted one.
pub use peft_core::train::SplitMix;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_and_custom_columns() {
        let body = "id,tweet,class\n1,\"hello, \"\"world\"\"\",no complaint\n2,bad,complaint\n";
        let rows = read_csv(body, "tweet", "class").unwrap();
        assert_eq!(rows[0].text, "hello, \"world\"");
        assert_eq!(rows[1].label, "complaint");
        assert!(
            read_csv(body, "text", "class")
                .unwrap_err()
                .to_string()
                .contains("no column `text`")
        );
    }

    #[test]
    fn permutation_is_deterministic_and_complete() {
        let a = SplitMix(7).permutation(50);
        assert_eq!(a, SplitMix(7).permutation(50));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(a, SplitMix(8).permutation(50));
    }
}
