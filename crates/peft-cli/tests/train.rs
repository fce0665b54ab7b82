//! The trainer end to end on the tiny mT5 of `tests/fixtures/t5` (made by transformers) with the
//! bundled complaint data: the loss falls, only adapter parameters change, the saved adapter
//! reloads to identical outputs, a resumed run ends where an uninterrupted one does, and the
//! saved files have exactly the keys, shapes and config fields PEFT writes for the same config
//! (compared with the adapter PEFT saved in `tests/fixtures/t5/mt5_lora`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::module::AutodiffModule;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use peft_cli::train::{TrainArgs, train_seq2seq as train};

type B = burn::backend::NdArray;
type AB = burn::backend::Autodiff<B>;

/// The backend RNG (dropout) is process-global: runs in this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: TrainArgs,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    let r = root();
    let model = r.join("tests/fixtures/t5/mt5").display().to_string();
    let data = r
        .join("examples/data/complaints/train.jsonl")
        .display()
        .to_string();
    let out = out.display().to_string();
    let mut v = vec![
        "x",
        "--model",
        &model,
        "--data",
        &data,
        "--output-dir",
        &out,
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "q,v,wo",
        "--batch-size",
        "8",
        "--quiet",
        "--show-examples",
        "0",
        "--max-source-length",
        "24",
    ];
    if !extra.contains(&"--learning-rate") {
        v.extend_from_slice(&["--learning-rate", "1e-2"]);
    }
    v.extend_from_slice(extra);
    Wrap::parse_from(v).args
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn st_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let vals = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, t.shape().to_vec(), vals)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest absolute difference of two tensors; infinite on NaN/Inf (never passes a tolerance).
fn max_diff<BK: burn::tensor::backend::Backend, const D: usize>(
    a: Tensor<BK, D>,
    b: Tensor<BK, D>,
) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let v = |t: Tensor<BK, D>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    peft_core::check::max_abs_diff(&v(a), &v(b))
}

#[test]
fn short_run_learns_keeps_base_and_reloads_identically() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("short");
    let a = args(&out, &["--max-steps", "12", "--lora-dropout", "0.0"]);
    let mut done = train::<AB>(&a, &Default::default()).unwrap();
    let s = &done.summary;
    assert_eq!(s.steps, 12);
    assert!(
        s.last_loss < s.first_loss,
        "loss fell: {} -> {}",
        s.first_loss,
        s.last_loss
    );

    // The base is bit-identical to the checkpoint transformers wrote.
    let trained = peft_io::hf_model::hf_state_dict(&mut done.model.base_model);
    let source = peft_io::open_weights(&root().join("tests/fixtures/t5/mt5")).unwrap();
    for (name, (shape, values)) in &trained {
        let (s2, v2) = source.get_f32(name).unwrap().unwrap();
        assert_eq!((shape, values), (&s2, &v2), "{name} changed");
    }

    // Reloading the saved adapter gives the trained model's outputs.
    let device = Default::default();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 13, 1], [1, 4]), &device);
    let dec = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 7], [1, 2]), &device);
    let trained_logits = done
        .model
        .base_model
        .valid()
        .forward(ids.clone(), None, dec.clone())
        .logits;
    let (base, _) = peft_io::load_t5::<B>(&root().join("tests/fixtures/t5/mt5"), &device).unwrap();
    let (reloaded, _) = peft_io::from_pretrained(base, &out, "default").unwrap();
    let reloaded_logits = reloaded.base_model.forward(ids, None, dec).logits;
    let d = max_diff(trained_logits, reloaded_logits);
    assert!(d <= 1e-6, "reloaded outputs differ by {d}");
    for f in [
        "metrics.jsonl",
        "loss.png",
        "tokenizer.json",
        "adapter_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn resumed_run_ends_where_an_uninterrupted_one_does() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let full = tmp("full");
    let a = args(
        &full,
        &[
            "--max-steps",
            "6",
            "--save-steps",
            "3",
            "--lora-dropout",
            "0.1",
            "--gradient-accumulation-steps",
            "2",
            "--warmup-steps",
            "2",
        ],
    );
    train::<AB>(&a, &Default::default()).unwrap();
    let resumed = tmp("resumed");
    let ckpt = full.join("checkpoint-3").display().to_string();
    let b = args(
        &resumed,
        &[
            "--max-steps",
            "6",
            "--lora-dropout",
            "0.1",
            "--gradient-accumulation-steps",
            "2",
            "--warmup-steps",
            "2",
            "--resume",
            &ckpt,
        ],
    );
    let done = train::<AB>(&b, &Default::default()).unwrap();
    assert_eq!(done.summary.steps, 6);
    let x = st_tensors(&full.join("adapter_model.safetensors"));
    let y = st_tensors(&resumed.join("adapter_model.safetensors"));
    assert_eq!(x.len(), y.len());
    let mut max = 0.0f32;
    for ((k1, s1, v1), (k2, s2, v2)) in x.iter().zip(&y) {
        assert_eq!((k1, s1), (k2, s2));
        let d = peft_core::check::max_abs_diff(v1, v2);
        if d > max {
            max = d;
        }
    }
    assert!(max <= 1e-6, "resumed adapter differs by {max}");
    // and the checkpoint is not the end point (training really continued)
    let c = st_tensors(&full.join("checkpoint-3/adapter_model.safetensors"));
    assert!(c.iter().zip(&x).any(|(a, b)| a.2 != b.2));
    std::fs::remove_dir_all(&full).ok();
    std::fs::remove_dir_all(&resumed).ok();
}

