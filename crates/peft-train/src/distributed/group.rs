//! [`WorkerGroup`]: data-parallel workers, one process each, on Burn's communication layer.
//!
//! - **Gradients** travel through Burn's peer-to-peer tensor transport, the one
//!   `burn-collective` itself uses between nodes: `burn-communication`'s `TensorDataService`
//!   over its WebSocket server. Every worker serves its tensors on a port of its own; the
//!   all-reduce is a ring (reduce-scatter, then all-gather: each worker sends and receives
//!   `2 (W - 1) / W` of the vector), so every worker ends with bit-identical sums.
//! - **Why not `burn-collective`'s global all-reduce**: in 0.21 it completes once per process.
//!   Its `SyncService::sync` (global/node/sync.rs) clears a *copy* of the list of peers that
//!   have synced, so the second all-reduce waits forever for a list that never matches (seen
//!   here: two workers hang in the second reduce). Its transfers also `expect` success, so a
//!   lost peer panics a task and leaves the caller waiting.
//! - **Rendezvous and liveness** are ours, on the coordinator port: every rank connects to rank
//!   0, says who it is and where its tensors are served, and waits until all have joined; then
//!   both sides exchange a heartbeat every second. A closed connection or a silent one (30 s)
//!   is a lost worker; rank 0 relays a loss or a failure to everyone. An all-reduce runs on the
//!   group's runtime while the caller watches the monitor and returns
//!   [`TrainError::WorkerLost`] naming the rank.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::tensor::TensorData;
use burn_communication::data_service::{TensorDataServer, TensorDataService, TensorTransferId};
use burn_communication::websocket::{WebSocket, WsServer};
use burn_communication::{Address, ProtocolServer};
use tokio_util::sync::CancellationToken;

use super::Collective;
use crate::error::{Result, TrainError};

/// The backend of the tensor data service (host memory: the vector is on the host already,
/// whatever device trains).
type R = NdArray<f32>;
type Service = TensorDataService<R, WebSocket>;

const HEARTBEAT: Duration = Duration::from_secs(1);
const SILENCE: Duration = Duration::from_secs(30);

/// Where a worker finds the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldConfig {
    /// Workers in all.
    pub world_size: usize,
    /// This worker, `0..world_size`.
    pub rank: usize,
    /// `HOST:PORT` of rank 0's rendezvous. Every rank gives the same value.
    pub coordinator: String,
    /// The address the other workers reach this one at (default: the local address of the route
    /// to the coordinator).
    pub node_host: Option<String>,
    /// How long to wait for the others to join, and inside one all-reduce.
    pub timeout: Duration,
}

impl WorldConfig {
    /// Rank `rank` of `world_size` workers meeting at `coordinator` (`HOST:PORT`).
    pub fn new(world_size: usize, rank: usize, coordinator: impl Into<String>) -> Self {
        WorldConfig {
            world_size,
            rank,
            coordinator: coordinator.into(),
            node_host: None,
            timeout: super::DEFAULT_TIMEOUT,
        }
    }

    /// Sets the wait limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the address other workers reach this one at.
    pub fn with_node_host(mut self, host: impl Into<String>) -> Self {
        self.node_host = Some(host.into());
        self
    }
}

fn invalid(message: impl Into<String>) -> TrainError {
    TrainError::InvalidArgument {
        name: "world",
        message: message.into(),
    }
}

/// What the monitor knows.
#[derive(Default)]
struct Status {
    /// A worker was lost or failed: its rank and why.
    lost: Option<(usize, String)>,
    /// This worker said goodbye (or was told rank 0 finished): losses no longer count.
    closed: bool,
}

type Shared = Arc<Mutex<Status>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Status> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection of the monitor, written from several threads.
#[derive(Clone)]
struct Line(Arc<Mutex<TcpStream>>);

impl Line {
    fn send(&self, msg: &str) -> bool {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(format!("{msg}\n").as_bytes()).is_ok()
    }
}

/// One line from a monitor connection; `Err` on a closed, broken or silent connection.
fn read_line(r: &mut BufReader<TcpStream>) -> std::result::Result<String, String> {
    let mut s = String::new();
    match r.read_line(&mut s) {
        Ok(0) => Err("closed its connection (the process ended)".into()),
        Ok(_) => Ok(s.trim_end().to_string()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!("sent nothing for {} s", SILENCE.as_secs()))
        }
        Err(e) => Err(format!("connection failed: {e}")),
    }
}

