//! `peft serve` as a user runs it: the real binary on an ephemeral loopback port, spoken to with
//! a real HTTP client (ureq). Answers equal `peft generate` and PEFT's own (the `cli.json`
//! fixture); concurrent requests for several adapters each get their own adapter's answer;
//! loading, replacing and dropping adapters during traffic loses no request; every error status
//! has its case; SIGTERM finishes the request in flight.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fx(rel: &str) -> String {
    root()
        .join("tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::start_with(Path::new(&fx("t5/mt5")), extra)
    }

    fn start_with(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args([
                "serve",
                "--model",
                &model.display().to_string(),
                "--port",
                "0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("the server did not start: {line:?} {err}")
            })
            .to_string();
        Server { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// `(status, body)` of a request; `body` may be JSON or not.
fn call(method: &str, url: &str, body: Option<&str>, headers: &[(&str, &str)]) -> (u16, Value) {
    let a = agent();
    let mut res = match (method, body) {
        ("GET", _) => {
            let mut r = a.get(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        ("DELETE", _) => {
            let mut r = a.delete(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        (_, b) => {
            let mut r = a.post(url).header("content-type", "application/json");
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.send(b.unwrap_or(""))
        }
    }
    .unwrap();
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{}{path}", s.url),
        Some(&body.to_string()),
        &[],
    )
}

fn generate(s: &Server, inputs: &[String], adapter: Option<&str>, beams: usize) -> Vec<String> {
    let (status, body) = post(
        s,
        "/v1/generate",
        json!({"inputs": inputs, "adapter": adapter, "max_new_tokens": 6, "num_beams": beams}),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["outputs"].clone()).unwrap()
}

fn cli_generate(adapter: Option<&str>, texts: &[String], beams: usize) -> Vec<String> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
    c.args([
        "generate",
        "--model",
        &fx("t5/mt5"),
        "--max-new-tokens",
        "6",
    ]);
    c.args(["--num-beams", &beams.to_string()]);
    if let Some(a) = adapter {
        c.args(["--adapter", a]);
    }
    let out = c.args(texts).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn texts() -> Vec<String> {
    let cli: Value =
        serde_json::from_str(&std::fs::read_to_string(fx("t5/cli.json")).unwrap()).unwrap();
    serde_json::from_value(cli["mt5_lora"]["texts"].clone()).unwrap()
}

#[test]
fn answers_equal_peft_generate_and_pythons_peft() {
    let s = Server::start(&[
        "--adapter",
        &format!("a={}", fx("t5/mt5_lora")),
        "--adapter",
        &format!("b={}", fx("mixed/mt5_lora_b")),
    ]);
    assert!(s.url.starts_with("http://127.0.0.1:"), "{}", s.url);
    let t = texts();
    let cli: Value =
        serde_json::from_str(&std::fs::read_to_string(fx("t5/cli.json")).unwrap()).unwrap();
    let want = |case: &str, key: &str| -> Vec<String> {
        serde_json::from_value(cli[case][key].clone()).unwrap()
    };
    // What Python PEFT/transformers decoded for the same texts.
    assert_eq!(generate(&s, &t, Some("a"), 1), want("mt5_lora", "decoded"));
    assert_eq!(
        generate(&s, &t, Some("a"), 2),
        want("mt5_lora", "decoded_beam2")
    );
    assert_eq!(generate(&s, &t, None, 1), want("mt5", "decoded"));
    // And what `peft generate` prints, for the other adapter too.
    assert_eq!(
        generate(&s, &t, Some("b"), 2),
        cli_generate(Some(&fx("mixed/mt5_lora_b")), &t, 2)
    );
    // Embeddings: one vector per input, d_model long.
    let (st, body) = post(
        &s,
        "/v1/embed",
        json!({"inputs": ["one", "two words"], "adapter": "b", "pooling": "cls"}),
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 2);
    assert_eq!(body["outputs"][0].as_array().unwrap().len(), 32);
    let (st, body) = call("GET", &format!("{}/health", s.url), None, &[]);
    assert_eq!((st, body["model"].as_str()), (200, Some("seq2seq")));
}

#[test]
fn concurrent_requests_for_several_adapters_each_get_their_own_answer() {
    let s = Arc::new(Server::start(&[
        "--adapter",
        &format!("a={}", fx("t5/mt5_lora")),
        "--adapter",
        &format!("b={}", fx("mixed/mt5_lora_b")),
        "--batch-wait-ms",
        "30",
        "--max-batch-size",
        "16",
    ]));
    let t = texts();
    let expected: Vec<(Option<&str>, Vec<String>)> = [Some("a"), Some("b"), None]
        .into_iter()
        .map(|a| (a, generate(&s, &t[..1], a, 1)))
        .collect();
    assert!(
        expected[0].1 != expected[1].1 || expected[0].1 != expected[2].1,
        "the adapters must answer differently for this test to mean anything"
    );
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let s = s.clone();
            let (a, want) = expected[i % 3].clone();
            let text = t[..1].to_vec();
            std::thread::spawn(move || {
                let a = a.map(str::to_string);
                for _ in 0..3 {
                    assert_eq!(generate(&s, &text, a.as_deref(), 1), want, "adapter {a:?}");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    // Requests were batched together (mixed): fewer batches than requests.
    let (_, metrics) = call("GET", &format!("{}/metrics", s.url), None, &[]);
    let m = metrics.as_str().unwrap();
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (batches, rows) = (value("peft_batch_size_count"), value("peft_batch_size_sum"));
    assert_eq!(rows, 75.0, "every request ran once: {m}");
    assert!(batches < rows, "no request was batched with another: {m}");
}

#[test]
fn loading_replacing_and_dropping_adapters_during_traffic_loses_no_request() {
    let dir = std::env::temp_dir().join(format!("peft-serve-adapters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, src) in [("a", "t5/mt5_lora"), ("b", "mixed/mt5_lora_b")] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(Path::new(&fx(src)).join(f), dir.join(name).join(f)).unwrap();
        }
    }
    // A broken adapter: its load fails with 422, and nothing else.
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::copy(
        Path::new(&fx("t5/mt5_lora")).join("adapter_config.json"),
        dir.join("broken/adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("broken/adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    // An adapter that trains base biases would change the base for every adapter: refused.
    std::fs::create_dir_all(dir.join("biased")).unwrap();
    let mut c: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&fx("t5/mt5_lora")).join("adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    // A directory inside whose weights link to a file outside: refused (403).
    std::fs::create_dir_all(dir.join("linked")).unwrap();
    std::fs::copy(
        Path::new(&fx("t5/mt5_lora")).join("adapter_config.json"),
        dir.join("linked/adapter_config.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        Path::new(&fx("t5/mt5_lora")).join("adapter_model.safetensors"),
        dir.join("linked/adapter_model.safetensors"),
    )
    .unwrap();
    c["bias"] = json!("all");
    std::fs::write(dir.join("biased/adapter_config.json"), c.to_string()).unwrap();
    std::fs::copy(
        Path::new(&fx("t5/mt5_lora")).join("adapter_model.safetensors"),
        dir.join("biased/adapter_model.safetensors"),
    )
    .unwrap();

    // A prompt-learning adapter: its virtual tokens would change the whole batch: refused.
    std::fs::create_dir_all(dir.join("prompt")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            Path::new(&fx("prompt/mt5_prompt_random")).join(f),
            dir.join("prompt").join(f),
        )
        .unwrap();
    }

    let s = Arc::new(Server::start(&[
        "--adapter",
        &format!("a={}", dir.join("a").display()),
        "--adapter-dir",
        &dir.display().to_string(),
        "--max-loaded",
        "2",
    ]));
    let t = texts();
    let want_a = generate(&s, &t[..1], Some("a"), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (s, stop, done, want, text) = (
                s.clone(),
                stop.clone(),
                done.clone(),
                want_a.clone(),
                t[..1].to_vec(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(generate(&s, &text, Some("a"), 1), want);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let adapters = format!("{}/v1/adapters", s.url);
    for round in 0..4 {
        // load b, replace a (same files: same answers), evict under --max-loaded 2, drop b
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "b", "path": "b"}));
        assert_eq!(st, 200, "round {round}: {body}");
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "a", "path": "a"}));
        assert_eq!(st, 200, "round {round}: {body}");
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "c", "path": "b"}));
        assert_eq!(st, 200, "round {round}: {body}");
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "x", "path": "broken"}));
        assert_eq!(st, 422, "round {round}: {body}");
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "y", "path": "biased"}));
        assert_eq!(st, 422, "round {round}: {body}");
        assert!(body.to_string().contains("base biases"), "{body}");
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "p", "path": "prompt"}));
        assert_eq!(st, 422, "round {round}: {body}");
        assert!(body.to_string().contains("PROMPT_TUNING"), "{body}");
        let (st, body) = post(&s, "/v1/adapters", json!({"name": "z", "path": "linked"}));
        assert_eq!(st, 403, "round {round}: {body}");
        assert!(body.to_string().contains("links outside"), "{body}");
        let (st, _) = call("DELETE", &format!("{adapters}/b"), None, &[]);
        assert_eq!(st, 200);
        let (st, _) = call("DELETE", &format!("{adapters}/c"), None, &[]);
        assert_eq!(st, 200);
    }
    stop.store(true, Ordering::Relaxed);
    for th in traffic {
        th.join().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 0);
    let (_, list) = call("GET", &adapters, None, &[]);
    let names: Vec<&str> = list["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a"], "{list}");
    let (_, metrics) = call("GET", &format!("{}/metrics", s.url), None, &[]);
    assert!(
        !metrics
            .as_str()
            .unwrap()
            .contains("peft_adapter_evictions_total 0\n"),
        "--max-loaded 2 with three adapters evicts"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_error_is_a_json_body_with_its_status() {
    let s = Server::start(&[
        "--adapter",
        &format!("a={}", fx("t5/mt5_lora")),
        "--adapter-dir",
        &fx("mixed"),
        "--api-key",
        "sesame",
        "--max-inputs",
        "4",
        "--max-new-tokens",
        "16",
    ]);
    let key = [("authorization", "Bearer sesame")];
    let u = |p: &str| format!("{}{p}", s.url);
    // (method, path, body, headers, status, a word of the message)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<String>,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": [\"x\"]}".into()),
            vec![],
            401,
            "API key",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": [\"x\"]}".into()),
            vec![("authorization", "Bearer nope")],
            401,
            "API key",
        ),
        (
            "GET",
            "/v1/adapters",
            None,
            vec![("x-api-key", "wrong")],
            401,
            "API key",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": [\"x\"".into()),
            key.to_vec(),
            400,
            "invalid request",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": [1]}".into()),
            key.to_vec(),
            400,
            "inputs[0]",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": \"x\", \"max_tokens\": 3}".into()),
            key.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": \"x\", \"num_beams\": \"two\"}".into()),
            key.to_vec(),
            400,
            "invalid type",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": []}".into()),
            key.to_vec(),
            400,
            "no input",
        ),
        (
            "POST",
            "/v1/classify",
            Some("{\"inputs\": \"x\"}".into()),
            key.to_vec(),
            400,
            "SequenceClassification",
        ),
        (
            "POST",
            "/v1/generate",
            Some("{\"inputs\": \"x\", \"adapter\": \"nope\"}".into()),
            key.to_vec(),
            404,
            "nope",
        ),
        (
            "DELETE",
            "/v1/adapters/nope",
            None,
            key.to_vec(),
            404,
            "nope",
        ),
        (
            "GET",
            "/v1/nothing",
            None,
            key.to_vec(),
            404,
            "no such route",
        ),
        (
            "GET",
            "/v1/generate",
            None,
            key.to_vec(),
            405,
            "method not allowed",
        ),
        (
            "POST",
            "/v1/adapters",
            Some(json!({"name": "x", "path": fx("t5/mt5_lora")}).to_string()),
            key.to_vec(),
            403,
            "outside",
        ),
        (
            "POST",
            "/v1/adapters",
            Some(json!({"name": "x", "path": "../t5/mt5_lora"}).to_string()),
            key.to_vec(),
            403,
            "outside",
        ),
        (
            "POST",
            "/v1/adapters",
            Some(json!({"name": "__base__", "path": "mt5_lora_b"}).to_string()),
            key.to_vec(),
            400,
            "adapter name",
        ),
        (
            "POST",
            "/v1/adapters",
            Some(json!({"name": "x", "path": "missing"}).to_string()),
            key.to_vec(),
            422,
            "missing",
        ),
        (
            "POST",
            "/v1/generate",
            Some(json!({"inputs": ["a", "b", "c", "d", "e"]}).to_string()),
            key.to_vec(),
            413,
            "5 inputs",
        ),
        (
            "POST",
            "/v1/generate",
            Some(json!({"inputs": "a", "max_new_tokens": 100000}).to_string()),
            key.to_vec(),
            413,
            "max_new_tokens",
        ),
        (
            "POST",
            "/v1/generate",
            Some(json!({"inputs": "a".repeat(30_000)}).to_string()),
            key.to_vec(),
            413,
            "characters",
        ),
        (
            "POST",
            "/v1/generate",
            Some(json!({"inputs": "a".repeat(5 << 20)}).to_string()),
            key.to_vec(),
            413,
            "limit",
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, body, headers, status, needle) in &cases {
        let (st, b) = call(method, &u(path), body.as_deref(), headers);
        let msg = b["error"]["message"].as_str().unwrap_or("");
        if st != *status || b["error"]["code"] != json!(status) || !msg.contains(needle) {
            failures.push(format!(
                "{method} {path}: {st} {b} (expected {status}, {needle:?})"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // None of that hurt the server: a good request with the key still works, /health needs none.
    let (st, body) = call(
        "POST",
        &u("/v1/generate"),
        Some(&json!({"inputs": "x", "adapter": "a", "max_new_tokens": 2}).to_string()),
        &key,
    );
    assert_eq!(st, 200, "{body}");
    // Without max_new_tokens, the default (32) is capped by --max-new-tokens 16, not refused.
    let (st, body) = call(
        "POST",
        &u("/v1/generate"),
        Some(&json!({"inputs": "x"}).to_string()),
        &key,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(call("GET", &u("/health"), None, &[]).0, 200);
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits() {
    let mut s = Server::start(&["--adapter", &format!("a={}", fx("t5/mt5_lora"))]);
    let url = s.url.clone();
    let inflight = std::thread::spawn(move || {
        let a = agent();
        let body =
            json!({"inputs": vec!["x"; 16], "adapter": "a", "max_new_tokens": 200, "num_beams": 4});
        let mut r = a
            .post(format!("{url}/v1/generate"))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    });
    std::thread::sleep(Duration::from_millis(300));
    let ok = Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (status, body) = inflight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let code = s.child.wait().unwrap();
    assert!(code.success(), "{code}");
    // The listener is closed.
    assert!(
        std::net::TcpStream::connect(s.url.trim_start_matches("http://")).is_err(),
        "still accepting connections"
    );
}

fn safetensors_f32(path: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

/// On real all-MiniLM-L6-v2: mean-pooled embeddings equal transformers' last hidden state
/// pooled the same way, and a SEQ_CLS adapter's labels and scores equal the softmax of
/// `peft forward`'s logits.
#[test]
fn embed_and_classify_on_real_minilm() {
    type B = burn::backend::NdArray;
    let dir = common::minilm_dir();
    // A SEQ_CLS LoRA adapter with its own head, made with the library and saved as PEFT does.
    let adapter = std::env::temp_dir().join(format!("peft-serve-cls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&adapter);
    let device = Default::default();
    let (model, _) = peft_io::load_bert_classifier::<B>(&dir, &device).unwrap();
    let mut config =
        peft_core::LoraConfig::new(4, 8.0, peft_core::TargetModules::list(["query", "value"]));
    config.header.task_type = Some(peft_core::TaskType::SeqCls);
    config.init_lora_weights = peft_core::InitLoraWeights::Random;
    let peft = peft_core::PeftModel::new(model, config, "default").unwrap();
    peft_io::save_pretrained(&peft, &adapter).unwrap();

    let s = Server::start_with(&dir, &["--adapter", &format!("cls={}", adapter.display())]);
    let sentences = [
        "This framework generates embeddings for each input sentence",
        "Sentences are passed as a list of string.",
        "The quick brown fox jumps over the lazy dog.",
    ];
    let (st, body) = post(&s, "/v1/embed", json!({"inputs": sentences}));
    assert_eq!(st, 200, "{body}");
    let expected = root().join("tests/fixtures/minilm/expected.safetensors");
    let (shape, h) = safetensors_f32(&expected, "last_hidden_state");
    let bytes = std::fs::read(&expected).unwrap();
    let st_file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mask: Vec<i64> = st_file
        .tensor("attention_mask")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (rows, len, d) = (shape[0], shape[1], shape[2]);
    let mut worst = 0.0f32;
    for r in 0..rows {
        let n: f32 = (0..len).map(|t| mask[r * len + t] as f32).sum();
        let got: Vec<f32> = serde_json::from_value(body["outputs"][r].clone()).unwrap();
        assert_eq!(got.len(), d);
        for k in 0..d {
            let want: f32 = (0..len)
                .map(|t| h[(r * len + t) * d + k] * mask[r * len + t] as f32)
                .sum::<f32>()
                / n;
            let diff = (got[k] - want).abs();
            assert!(diff.is_finite(), "row {r} dim {k}: {} vs {want}", got[k]);
            worst = worst.max(diff);
        }
    }
    assert!(
        worst <= 1e-4,
        "mean-pooled embeddings vs transformers: {worst}"
    );

    let (st, body) = post(
        &s,
        "/v1/classify",
        json!({"inputs": sentences, "adapter": "cls"}),
    );
    assert_eq!(st, 200, "{body}");
    let out =
        std::env::temp_dir().join(format!("peft-serve-cls-{}.safetensors", std::process::id()));
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
    c.args(["forward", "--model", &dir.display().to_string()]);
    c.args([
        "--adapter",
        &adapter.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    for t in sentences {
        c.args(["--text", t]);
    }
    assert!(c.output().unwrap().status.success());
    let (lshape, logits) = safetensors_f32(&out, "logits");
    let n = lshape[1];
    for r in 0..rows {
        let row = &logits[r * n..(r + 1) * n];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
        for item in body["outputs"][r].as_array().unwrap() {
            let label = item["label"].as_str().unwrap();
            let i: usize = label.trim_start_matches("LABEL_").parse().unwrap();
            let want = (row[i] - m).exp() / z;
            let got = item["score"].as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() <= 1e-5,
                "row {r} {label}: {got} vs {want}"
            );
        }
    }
    std::fs::remove_dir_all(&adapter).ok();
    std::fs::remove_file(&out).ok();
}

/// Continuous batching: a short greedy request that arrives while a long one is generating
/// joins the running batch, is answered as soon as its own rows are done (long before the long
/// one), and its answer is the one it gets alone.
#[test]
fn a_short_request_joins_a_running_generation_and_leaves_it_first() {
    let s = Arc::new(Server::start(&[
        "--adapter",
        &format!("a={}", fx("t5/mt5_lora")),
        "--adapter",
        &format!("b={}", fx("mixed/mt5_lora_b")),
        "--batch-wait-ms",
        "0",
        "--max-batch-size",
        "32",
    ]));
    let t = texts();
    let short = |s: &Server| {
        let (st, body) = post(
            s,
            "/v1/generate",
            json!({"inputs": ["x"], "adapter": "b", "max_new_tokens": 3}),
        );
        assert_eq!(st, 200, "{body}");
        body["outputs"].clone()
    };
    let alone = short(&s);
    let long_body = json!({"inputs": vec![t[2].clone(); 8], "adapter": "a", "max_new_tokens": 250});
    let t_alone = std::time::Instant::now();
    let alone_long = post(&s, "/v1/generate", long_body.clone()).1["outputs"].clone();
    // The short request is sent a tenth of the way into the long one, whatever this
    // machine's speed.
    let delay = t_alone.elapsed() / 10;
    let t0 = std::time::Instant::now();
    let long = {
        let s = s.clone();
        let body = long_body.clone();
        std::thread::spawn(move || {
            let r = post(&s, "/v1/generate", body);
            (r, t0.elapsed())
        })
    };
    std::thread::sleep(delay);
    let got = short(&s);
    let short_done = t0.elapsed();
    let ((st, body), long_done) = long.join().unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(got, alone, "the short request's answer changed by joining");
    assert_eq!(
        body["outputs"], alone_long,
        "the long request's answer changed"
    );
    assert!(
        short_done < long_done,
        "the short request ({short_done:?}) waited for the long one ({long_done:?})"
    );
}
