//! Training data and collators: JSONL or CSV rows with a text and a label column, prompt
//! templates, and [`DataCollatorForSeq2Seq`] (transformers' semantics: labels padded with
//! -100, decoder inputs the labels shifted right behind the decoder start token).

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_io::TextTokenizer;

use crate::error::{Result, TrainError, file_err};

/// One example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The input text (before any prompt template).
    pub text: String,
    /// The target label.
    pub label: String,
}

impl Example {
    /// An example from a text and a label.
    pub fn new(text: impl Into<String>, label: impl Into<String>) -> Self {
        Example {
            text: text.into(),
            label: label.into(),
        }
    }
}

/// The largest data file read into memory (1 GiB).
const MAX_DATA_BYTES: u64 = 1 << 30;

/// Reads `path` as CSV (`.csv`) or JSONL (anything else), taking the `text_col` and
/// `label_col` fields. Strings are taken as they are, numbers and booleans as their JSON text;
/// arrays, objects and nulls are refused, naming the line and the field.
pub fn read_examples(path: &Path, text_col: &str, label_col: &str) -> Result<Vec<Example>> {
    let body = read_data_file(path)?;
    parse_examples(path, &body, text_col, label_col)
}

/// [`read_examples`] on a file's text already in memory: CSV when `path` ends in `.csv`, JSONL
/// otherwise (`path` is only named in errors).
pub fn parse_examples(
    path: &Path,
    body: &str,
    text_col: &str,
    label_col: &str,
) -> Result<Vec<Example>> {
    let data_err = |line: usize, message: String| TrainError::Data {
        path: path.to_path_buf(),
        line,
        message,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let rows = if ext.eq_ignore_ascii_case("csv") {
        read_csv(body, text_col, label_col).map_err(|(line, m)| data_err(line, m))?
    } else {
        let mut rows = Vec::new();
        for (i, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| data_err(i + 1, format!("invalid JSON: {e}")))?;
            let get = |c: &str| -> Result<String> {
                match v.get(c) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(n @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        Ok(n.to_string())
                    }
                    Some(other) if !other.is_null() => Err(data_err(
                        i + 1,
                        format!("field `{c}`: expected a string, found {}", json_kind(other)),
                    )),
                    _ => Err(data_err(i + 1, format!("no `{c}` field"))),
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
        return Err(data_err(0, "no examples".into()));
    }
    Ok(rows)
}

/// Reads a data file: a regular file (not a FIFO or a device, which could block or never end;
/// checked before it is opened), at most [`MAX_DATA_BYTES`], UTF-8.
fn read_data_file(path: &Path) -> Result<String> {
    let bytes = peft_io::files::read_limited(path, MAX_DATA_BYTES, "a data file")?;
    String::from_utf8(bytes).map_err(|e| TrainError::Data {
        path: path.to_path_buf(),
        line: 0,
        message: format!("not UTF-8 text ({})", e.utf8_error()),
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
    }
}

/// Minimal RFC 4180 CSV: quoted fields with `""` escapes, a header row. Errors carry the
/// 1-based row.
fn read_csv(
    body: &str,
    text_col: &str,
    label_col: &str,
) -> std::result::Result<Vec<Example>, (usize, String)> {
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut field = String::new();
    let mut record = Vec::new();
    let mut quoted = false;
    let mut quote_line = 0;
    let mut line = 1;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', q) => {
                quoted = !q;
                quote_line = line;
            }
            (',', false) => record.push(std::mem::take(&mut field)),
            ('\n', false) => {
                line += 1;
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            ('\r', false) => {}
            (c, _) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c)
            }
        }
    }
    if quoted {
        return Err((quote_line, "unterminated quoted field".into()));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    let header = records.first().ok_or((0, "empty CSV".to_string()))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or((1, format!("no column `{name}` in header {header:?}")))
    };
    let (t, l) = (col(text_col)?, col(label_col)?);
    records[1..]
        .iter()
        .enumerate()
        .filter(|(_, r)| !(r.len() == 1 && r[0].is_empty()))
        .map(|(i, r)| {
            let get = |c: usize| {
                r.get(c).cloned().ok_or((
                    i + 2,
                    format!("{} fields, the header has {}", r.len(), header.len()),
                ))
            };
            Ok(Example {
                text: get(t)?,
                label: get(l)?,
            })
        })
        .collect()
}