/// Sends a heartbeat on `lines` every second until the status is closed or lost.
fn heartbeat(status: Shared, lines: Vec<Line>) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(HEARTBEAT);
            {
                let s = lock(&status);
                if s.closed || s.lost.is_some() {
                    return;
                }
            }
            for l in &lines {
                l.send("PING");
            }
        }
    });
}

/// Data-parallel workers in separate processes (one per device, on one machine or several).
/// Implements [`Collective`] for [`Trainer::with_collective`](crate::Trainer::with_collective).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use peft_train::distributed::{Collective, WorkerGroup, WorldConfig};
/// // With WORLD=2 and RANK=0 / RANK=1 in two processes, each gets [3.0]; alone, [1.0].
/// let world = std::env::var("WORLD").map_or(Ok(1), |w| w.parse())?;
/// let rank: usize = std::env::var("RANK").map_or(Ok(0), |r| r.parse())?;
/// let coordinator = if world == 1 { "127.0.0.1:0" } else { "127.0.0.1:29500" };
/// let mut group = WorkerGroup::join(&WorldConfig::new(world, rank, coordinator))?;
/// let sum = group.all_reduce_sum(vec![rank as f32 + 1.0])?;
/// assert_eq!(sum, vec![(1..=world).sum::<usize>() as f32]);
/// group.finish();
/// # Ok(()) }
/// ```
pub struct WorkerGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    status: Shared,
    /// Rank 0: one line per other rank (index = rank); others: the line to rank 0.
    lines: Vec<Option<Line>>,
    runtime: tokio::runtime::Runtime,
    service: Arc<Service>,
    /// Where every rank serves its tensors (index = rank).
    peers: Vec<Address>,
    /// All-reduces done: transfer ids are unique per reduce.
    seq: u64,
    stop: CancellationToken,
    done: bool,
}

