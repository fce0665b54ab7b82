//! `tokenizer.json` through the `tokenizers` crate: ids identical to Hugging Face's fast
//! tokenizers (special tokens added by the file's post-processor, as HF does).

use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};

/// A Hugging Face fast tokenizer loaded from `tokenizer.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

/// A batch of token ids padded on the right, with its attention mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// `[batch, len]` ids.
    pub ids: Vec<Vec<u32>>,
    /// `[batch, len]`, 1 for real tokens, 0 for padding.
    pub mask: Vec<Vec<u32>>,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` (or the file itself when `path` is a file).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bytes =
            crate::files::read_limited(&file, crate::files::MAX_TOKENIZER_BYTES, "tokenizer.json")?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| IoError::Tokenizer {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self::configure(inner, file))
    }

    /// Padding and truncation stored in `tokenizer.json` (MiniLM pads to 128) are dropped: like
    /// transformers' fast tokenizers, each call decides them.
    fn configure(mut inner: tokenizers::Tokenizer, path: PathBuf) -> Self {
        inner.with_padding(None);
        let _ = inner.with_truncation(None);
        TextTokenizer { inner, path }
    }

    /// Wraps an in-memory tokenizer.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        Self::configure(inner, PathBuf::from("<memory>"))
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn err(&self, e: impl std::fmt::Display) -> IoError {
        IoError::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Token ids of `text`, special tokens included, optionally truncated to `max_len` (keeping
    /// the final special token, as HF's truncation does).
    pub fn encode(&self, text: &str, max_len: Option<usize>) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(m) = max_len
            && ids.len() > m
        {
            let specials: Vec<u32> = enc
                .get_special_tokens_mask()
                .iter()
                .zip(enc.get_ids())
                .rev()
                .take_while(|(s, _)| **s == 1)
                .map(|(_, id)| *id)
                .collect();
            let keep = m.saturating_sub(specials.len());
            ids.truncate(keep);
            ids.extend(specials.into_iter().rev());
            ids.truncate(m);
        }
        Ok(ids)
    }

    /// Encodes several texts, right-padded with `pad_id` to the longest.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        max_len: Option<usize>,
        pad_id: u32,
    ) -> Result<Batch> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t, max_len))
            .collect::<Result<Vec<_>>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len());
        let mut mask = Vec::with_capacity(rows.len());
        for r in rows {
            let n = r.len();
            let mut row = r;
            row.resize(len, pad_id);
            let mut m = vec![1u32; n];
            m.resize(len, 0);
            ids.push(row);
            mask.push(m);
        }
        Ok(Batch { ids, mask })
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// The id of a token (`<pad>`, `</s>`, `[CLS]`, ...).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