/// `Tweet text: {text} Label:` style templates; `{text}` is replaced by the example's text.
pub fn apply_template(template: &str, text: &str) -> String {
    template.replace("{text}", text)
}

/// A seq2seq batch as tensors (`[batch, len]`, right-padded).
#[derive(Clone, Debug)]
pub struct Seq2SeqBatch<B: Backend> {
    /// Source ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// Source mask (1 = token).
    pub attention_mask: Tensor<B, 2, Int>,
    /// Decoder inputs: the start token, then the labels shifted right (pad after the end).
    pub decoder_input_ids: Tensor<B, 2, Int>,
    /// Targets, -100 where padded (ignored by the loss).
    pub labels: Tensor<B, 2, Int>,
    /// Real (non-pad) tokens in sources and targets, for throughput.
    pub tokens: usize,
}

/// transformers' `DataCollatorForSeq2Seq` (with `label_pad_token_id = -100`): tokenizes the
/// prompt (`prompt_template` applied to each text) and the label, truncates to the maximum
/// lengths (keeping the final `</s>`), pads, and shifts the labels right into decoder inputs.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use burn::backend::NdArray;
/// use peft_train::{DataCollatorForSeq2Seq, Example};
/// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5/mt5");
/// let tok = peft_io::TextTokenizer::from_path(&dir.join("tokenizer.json"))?;
/// let collator = DataCollatorForSeq2Seq::new(&tok, 0, 0).with_max_lengths(32, 4);
/// let ex = [Example::new("the bus is late again", "complaint")];
/// let batch = collator.collate::<NdArray>(&ex.iter().collect::<Vec<_>>(), &Default::default())?;
/// let [rows, _] = batch.labels.dims();
/// assert_eq!(rows, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DataCollatorForSeq2Seq<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The prompt; `{text}` is replaced by the example's text.
    pub prompt_template: String,
    /// Source tokens kept.
    pub max_source_length: usize,
    /// Target tokens kept.
    pub max_target_length: usize,
    /// The pad id.
    pub pad_token_id: u32,
    /// The decoder start id (T5: the pad id).
    pub decoder_start_token_id: u32,
    /// The model's vocabulary size: ids at or above it are refused (an embedding has no row for
    /// them) instead of reaching the model.
    pub vocab_size: Option<usize>,
}

impl<'a> DataCollatorForSeq2Seq<'a> {
    /// A collator with the prompt `{text}`, 128 source and 8 target tokens.
    pub fn new(
        tokenizer: &'a TextTokenizer,
        pad_token_id: u32,
        decoder_start_token_id: u32,
    ) -> Self {
        DataCollatorForSeq2Seq {
            tokenizer,
            prompt_template: "{text}".into(),
            max_source_length: 128,
            max_target_length: 8,
            pad_token_id,
            decoder_start_token_id,
            vocab_size: None,
        }
    }