impl WorkerGroup {
    /// Joins the group: rank 0 starts the coordinator, every rank waits (up to the timeout) for
    /// all `world_size` to arrive, then registers with Burn's collective layer.
    pub fn join(config: &WorldConfig) -> Result<Self> {
        let (world, rank) = (config.world_size, config.rank);
        if world == 0 || world > 256 {
            return Err(invalid(format!(
                "world size must be 1..=256, found {world}"
            )));
        }
        if rank >= world {
            return Err(invalid(format!(
                "rank must be below the world size {world}, found {rank}"
            )));
        }
        let coord = resolve(&config.coordinator)?;
        let status = Shared::default();
        let deadline = Instant::now() + config.timeout;

        // This worker's tensor service, on a port of its own.
        let node_host = match &config.node_host {
            Some(h) => h.clone(),
            None => local_ip_towards(coord)?,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("peft-collective-io")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("cannot start the collective runtime: {e}")))?;
        quiet_burn_logging();
        let stop = CancellationToken::new();
        let service = Arc::new(Service::new(stop.clone()));
        let data_port = free_port()?;
        let server = WsServer::new(data_port).route_tensor_data_service(service.clone());
        let served = {
            let stop = stop.clone();
            runtime.spawn(server.serve(async move { stop.cancelled().await }))
        };
        // Downloads that arrive between a check and a wait miss the service's wake-up (it
        // notifies only current waiters): wake them regularly.
        {
            let (service, stop) = (service.clone(), stop.clone());
            runtime.spawn(async move {
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    service.new_tensor_notify.notify_waiters();
                }
            });
        }
        std::thread::sleep(Duration::from_millis(20));
        if served.is_finished() {
            return Err(invalid(format!(
                "rank {rank} cannot serve its tensors on port {data_port}"
            )));
        }
        let me = format!("ws://{node_host}:{data_port}");

        let (lines, addrs) = if rank == 0 {
            let listener = TcpListener::bind(coord).map_err(|e| {
                invalid(format!(
                    "rank 0 cannot listen on the coordinator address {coord}: {e}"
                ))
            })?;
            rendezvous_root(listener, world, deadline, &status, &config.coordinator, me)?
        } else {
            rendezvous_worker(coord, world, rank, deadline, &status, me)?
        };
        let peers = addrs
            .iter()
            .map(|a| Address::from_str(a).map_err(invalid))
            .collect::<Result<Vec<_>>>()?;
        Ok(WorkerGroup {
            rank,
            world,
            timeout: config.timeout,
            status,
            lines,
            runtime,
            service,
            peers,
            seq: 0,
            stop,
            done: false,
        })
    }

    /// Runs `work` on the group's runtime and waits for it, watching the monitor.
    fn wait<T: Send + 'static>(
        &mut self,
        what: &str,
        work: impl std::future::Future<Output = std::result::Result<T, String>> + Send + 'static,
    ) -> Result<T> {
        if let Some((rank, reason)) = lock(&self.status).lost.clone() {
            return Err(TrainError::WorkerLost { rank, reason });
        }
        let (tx, rx) = mpsc::channel();
        let task = self.runtime.spawn(work);
        self.runtime.spawn(async move {
            let r = match task.await {
                Ok(r) => r,
                Err(e) => Err(format!("the transfer task failed: {e}")),
            };
            let _ = tx.send(r);
        });
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    // A failed transfer is most often the first sign of a lost worker, which
                    // the monitor names a moment later (its connection closes too): wait for
                    // it briefly, so that the error names the rank.
                    let failed = Instant::now();
                    while failed.elapsed() < Duration::from_secs(2) {
                        if let Some((rank, reason)) = lock(&self.status).lost.clone() {
                            return Err(TrainError::WorkerLost { rank, reason });
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return Err(TrainError::Collective(format!("{what}: {e}")));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some((rank, reason)) = lock(&self.status).lost.clone() {
                        return Err(TrainError::WorkerLost { rank, reason });
                    }
                    if start.elapsed() > self.timeout {
                        return Err(TrainError::Collective(format!(
                            "{what}: no answer from the other workers in {} s",
                            self.timeout.as_secs()
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TrainError::Collective(format!(
                        "{what}: the collective runtime stopped"
                    )));
                }
            }
        }
    }

    fn broadcast(&self, msg: &str) {
        for l in self.lines.iter().flatten() {
            l.send(msg);
        }
    }
}

impl Collective for WorkerGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Result<Vec<f32>> {
        if self.world == 1 {
            return Ok(data);
        }
        let seq = self.seq;
        self.seq += 1;
        let (service, peers, rank) = (self.service.clone(), self.peers.clone(), self.rank);
        self.wait(
            "all-reduce",
            ring_all_reduce(service, peers, rank, seq, data),
        )
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // The next worker may still be downloading this one's last slice: wait until every
        // exposed tensor is gone before leaving.
        let service = self.service.clone();
        let _ = self.wait("leaving the group", async move {
            loop {
                if service.exposed_tensors.lock().await.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Close this worker's download connections with a handshake, so the peers'
            // servers see a goodbye rather than a reset.
            service.close().await;
            Ok(())
        });
        lock(&self.status).closed = true;
        self.broadcast("BYE");
    }

    fn abort(&mut self, reason: &str) {
        if self.done {
            return;
        }
        self.done = true;
        lock(&self.status).closed = true;
        let reason = reason.replace('\n', " ");
        if self.rank == 0 {
            self.broadcast(&format!("ABORT 0 {reason}"));
        } else {
            self.broadcast(&format!("FAIL {reason}"));
        }
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        self.abort("the worker stopped before the run ended");
        self.stop.cancel();
    }
}

/// The ring all-reduce (sum) of `data` over `peers`, this worker being `rank`: the vector is cut
/// into one slice per worker; in `W - 1` steps each worker adds the slice its predecessor sends
/// (reduce-scatter), after which each holds one fully summed slice, which then travels the ring
/// in `W - 1` more steps (all-gather). Every step exposes one slice on this worker's service and
/// downloads one from the predecessor's, under a transfer id unique to (`seq`, step).
async fn ring_all_reduce(
    service: Arc<Service>,
    peers: Vec<Address>,
    rank: usize,
    seq: u64,
    mut data: Vec<f32>,
) -> std::result::Result<Vec<f32>, String> {
    let w = peers.len();
    let n = data.len();
    if n < w {
        data.resize(w, 0.0);
    }
    let len = data.len();
    let mut slices: Vec<Vec<f32>> = (0..w)
        .map(|i| data[i * len / w..(i + 1) * len / w].to_vec())
        .collect();
    let prev_rank = (rank + w - 1) % w;
    let prev = peers[prev_rank].clone();
    let mut send = rank;
    let mut step = 0u64;
    for add in [true, false] {
        for _ in 0..w - 1 {
            let id = TensorTransferId::from(seq * 1024 + step);
            let recv = (send + w - 1) % w;
            let out = slices[send].clone();
            let shape = [out.len()];
            service
                .expose_data(TensorData::new(out, shape), 1, id)
                .await;
            let got = service
                .download_tensor(prev.clone(), id)
                .await
                .ok_or_else(|| format!("rank {prev_rank} closed its tensor connection"))?;
            let got: Vec<f32> = got
                .to_vec()
                .map_err(|e| format!("rank {prev_rank} sent a bad tensor: {e:?}"))?;
            if got.len() != slices[recv].len() {
                return Err(format!(
                    "rank {prev_rank} sent {} values for slice {recv}, expected {} (the workers \
                     reduce vectors of different lengths)",
                    got.len(),
                    slices[recv].len()
                ));
            }
            if add {
                for (a, b) in slices[recv].iter_mut().zip(got) {
                    *a += b;
                }
            } else {
                slices[recv] = got;
            }
            send = recv;
            step += 1;
        }
    }
    let mut out: Vec<f32> = slices.concat();
    out.truncate(n);
    Ok(out)
}

/// `burn-communication`'s server installs a global `tracing` subscriber that prints INFO logs
/// to stdout when none is set; a library must not print, so an empty one is set first when the
/// application has none. An application's own subscriber is left alone.
fn quiet_burn_logging() {
    if !tracing::dispatcher::has_been_set() {
        let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::none());
    }
}