#[test]
fn saved_adapter_has_exactly_peft_keys_shapes_and_config() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("keys");
    let a = args(&out, &["--max-steps", "1"]);
    train::<AB>(&a, &Default::default()).unwrap();
    let ours = st_tensors(&out.join("adapter_model.safetensors"));
    let theirs = st_tensors(&root().join("tests/fixtures/t5/mt5_lora/adapter_model.safetensors"));
    let shapes = |v: &[(String, Vec<usize>, Vec<f32>)]| {
        v.iter()
            .map(|(k, s, _)| (k.clone(), s.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shapes(&ours),
        shapes(&theirs),
        "keys and shapes equal PEFT's for r=4 on q,v,wo"
    );
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let peft_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/t5/mt5_lora/adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    for k in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "inference_mode",
        "bias",
        "use_rslora",
        "init_lora_weights",
        "fan_in_fan_out",
    ] {
        if k == "init_lora_weights" {
            assert_eq!(cfg[k], true, "we train from PEFT's default init");
            continue;
        }
        assert_eq!(cfg[k], peft_cfg[k], "{k}");
    }
    let mut t: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
    let mut pt: Vec<String> = serde_json::from_value(peft_cfg["target_modules"].clone()).unwrap();
    t.sort();
    pt.sort();
    assert_eq!(t, pt);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn non_finite_loss_stops_with_a_clear_message() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A copy of the fixture model whose embeddings hold NaN: the first loss is NaN.
    let model = tmp("nan-model");
    std::fs::create_dir_all(&model).unwrap();
    let src = root().join("tests/fixtures/t5/mt5");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st_tensors(&src.join("model.safetensors"))
        .into_iter()
        .map(|(k, shape, mut v)| {
            if k == "shared.weight" {
                v.iter_mut().for_each(|x| *x = f32::NAN);
            }
            (k, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        model.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();

    let out = tmp("nan");
    let mut a = args(&out, &["--max-steps", "3"]);
    a.model = model.display().to_string();
    let err = match train::<AB>(&a, &Default::default()) {
        Ok(_) => panic!("NaN weights must stop training"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("loss became NaN at step 0") && err.contains("--learning-rate"),
        "{err}"
    );
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "nothing saved for a broken run"
    );
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&model).ok();
}

#[test]
fn seq_cls_on_real_minilm_learns_and_saves_peft_layout() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::minilm_dir();
    let out = tmp("cls");
    let mut a = args(
        &out,
        &[
            // Enough steps for the per-batch loss to be past the noise of the first few.
            "--max-steps",
            "16",
            "--task-type",
            "SEQ_CLS",
            "--learning-rate",
            "2e-3",
        ],
    );
    a.model = dir.display().to_string();
    a.lora.target_modules = None; // PEFT's default for bert: query, value
    let done = peft_cli::train::train_seq_cls::<AB>(&a, &Default::default()).unwrap();
    // One batch's loss is noisy: compare the mean of the first four steps with the last four.
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 16);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (early, late) = (mean(&losses[..4]), mean(&losses[12..]));
    eprintln!("SEQ_CLS loss: first four steps {early:.4}, last four {late:.4}");
    assert!(late < early, "{losses:?} {:?}", done.summary);
    let keys: Vec<String> = st_tensors(&out.join("adapter_model.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    let mut expected = vec![
        "base_model.model.classifier.bias".to_string(),
        "base_model.model.classifier.weight".to_string(),
    ];
    for i in 0..6 {
        for m in ["query", "value"] {
            for ab in ["lora_A", "lora_B"] {
                expected.push(format!(
                    "base_model.model.bert.encoder.layer.{i}.attention.self.{m}.{ab}.weight"
                ));
            }
        }
    }
    expected.sort();
    assert_eq!(keys, expected, "PEFT's SEQ_CLS key set");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn houlsby_and_ia3_train_save_in_their_formats_and_reload_identically() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (method, weights) in [
        ("houlsby", "adapter.safetensors"),
        ("ia3", "adapter_model.safetensors"),
    ] {
        let out = tmp(method);
        let a = args(
            &out,
            &[
                "--max-steps",
                "8",
                "--method",
                method,
                "--reduction-factor",
                "4",
            ],
        );
        let done = train::<AB>(&a, &Default::default()).unwrap();
        let s = &done.summary;
        assert!(
            s.last_loss < s.first_loss,
            "{method}: loss fell: {} -> {}",
            s.first_loss,
            s.last_loss
        );
        let saved = st_tensors(&out.join(weights));
        match method {
            "houlsby" => {
                // AdapterHub's keys, two sites per encoder block and per decoder block.
                assert!(
                    saved
                        .iter()
                        .all(|(k, _, _)| k.contains(".adapters.default.")),
                    "{:?}",
                    saved.iter().map(|t| &t.0).collect::<Vec<_>>()
                );
                let cfg = peft_io::adapterhub::read_config(&out).unwrap();
                assert!(cfg.config.mh_adapter && cfg.config.output_adapter);
                assert_eq!(cfg.model_type.as_deref(), Some("mt5"));
            }
            _ => assert!(saved.iter().all(|(k, _, _)| k.ends_with(".ia3_l"))),
        }
        let device = Default::default();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 13, 1], [1, 4]), &device);
        let dec = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 7], [1, 2]), &device);
        let trained = done
            .model
            .base_model
            .valid()
            .forward(ids.clone(), None, dec.clone())
            .logits;
        let (base, _) =
            peft_io::load_t5::<B>(&root().join("tests/fixtures/t5/mt5"), &device).unwrap();
        let base_logits = base.forward(ids.clone(), None, dec.clone()).logits;
        let (reloaded, _) = peft_io::from_pretrained(base, &out, "default").unwrap();
        let reloaded = reloaded.base_model.forward(ids, None, dec).logits;
        let d = max_diff(trained.clone(), reloaded);
        assert!(d <= 1e-6, "{method}: reloaded outputs differ by {d}");
        let moved = max_diff(trained, base_logits);
        assert!(
            moved > 1e-4,
            "{method}: the adapter changed the outputs ({moved})"
        );
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn p_tuning_resumes_where_an_uninterrupted_run_ends_and_text_init_is_written() {
    // The LSTM encoder (with dropout between its layers) is not in PEFT's files; it travels in
    // prompt_encoder.safetensors so that a resumed run continues it exactly.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let method = [
        "--method",
        "p_tuning",
        "--encoder-reparameterization-type",
        "LSTM",
        "--encoder-hidden-size",
        "8",
        "--encoder-dropout",
        "0.1",
        "--num-virtual-tokens",
        "4",
        "--max-steps",
        "6",
    ];
    let full = tmp("ptuning-full");
    let mut extra = method.to_vec();
    extra.extend(["--save-steps", "3"]);
    train::<AB>(&args(&full, &extra), &Default::default()).unwrap();
    let resumed = tmp("ptuning-resumed");
    let ckpt = full.join("checkpoint-3").display().to_string();
    let mut extra = method.to_vec();
    extra.extend(["--resume", &ckpt]);
    let done = train::<AB>(&args(&resumed, &extra), &Default::default()).unwrap();
    assert_eq!(done.summary.steps, 6);
    for file in ["adapter_model.safetensors", "prompt_encoder.safetensors"] {
        let x = st_tensors(&full.join(file));
        let y = st_tensors(&resumed.join(file));
        assert_eq!(x.len(), y.len(), "{file}");
        for ((k1, s1, v1), (k2, s2, v2)) in x.iter().zip(&y) {
            assert_eq!((k1, s1), (k2, s2));
            let d = peft_core::check::max_abs_diff(v1, v2);
            assert!(d <= 1e-6, "{file} {k1}: resumed differs by {d}");
        }
    }
    let x = st_tensors(&full.join("adapter_model.safetensors"));
    assert_eq!(x[0].0, "prompt_embeddings");
    assert_eq!(x[0].1, vec![8, 32], "2 x 4 virtual tokens of d_model 32");
    let c = st_tensors(&full.join("checkpoint-3/adapter_model.safetensors"));
    assert!(c[0].2 != x[0].2, "training continued after the checkpoint");

    // TEXT init: the config names the text and the tokenizer, as PEFT writes it.
    let text = tmp("prompt-text");
    let a = args(
        &text,
        &[
            "--method",
            "prompt_tuning",
            "--prompt-tuning-init",
            "TEXT",
            "--prompt-tuning-init-text",
            "Classify the complaint:",
            "--num-virtual-tokens",
            "6",
            "--max-steps",
            "2",
        ],
    );
    train::<AB>(&a, &Default::default()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(text.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "PROMPT_TUNING");
    assert_eq!(cfg["prompt_tuning_init"], "TEXT");
    assert_eq!(cfg["prompt_tuning_init_text"], "Classify the complaint:");
    assert!(cfg["tokenizer_name_or_path"].as_str().is_some());
    assert_eq!(cfg["num_transformer_submodules"], 2);
    for d in [full, resumed, text] {
        std::fs::remove_dir_all(&d).ok();
    }
}

