//! The HTTP API (JSON over axum): the routes, their bodies and their errors.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{Limits, ServeConfig};
use crate::engine::{Engine, ModelKind, Output, Pooling, Request as Job, Task};
use crate::error::ServeError;

struct AppState {
    engine: Engine,
    api_key: Option<String>,
    adapter_dir: Option<PathBuf>,
    limits: Limits,
}

type Shared = State<Arc<AppState>>;
type Body = axum::body::Body;

/// How much of an oversized body is still read (and dropped) so that the client, which is
/// still sending, receives the 413 instead of a broken connection.
const DRAIN_LIMIT: usize = 64 << 20;

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {"code": self.status(), "type": self.kind(), "message": self.to_string()}});
        (status, axum::Json(body)).into_response()
    }
}

/// The router: `/v1/generate`, `/v1/classify`, `/v1/embed`, `/v1/adapters` (GET, POST),
/// `/v1/adapters/{name}` (DELETE), `/health`, `/metrics`.
pub fn router(engine: Engine, config: &ServeConfig) -> Router {
    let state = Arc::new(AppState {
        engine,
        api_key: config.api_key.clone(),
        adapter_dir: config.adapter_dir.clone(),
        limits: config.limits.clone(),
    });
    let v1 = Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/classify", post(classify))
        .route("/v1/embed", post(embed))
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ServeError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ServeError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting connections
/// and finishes the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn track(State(s): Shared, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let t0 = Instant::now();
    let res = next.run(req).await;
    s.engine
        .metrics()
        .request(&endpoint, res.status().as_u16(), t0.elapsed().as_secs_f64());
    res
}

async fn auth(State(s): Shared, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            let mut res = ServeError::Unauthorized.into_response();
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return res;
        }
    }
    next.run(req).await
}