    /// Refuses token ids at or above `vocab_size`.
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        self.vocab_size = Some(vocab_size);
        self
    }

    /// Refuses an id the model's embedding has no row for.
    pub fn check_ids<'i>(&self, ids: impl IntoIterator<Item = &'i u32>) -> Result<()> {
        if let Some(v) = self.vocab_size
            && let Some(bad) = ids.into_iter().find(|id| **id as usize >= v)
        {
            return Err(TrainError::InvalidArgument {
                name: "tokenizer",
                message: format!(
                    "token id {bad} is out of range for the model's vocab_size {v} (a tokenizer \
                     for another model?)"
                ),
            });
        }
        Ok(())
    }

    /// Sets the prompt template.
    pub fn with_prompt_template(mut self, template: impl Into<String>) -> Self {
        self.prompt_template = template.into();
        self
    }

    /// Sets the source and target lengths.
    pub fn with_max_lengths(mut self, source: usize, target: usize) -> Self {
        self.max_source_length = source;
        self.max_target_length = target;
        self
    }

    /// The prompt for one example.
    pub fn prompt(&self, e: &Example) -> String {
        apply_template(&self.prompt_template, &e.text)
    }

    /// The label tokens [`collate`](Self::collate) would count in the loss for `examples`,
    /// without building tensors.
    pub fn count_targets(&self, examples: &[&Example]) -> Result<usize> {
        let mut n = 0;
        for e in examples {
            n += self
                .tokenizer
                .encode(&e.label, Some(self.max_target_length))?
                .len();
        }
        Ok(n)
    }

    /// Builds one batch. Lengths of 0 are refused (nothing would be left to learn from).
    pub fn collate<B: Backend>(
        &self,
        examples: &[&Example],
        device: &B::Device,
    ) -> Result<Seq2SeqBatch<B>> {
        for (name, v) in [
            ("max_source_length", self.max_source_length),
            ("max_target_length", self.max_target_length),
        ] {
            if v == 0 {
                return Err(TrainError::InvalidArgument {
                    name,
                    message: "expected at least 1, found 0".into(),
                });
            }
        }
        let prompts: Vec<String> = examples.iter().map(|e| self.prompt(e)).collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let src =
            self.tokenizer
                .encode_batch(&refs, Some(self.max_source_length), self.pad_token_id)?;
        let targets = examples
            .iter()
            .map(|e| {
                self.tokenizer
                    .encode(&e.label, Some(self.max_target_length))
            })
            .collect::<peft_io::Result<Vec<_>>>()?;
        self.check_ids(src.ids.iter().flatten().chain(targets.iter().flatten()))?;
        let t_len = targets.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut labels = Vec::new();
        let mut dec = Vec::new();
        let mut tokens: usize = src.mask.iter().flatten().map(|m| *m as usize).sum();
        for t in &targets {
            tokens += t.len();
            let mut l: Vec<i64> = t.iter().map(|v| *v as i64).collect();
            l.resize(t_len, -100);
            let mut d = vec![self.decoder_start_token_id as i64];
            d.extend(l[..t_len - 1].iter().map(
                |v| {
                    if *v < 0 { self.pad_token_id as i64 } else { *v }
                },
            ));
            labels.push(l);
            dec.push(d);
        }
        Ok(Seq2SeqBatch {
            input_ids: ids_tensor(&src.ids, device),
            attention_mask: ids_tensor(&src.mask, device),
            decoder_input_ids: int_tensor(&dec, device),
            labels: int_tensor(&labels, device),
            tokens,
        })
    }
}

/// `[rows, len]` ids as an Int tensor.
pub fn ids_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let rows: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|v| *v as i64).collect())
        .collect();
    int_tensor(&rows, device)
}

/// `[rows, len]` values as an Int tensor (rows have equal lengths).
pub fn int_tensor<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

/// Reads a whole small file we own (metrics, the `latest` pointer).
pub(crate) fn read_small(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(file_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_and_custom_columns() {
        let body = "id,tweet,class\n1,\"hello, \"\"world\"\"\",no complaint\n2,bad,complaint\n";
        let rows = read_csv(body, "tweet", "class").unwrap();
        assert_eq!(rows[0].text, "hello, \"world\"");
        assert_eq!(rows[1].label, "complaint");
        let (line, msg) = read_csv(body, "text", "class").unwrap_err();
        assert_eq!(line, 1);
        assert!(msg.contains("no column `text`"), "{msg}");
    }

    #[test]
    fn csv_unterminated_quote_and_short_rows_are_named() {
        let (line, msg) = read_csv("text,label\n\"open,x\nmore\n", "text", "label").unwrap_err();
        assert_eq!((line, msg.as_str()), (2, "unterminated quoted field"));
        let (line, msg) = read_csv("text,label\nonly\n", "text", "label").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("1 fields, the header has 2"), "{msg}");
    }

    #[test]
    fn jsonl_refuses_arrays_and_objects() {
        let dir = std::env::temp_dir().join(format!("peft-train-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(&p, "{\"text\": [\"a\"], \"label\": \"x\"}\n").unwrap();
        let e = read_examples(&p, "text", "label").unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl:1: field `text`: expected a string, found an array"),
            "{e}"
        );
        std::fs::write(&p, "{\"text\": \"a\", \"label\": {\"k\": 1}}\n").unwrap();
        let e = read_examples(&p, "text", "label").unwrap_err().to_string();
        assert!(e.contains("found an object"), "{e}");
        std::fs::write(&p, "{\"text\": \"a\", \"label\": 1}\n").unwrap();
        assert_eq!(read_examples(&p, "text", "label").unwrap()[0].label, "1");
        std::fs::remove_dir_all(&dir).ok();
    }
}