#[test]
fn prefix_tuning_trains_seq_cls_on_real_minilm_and_saves_peft_layout() {
    // Prefix tuning with the projection on BERT (where PEFT runs it): the loss falls, the
    // adapter file is PEFT's (the projected prefix and the classifier copy), the projection
    // PEFT drops is kept aside, and the CLI's reload check runs on it.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmp("prefix");
    let mut a = args(
        &out,
        &[
            "--method",
            "prefix_tuning",
            "--prefix-projection",
            "--encoder-hidden-size",
            "32",
            "--num-virtual-tokens",
            "4",
            "--max-steps",
            "12",
            "--task-type",
            "SEQ_CLS",
            "--learning-rate",
            "5e-3",
        ],
    );
    a.model = common::minilm_dir().display().to_string();
    let done = peft_cli::train::train_seq_cls::<AB>(&a, &Default::default()).unwrap();
    assert!(
        done.summary.train_accuracy.is_finite(),
        "{:?}",
        done.summary
    );
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (early, late) = (mean(&losses[..4]), mean(&losses[8..]));
    eprintln!("prefix tuning SEQ_CLS loss: first four steps {early:.4}, last four {late:.4}");
    assert!(late < early, "{losses:?}");
    let tensors = st_tensors(&out.join("adapter_model.safetensors"));
    let keys: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        keys,
        [
            "base_model.classifier.bias",
            "base_model.classifier.weight",
            "prompt_embeddings"
        ]
    );
    // 4 virtual tokens x (6 layers x 2 x 384).
    assert_eq!(tensors[2].1, vec![4, 6 * 2 * 384]);
    assert!(out.join("prompt_encoder.safetensors").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "PREFIX_TUNING");
    assert_eq!(cfg["num_layers"], 6);
    assert_eq!(cfg["token_dim"], 384);
    std::fs::remove_dir_all(&out).ok();

    // The virtual tokens need BERT positions too: refused with the numbers, not a panic.
    let long = tmp("prefix-long");
    a.output_dir = long.clone();
    a.max_source_length = 510;
    let e = peft_cli::train::train_seq_cls::<AB>(&a, &Default::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("max_position_embeddings") && e.contains("510"),
        "{e}"
    );
    std::fs::remove_dir_all(&long).ok();
}
