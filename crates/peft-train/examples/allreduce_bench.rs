//! Times `WorkerGroup::all_reduce_sum` alone (no model, no imbalance between workers) for the
//! payloads of LoRA r=8 on q,v: mT5-small (344,064 floats), mt0-large (2,359,296) and mt0-xxl
//! (9,437,184). Run one process per rank (`cargo xtask bench --workload lora-train-dp` does):
//!
//! ```text
//! allreduce_bench WORLD RANK HOST:PORT [REPEATS]
//! ```
//!
//! Rank 0 prints one JSON line per payload: the median seconds of a reduce and the bytes each
//! worker sends in it (`2 (W - 1) / W` of the payload, for the ring).

use peft_train::distributed::{Collective, WorkerGroup, WorldConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: allreduce_bench WORLD RANK HOST:PORT [REPEATS]".into());
    }
    let world: usize = args[1].parse()?;
    let rank: usize = args[2].parse()?;
    let repeats: usize = args.get(4).map_or(Ok(7), |r| r.parse())?;
    let mut group = WorkerGroup::join(&WorldConfig::new(world, rank, args[3].clone()))?;
    for (name, n) in [
        ("mt5-small", 344_064usize),
        ("mt0-large", 2_359_296),
        ("mt0-xxl", 9_437_184),
    ] {
        let data: Vec<f32> = (0..n)
            .map(|i| (i % 97) as f32 * 0.5 + rank as f32)
            .collect();
        let mut times = Vec::new();
        for r in 0..repeats + 1 {
            let t = std::time::Instant::now();
            let out = group.all_reduce_sum(data.clone())?;
            let dt = t.elapsed().as_secs_f64();
            // The sum is right (exact: small integers and halves).
            let want = (0..world).map(|k| 5.0 + k as f32).sum::<f32>();
            if out[10] != want {
                return Err(format!("reduce gave {} at 10, expected {want}", out[10]).into());
            }
            if r > 0 {
                times.push(dt); // the first one opens the connections
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        if rank == 0 {
            let bytes = n * 4;
            println!(
                "{{\"payload\":\"{name}\",\"floats\":{n},\"payload_bytes\":{bytes},\"world\":{world},\
                 \"median_s\":{},\"sent_bytes_per_worker\":{}}}",
                times[times.len() / 2],
                2 * (world - 1) * bytes / world
            );
        }
    }
    group.finish();
    Ok(())
}
