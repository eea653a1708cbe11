//! Wall time of one MiniLM forward pass at inference size (32 x 128 tokens) and of a LoRA-sized
//! training step's forward + backward (8 x 128), without hooks, on the model folder given.
//!
//! `cargo run --release -p graft-benches --example forward_time -- MODEL_DIR`
use candle_core::Var;
use graft_benches::{inputs, median, minilm};
use graft_model::NoHooks;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    graft_model::runtime::init();
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: forward_time MODEL_DIR")?;
    let model = minilm(&dir)?;
    let batch = inputs(32, 128)?;
    let mut times = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        model.forward(&batch, &NoHooks)?;
        times.push(started.elapsed().as_secs_f64());
    }
    let forward = median(times[1..].to_vec());
    println!(
        "inference forward 32x128: {:.3} s, {:.0} tokens/s",
        forward,
        4096.0 / forward
    );
    // A training step's shape with only the head trained: the backward stops at the head (the
    // lora_step example times a LoRA step's backward through the model).
    let batch = inputs(8, 128)?;
    let head: Vec<Var> = model.head.vars().into_iter().map(|(_, v)| v).collect();
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let started = Instant::now();
        let logits = model.forward(&batch, &NoHooks)?;
        let loss = logits.sqr()?.sum_all()?;
        fwd.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let grads = loss.backward()?;
        bwd.push(started.elapsed().as_secs_f64());
        assert!(grads.get(head[0].as_tensor()).is_some());
    }
    println!(
        "training 8x128: forward {:.3} s, backward {:.3} s",
        median(fwd[1..].to_vec()),
        median(bwd[1..].to_vec())
    );
    Ok(())
}
