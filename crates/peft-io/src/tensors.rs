//! Reading named float tensors from safetensors files (memory-mapped) and PyTorch `.bin`
//! checkpoints (parsed without executing pickle code).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::error::{IoError, Result, io_err};

/// A tensor's shape and its values converted to f32.
pub type F32Tensor = (Vec<usize>, Vec<f32>);

/// A burn float tensor's shape and values, as f32 (what the writers here take).
pub fn to_f32<B: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> F32Tensor {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor");
    (shape, values)
}

/// A safetensors file, memory-mapped; the header is validated once when opened.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    /// Maps and validates `path` (header length, JSON, dtypes, offsets within the file and
    /// not overlapping).
    pub fn open(path: &Path) -> Result<Self> {
        let (file, _) = crate::files::open_regular(path)?;
        // SAFETY: the map is read-only; a file changed underneath us can only give wrong
        // values, which the header validation below bounds.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| IoError::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            header_len,
            metadata,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.metadata.tensors().into_keys().collect();
        v.sort();
        v
    }

    /// The user metadata (`__metadata__`).
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Shape and dtype of `name`.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, Dtype)> {
        self.metadata.info(name).map(|i| (i.shape.clone(), i.dtype))
    }

    /// The tensor `name` as f32 (F32, F16 and BF16 are accepted).
    pub fn get_f32(&self, name: &str) -> Result<Option<F32Tensor>> {
        let Some(info) = self.metadata.info(name) else {
            return Ok(None);
        };
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        let bytes = &self.mmap[start..end];
        let values = bytes_to_f32(bytes, info.dtype).ok_or_else(|| IoError::Dtype {
            path: self.path.clone(),
            key: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Ok(Some((info.shape.clone(), values)))
    }
}

fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

/// A source of named tensors: one or more safetensors files (sharded checkpoints) or a PyTorch
/// checkpoint.
pub enum TensorSource {
    /// Safetensors shards, with the shard index of each name.
    Safetensors {
        /// The shards.
        files: Vec<SafetensorsFile>,
        /// Which shard holds each tensor.
        index: HashMap<String, usize>,
    },
    /// A PyTorch zip checkpoint, read by burn-store's pickle parser (tensors only; no code is
    /// executed).
    Pytorch {
        /// The file.
        path: PathBuf,
        /// The tensors, loaded lazily by burn-store.
        tensors: HashMap<String, burn_store::TensorSnapshot>,
    },
}

impl TensorSource {
    /// One safetensors file.
    pub fn safetensors(path: &Path) -> Result<Self> {
        Self::shards(vec![SafetensorsFile::open(path)?])
    }

    fn shards(files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                index.insert(n, i);
            }
        }
        Ok(TensorSource::Safetensors { files, index })
    }

    /// A sharded checkpoint from its `model.safetensors.index.json`.
    pub fn sharded(index_path: &Path) -> Result<Self> {
        let text = crate::files::read_json_text(index_path)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| IoError::Json {
                path: index_path.to_path_buf(),
                source,
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| IoError::Safetensors {
                path: index_path.to_path_buf(),
                reason: "index has no `weight_map` object".into(),
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::new();
        for s in &shard_names {
            if s.contains('/') || s.contains("..") {
                return Err(IoError::Safetensors {
                    path: index_path.to_path_buf(),
                    reason: format!("shard name {s:?} points outside the model directory"),
                });
            }
            files.push(SafetensorsFile::open(&dir.join(s))?);
        }
        Self::shards(files)
    }

    /// A PyTorch `.bin` checkpoint, after [`crate::pickle::check_torch_zip`] has refused any
    /// pickle that does more than build tensors.
    pub fn pytorch(path: &Path) -> Result<Self> {
        crate::pickle::check_torch_zip(path)?;
        let reader =
            burn_store::pytorch::PytorchReader::new(path).map_err(|e| IoError::Pickle {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(TensorSource::Pytorch {
            path: path.to_path_buf(),
            tensors: reader.into_tensors(),
        })
    }

    /// The file reported in errors (the first shard for sharded checkpoints).
    pub fn path(&self) -> PathBuf {
        match self {
            TensorSource::Safetensors { files, .. } => files
                .first()
                .map(|f| f.path().to_path_buf())
                .unwrap_or_default(),
            TensorSource::Pytorch { path, .. } => path.clone(),
        }
    }

    /// Every tensor name.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match self {
            TensorSource::Safetensors { index, .. } => index.keys().cloned().collect(),
            TensorSource::Pytorch { tensors, .. } => tensors.keys().cloned().collect(),
        };
        v.sort();
        v
    }

    /// The tensor `name` as f32, if present.
    pub fn get_f32(&self, name: &str) -> Result<Option<F32Tensor>> {
        match self {
            TensorSource::Safetensors { files, index } => match index.get(name) {
                Some(i) => files[*i].get_f32(name),
                None => Ok(None),
            },
            TensorSource::Pytorch { path, tensors } => {
                let Some(snap) = tensors.get(name) else {
                    return Ok(None);
                };
                // burn-store reads max(1, elements) values, which no zero-element shape
                // accepts (it panics, then reports the panic).
                if snap.shape.iter().product::<usize>() == 0 {
                    return Ok(Some((snap.shape.to_vec(), Vec::new())));
                }
                let data = snap.to_data().map_err(|e| IoError::Pickle {
                    path: path.clone(),
                    reason: format!("tensor `{name}`: {e:?}"),
                })?;
                let shape = data.shape.to_vec();
                let values = data
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| IoError::Dtype {
                        path: path.clone(),
                        key: name.to_string(),
                        dtype: format!("{e:?}"),
                    })?;
                Ok(Some((shape, values)))
            }
        }
    }
}

/// Writes f32 tensors as a safetensors file, atomically (temporary file, then rename): a crash
/// never leaves a half-written file under `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, F32Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (shape, values))| {
            (
                k,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (k, shape, b) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, (*shape).clone(), b).map_err(|e| {
                IoError::Safetensors {
                    path: path.to_path_buf(),
                    reason: format!("tensor `{k}`: {e}"),
                }
            })?;
        views.push(((*k).clone(), view));
    }
    let data = safetensors::serialize(views, Some(metadata)).map_err(|e| IoError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &data)
}

/// Writes `bytes` to a temporary file next to `path`, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    // A failed write (a full disk) leaves no temporary behind, and names the file the caller
    // asked for.
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        // On disk before the rename makes it visible (a power cut leaves the old file or the
        // new one, never an empty one).
        f.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        IoError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        IoError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    })
}