fn resolve(coordinator: &str) -> Result<SocketAddr> {
    coordinator
        .to_socket_addrs()
        .map_err(|e| {
            invalid(format!(
                "coordinator {coordinator:?} (expected HOST:PORT): {e}"
            ))
        })?
        .find(SocketAddr::is_ipv4)
        .or_else(|| coordinator.to_socket_addrs().ok()?.next())
        .ok_or_else(|| {
            invalid(format!(
                "coordinator {coordinator:?} resolves to no address"
            ))
        })
}

/// The local address of the route to `to` (no packet is sent).
fn local_ip_towards(to: SocketAddr) -> Result<String> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let s = UdpSocket::bind(bind).map_err(|e| invalid(format!("no local address: {e}")))?;
    s.connect(to)
        .map_err(|e| invalid(format!("no route to the coordinator {to}: {e}")))?;
    let ip = s
        .local_addr()
        .map_err(|e| invalid(format!("no local address: {e}")))?
        .ip();
    Ok(match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    })
}

/// A port free now, for this node's tensor data service.
fn free_port() -> Result<u16> {
    TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| invalid(format!("no free port for the tensor data service: {e}")))
}

/// Rank 0: accepts the other `world - 1` ranks, checks who they are, answers `READY`, and
/// watches them.
fn rendezvous_root(
    listener: TcpListener,
    world: usize,
    deadline: Instant,
    status: &Shared,
    coordinator: &str,
    me: String,
) -> Result<(Vec<Option<Line>>, Vec<String>)> {
    let mut lines: Vec<Option<Line>> = vec![None; world];
    let mut addrs: Vec<String> = vec![String::new(); world];
    addrs[0] = me;
    let mut readers: Vec<Option<BufReader<TcpStream>>> = (0..world).map(|_| None).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| invalid(format!("rendezvous: {e}")))?;
    let fail = |lines: &[Option<Line>], msg: String| {
        for l in lines.iter().flatten() {
            l.send(&format!("ABORT 0 {msg}"));
        }
        invalid(msg)
    };
    while lines.iter().skip(1).any(Option::is_none) {
        if Instant::now() > deadline {
            let missing: Vec<usize> = (1..world).filter(|r| lines[*r].is_none()).collect();
            return Err(fail(
                &lines,
                format!(
                    "rank(s) {missing:?} did not join at {coordinator} in time (start every \
                     rank with the same --coordinator and --world-size)"
                ),
            ));
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(fail(&lines, format!("rendezvous: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_nodelay(true);
        let Ok(writer) = stream.try_clone() else {
            continue;
        };
        let mut reader = BufReader::new(stream);
        let Ok(hello) = read_line(&mut reader) else {
            continue; // not one of ours, or gone already
        };
        let parts: Vec<&str> = hello.split(' ').collect();
        let line = Line(Arc::new(Mutex::new(writer)));
        let (r, w, addr) = match parts.as_slice() {
            ["HELLO", r, w, addr] => (r.parse::<usize>().ok(), w.parse::<usize>().ok(), *addr),
            _ => {
                line.send("ABORT 0 not a peft worker");
                continue;
            }
        };
        let (Some(r), Some(w)) = (r, w) else {
            line.send("ABORT 0 malformed HELLO");
            continue;
        };
        if w != world {
            let msg = format!("rank {r} was started with --world-size {w}, rank 0 with {world}");
            line.send(&format!("ABORT 0 {msg}"));
            return Err(fail(&lines, msg));
        }
        if r == 0 || r >= world || lines[r].is_some() {
            let msg = format!("two workers claim rank {r} (or it is out of range)");
            line.send(&format!("ABORT 0 {msg}"));
            return Err(fail(&lines, msg));
        }
        lines[r] = Some(line);
        readers[r] = Some(reader);
        addrs[r] = addr.to_string();
    }
    let ready = format!("READY {}", addrs.join(" "));
    for l in lines.iter().flatten() {
        l.send(&ready);
    }
    for (r, reader) in readers.into_iter().enumerate() {
        let Some(mut reader) = reader else { continue };
        let _ = reader.get_ref().set_read_timeout(Some(SILENCE));
        let status = status.clone();
        let others: Vec<(usize, Line)> = lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.clone().filter(|_| i != r).map(|l| (i, l)))
            .collect();
        std::thread::spawn(move || {
            loop {
                let reason = match read_line(&mut reader) {
                    Ok(l) if l == "PING" => continue,
                    Ok(l) if l == "BYE" => return,
                    Ok(l) => match l.strip_prefix("FAIL ") {
                        Some(why) => format!("failed: {why}"),
                        None => continue,
                    },
                    Err(e) => e,
                };
                let mut s = lock(&status);
                if s.closed || s.lost.is_some() {
                    return;
                }
                s.lost = Some((r, reason.clone()));
                drop(s);
                for (_, l) in &others {
                    l.send(&format!("ABORT {r} {reason}"));
                }
                return;
            }
        });
    }
    heartbeat(status.clone(), lines.iter().flatten().cloned().collect());
    Ok((lines, addrs))
}

/// Rank `rank` > 0: connects to rank 0 (retrying until the deadline), says who it is, waits for
/// `READY`, and watches rank 0.
fn rendezvous_worker(
    addr: SocketAddr,
    world: usize,
    rank: usize,
    deadline: Instant,
    status: &Shared,
    me: String,
) -> Result<(Vec<Option<Line>>, Vec<String>)> {
    let stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(invalid(format!(
                    "rank {rank} could not reach rank 0 at {addr}: {e}; is rank 0 running with \
                     the same --coordinator?"
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = stream.set_nodelay(true);
    let writer = stream
        .try_clone()
        .map_err(|e| invalid(format!("rendezvous: {e}")))?;
    let line = Line(Arc::new(Mutex::new(writer)));
    line.send(&format!("HELLO {rank} {world} {me}"));
    let mut reader = BufReader::new(stream);
    let wait = deadline.saturating_duration_since(Instant::now());
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(wait.max(Duration::from_secs(1))));
    let addrs: Vec<String> = match read_line(&mut reader) {
        Ok(l) if l.starts_with("READY ") => l[6..].split(' ').map(str::to_string).collect(),
        Ok(l) => {
            let why = l.strip_prefix("ABORT 0 ").unwrap_or(&l).to_string();
            return Err(TrainError::WorkerLost {
                rank: 0,
                reason: format!("refused this worker: {why}"),
            });
        }
        Err(e) => {
            return Err(TrainError::WorkerLost {
                rank: 0,
                reason: format!("did not start the run: {e}"),
            });
        }
    };
    if addrs.len() != world {
        return Err(invalid(format!(
            "rank 0 announced {} workers, this one was started with --world-size {world}",
            addrs.len()
        )));
    }
    let _ = reader.get_ref().set_read_timeout(Some(SILENCE));
    let s = status.clone();
    std::thread::spawn(move || {
        loop {
            let lost = match read_line(&mut reader) {
                Ok(l) if l == "PING" => continue,
                Ok(l) if l == "BYE" => {
                    lock(&s).closed = true;
                    return;
                }
                Ok(l) => match l.strip_prefix("ABORT ") {
                    Some(rest) => {
                        let (r, why) = rest.split_once(' ').unwrap_or((rest, ""));
                        let r = r.parse().unwrap_or(0);
                        let why = if why.starts_with("failed:") || r != 0 {
                            why.to_string()
                        } else {
                            format!("failed: {why}")
                        };
                        (r, why)
                    }
                    None => continue,
                },
                Err(e) => (0, e),
            };
            let mut st = lock(&s);
            if !st.closed && st.lost.is_none() {
                st.lost = Some(lost);
            }
            return;
        }
    });
    heartbeat(status.clone(), vec![line.clone()]);
    let mut lines = vec![None; world];
    lines[0] = Some(line);
    Ok((lines, addrs))
}