/// Equal, in a time that depends on the given key's length only.
fn constant_time_eq(given: &[u8], key: &[u8]) -> bool {
    let mut diff = (given.len() != key.len()) as u8;
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ key.get(i % key.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// The body as JSON, refused (413) over `limit` bytes. An oversized body is read to its end
/// (up to [`DRAIN_LIMIT`]) before the answer, so the client gets the 413.
async fn body_json<T: serde::de::DeserializeOwned>(
    body: Body,
    limit: usize,
) -> Result<T, ServeError> {
    let mut body = body;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ServeError::BadRequest(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= limit {
            bytes.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ServeError::TooLarge(format!(
            "the request body is over the limit: {seen} bytes or more, at most {limit}"
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ServeError::BadRequest(format!("invalid request: {e}")))
}

fn inputs(v: Value, limits: &Limits) -> Result<Vec<String>, ServeError> {
    let list = match v {
        Value::String(s) => vec![s],
        Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(s),
                other => Err(ServeError::BadRequest(format!(
                    "inputs[{i}]: expected a string, found {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ServeError::BadRequest(format!(
                "inputs: expected a string or an array of strings, found {other}"
            )));
        }
    };
    if list.is_empty() {
        return Err(ServeError::BadRequest("inputs: no input given".into()));
    }
    if list.len() > limits.max_inputs {
        return Err(ServeError::TooLarge(format!(
            "{} inputs, more than the {} a request may have",
            list.len(),
            limits.max_inputs
        )));
    }
    if let Some((i, s)) = list
        .iter()
        .enumerate()
        .find(|(_, s)| s.chars().count() > limits.max_input_chars)
    {
        return Err(ServeError::TooLarge(format!(
            "inputs[{i}] has {} characters, more than the {} allowed",
            s.chars().count(),
            limits.max_input_chars
        )));
    }
    Ok(list)
}

fn ok_json(v: Value) -> Response {
    axum::Json(v).into_response()
}

fn answer(r: Result<Value, ServeError>) -> Response {
    match r {
        Ok(v) => ok_json(v),
        Err(e) => e.into_response(),
    }
}

fn need(kind: ModelKind, want: &[ModelKind], what: &str) -> Result<(), ServeError> {
    if want.contains(&kind) {
        Ok(())
    } else {
        Err(ServeError::BadRequest(format!(
            "{what} needs a {want:?} model; this server runs a {kind:?} model"
        )))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    inputs: Value,
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    num_beams: Option<usize>,
}

async fn generate(State(s): Shared, body: Body) -> Response {
    answer(
        async {
            need(s.engine.kind(), &[ModelKind::Seq2Seq], "/v1/generate")?;
            let b: GenerateBody = body_json(body, s.limits.max_body_bytes).await?;
            let max_new_tokens = b
                .max_new_tokens
                .unwrap_or(32.min(s.limits.max_new_tokens));
            let num_beams = b.num_beams.unwrap_or(1);
            if max_new_tokens == 0 || num_beams == 0 {
                return Err(ServeError::BadRequest(
                    "max_new_tokens and num_beams must be at least 1".into(),
                ));
            }
            if max_new_tokens > s.limits.max_new_tokens || num_beams > s.limits.max_beams {
                return Err(ServeError::TooLarge(format!(
                    "max_new_tokens {max_new_tokens} (at most {}), num_beams {num_beams} (at most {})",
                    s.limits.max_new_tokens, s.limits.max_beams
                )));
            }
            let job = Job {
                inputs: inputs(b.inputs, &s.limits)?,
                adapter: b.adapter,
                task: Task::Generate {
                    max_new_tokens,
                    num_beams,
                },
            };
            match s.engine.run(job).await? {
                Output::Texts(t) => Ok(json!({ "outputs": t })),
                _ => Err(ServeError::Internal("unexpected output".into())),
            }
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyBody {
    inputs: Value,
    #[serde(default)]
    adapter: Option<String>,
}

async fn classify(State(s): Shared, body: Body) -> Response {
    answer(
        async {
            need(
                s.engine.kind(),
                &[ModelKind::SequenceClassification],
                "/v1/classify",
            )?;
            let b: ClassifyBody = body_json(body, s.limits.max_body_bytes).await?;
            let job = Job {
                inputs: inputs(b.inputs, &s.limits)?,
                adapter: b.adapter,
                task: Task::Classify,
            };
            match s.engine.run(job).await? {
                Output::Labels(l) => Ok(json!({ "outputs": l })),
                _ => Err(ServeError::Internal("unexpected output".into())),
            }
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedBody {
    inputs: Value,
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    pooling: Pooling,
}

async fn embed(State(s): Shared, body: Body) -> Response {
    answer(
        async {
            let b: EmbedBody = body_json(body, s.limits.max_body_bytes).await?;
            let job = Job {
                inputs: inputs(b.inputs, &s.limits)?,
                adapter: b.adapter,
                task: Task::Embed { pooling: b.pooling },
            };
            match s.engine.run(job).await? {
                Output::Embeddings(e) => Ok(json!({ "outputs": e })),
                _ => Err(ServeError::Internal("unexpected output".into())),
            }
        }
        .await,
    )
}

async fn list_adapters(State(s): Shared) -> Response {
    answer(async { Ok(json!({ "adapters": s.engine.adapters().await? })) }.await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    name: String,
    path: String,
}

/// `path`, made absolute against `root` and with `.` and `..` resolved lexically.
fn lexical(root: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in root.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The adapter directory `path` names, if it is inside `root` (symlinks resolved).
fn inside(root: &Path, path: &str) -> Result<PathBuf, ServeError> {
    let root_c = root
        .canonicalize()
        .map_err(|e| ServeError::Internal(format!("--adapter-dir {}: {e}", root.display())))?;
    let outside = || {
        ServeError::Forbidden(format!(
            "{path:?} is outside the adapter directory {}",
            root.display()
        ))
    };
    match lexical(&root_c, Path::new(path)).canonicalize() {
        Ok(p) if p.starts_with(&root_c) => {
            // The files in it too: a symlink to a file elsewhere is refused.
            let entries = std::fs::read_dir(&p)
                .map_err(|e| ServeError::Unprocessable(format!("{path:?}: {e}")))?;
            for e in entries.flatten() {
                let f = e.path();
                let target = f.canonicalize().unwrap_or_else(|_| f.clone());
                if !target.starts_with(&root_c) {
                    return Err(ServeError::Forbidden(format!(
                        "{path:?}: {} links outside the adapter directory {}",
                        e.file_name().to_string_lossy(),
                        root.display()
                    )));
                }
            }
            Ok(p)
        }
        Ok(_) => Err(outside()),
        Err(_) if !lexical(&root_c, Path::new(path)).starts_with(&root_c) => Err(outside()),
        Err(e) => Err(ServeError::Unprocessable(format!("{path:?}: {e}"))),
    }
}

async fn load_adapter(State(s): Shared, body: Body) -> Response {
    answer(
        async {
            let b: LoadBody = body_json(body, s.limits.max_body_bytes).await?;
            let root = s.adapter_dir.as_ref().ok_or_else(|| {
                ServeError::Forbidden(
                    "loading adapters at run time is off: start the server with --adapter-dir"
                        .into(),
                )
            })?;
            let path = inside(root, &b.path)?;
            let info = s.engine.load_adapter(b.name, path).await?;
            Ok(json!({ "adapter": info }))
        }
        .await,
    )
}

async fn unload_adapter(
    State(s): Shared,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    answer(
        async {
            s.engine.unload_adapter(name.clone()).await?;
            Ok(json!({ "deleted": name }))
        }
        .await,
    )
}

async fn health(State(s): Shared) -> Response {
    if s.engine.alive().await {
        ok_json(json!({"status": "ok", "model": s.engine.kind()}))
    } else {
        ServeError::Unavailable.into_response()
    }
}

async fn metrics(State(s): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.engine.metrics().render(),
    )
        .into_response()
}
