//! `graft inspect --device cuda` against the bytes a LoRA step allocates on the composed ops
//! that a CUDA build runs (this binary sets `GRAFT_REFERENCE_OPS=1` before any op runs): a
//! counting allocator measures the peak of the bytes allocated during one forward and
//! backward of `train-lm`'s loss, above what was live before it (the weights, the LoRA tensors,
//! the batch), and inspect's activations, logits and LoRA gradients must come within 15 % of it,
//! at two shapes, with and without gradient checkpointing.
// The exported functions are the C library's malloc family: their safety contract is its own.
#![allow(clippy::missing_safety_doc)]
use graft_peft::candle::DType;
use graft_peft::serde_json::json;
use graft_testkit as testkit;
use std::ffi::c_void;
use std::sync::atomic::{AtomicIsize, Ordering};

// The tensors are allocated inside graft-peft's dylib, which a `#[global_allocator]` here
// does not reach: this binary's own malloc family, which the dynamic linker binds every
// library's calls to, counts the bytes live (glibc's usable size of each block) and the most
// live since the last reset, and hands each call to glibc's.
extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn malloc_usable_size(p: *mut c_void) -> usize;
}

// Signed: another thread may count a block's release before its allocation was counted.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

unsafe fn counted(p: *mut c_void) -> *mut c_void {
    if !p.is_null() {
        let bytes = unsafe { malloc_usable_size(p) } as isize;
        let live = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
        PEAK.fetch_max(live, Ordering::SeqCst);
    }
    p
}

unsafe fn released(p: *mut c_void) {
    if !p.is_null() {
        LIVE.fetch_sub(unsafe { malloc_usable_size(p) } as isize, Ordering::SeqCst);
    }
}

#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    unsafe { counted(__libc_malloc(size)) }
}

#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    unsafe { counted(__libc_calloc(n, size)) }
}

#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    unsafe {
        released(p);
        counted(__libc_realloc(p, size))
    }
}

#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    unsafe {
        released(p);
        __libc_free(p)
    }
}

#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    let p = unsafe { counted(__libc_memalign(align, size)) };
    if p.is_null() {
        return 12; // ENOMEM
    }
    unsafe { *out = p };
    0
}

#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    unsafe { counted(__libc_memalign(align, size)) }
}

#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    unsafe { counted(__libc_memalign(align, size)) }
}

/// A Llama-like shape: hidden, intermediate, layers, heads, key/value heads, and the step's
/// batch and sequence length.
struct Shape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    batch: usize,
    seq: usize,
}

/// Bytes allocated at the peak of one LoRA step above those live before it, and inspect's
/// CUDA estimate of them.
fn counted_and_estimated(
    shape: &Shape,
    checkpointing: bool,
    scratch: &std::path::Path,
) -> (usize, usize) {
    use graft_trainer::config::Precision;
    use graft_trainer::inspect::{inspect, StepShape};
    use graft_trainer::lm::{CausalLm, LmSpec};
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": false,
    });
    let dir = scratch.join(format!("llama-{}-{}", shape.hidden, shape.layers));
    let plan = graft_peft::graft_model::models::llama::plan(
        &graft_peft::serde_json::from_value(config.clone()).unwrap(),
    )
    .unwrap();
    plan.write_random(&dir, &config, 7).unwrap();
    let spec = LmSpec {
        model: dir.clone(),
        dtype: Precision::Bf16,
        max_len: shape.seq,
        ..testkit::lm_spec("lora", testkit::Family::Llama, scratch).unwrap()
    };
    let lora = graft_plugin_lora::method();
    let settings = json!({ "r": 8, "lora_alpha": 16 });
    let lm = CausalLm::create(
        spec,
        lora.as_ref(),
        &settings,
        &graft_peft::candle::Device::Cpu,
        1,
        1,
    )
    .unwrap();
    let tokens = shape.batch * shape.seq;
    let batch = graft_tokenizer::CausalBatch {
        input_ids: (0..tokens).map(|i| (i * 7 % 500) as u32 + 3).collect(),
        attention_mask: vec![1; tokens],
        labels: (0..tokens).map(|i| (i * 11 % 500) as i64 + 3).collect(),
        batch: shape.batch,
        seq_len: shape.seq,
    };
    let step = StepShape {
        batch: shape.batch,
        seq_len: shape.seq,
        dtype: DType::BF16,
        checkpointing,
        quantize: None,
        labelled: None,
        composed_ops: true,
        prefix: 0,
    };
    let report = inspect(&dir, None, 8, step).unwrap();
    // The LoRA gradients (f32) are the step's; the values and AdamW's moments are not.
    let estimated = report.memory.activations + report.memory.logits + report.lora_trainable * 4;

    // A first step, uncounted: the products' per-thread packing buffers (the gemm crate keeps
    // them) and the kept causal masks and rotary tables are allocated once, not per step.
    drop(lm.loss_and_grads(&batch, checkpointing, 1.0).unwrap());
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let (loss, grads) = lm.loss_and_grads(&batch, checkpointing, 1.0).unwrap();
    let counted = (PEAK.load(Ordering::SeqCst) - before) as usize;
    drop((loss, grads));
    (counted, estimated)
}

#[test]
fn inspect_counts_what_the_composed_ops_hold() {
    std::env::set_var("GRAFT_REFERENCE_OPS", "1");
    assert!(
        graft_peft::graft_model::ops::reference_forced(),
        "an op ran before GRAFT_REFERENCE_OPS was set"
    );
    let scratch = tempfile::tempdir().unwrap();
    let shapes = [
        Shape {
            hidden: 128,
            intermediate: 352,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            batch: 2,
            seq: 64,
        },
        Shape {
            hidden: 64,
            intermediate: 176,
            layers: 3,
            heads: 4,
            kv_heads: 4,
            batch: 2,
            seq: 128,
        },
    ];
    let mut failures = Vec::new();
    for shape in &shapes {
        for checkpointing in [false, true] {
            let (counted, estimated) = counted_and_estimated(shape, checkpointing, scratch.path());
            let ratio = estimated as f64 / counted as f64;
            eprintln!(
                "hidden {} x {} layers, batch {} x {}, checkpointing {checkpointing}: counted {counted} B, estimated {estimated} B ({ratio:.3})",
                shape.hidden, shape.layers, shape.batch, shape.seq
            );
            if !(0.85..=1.15).contains(&ratio) {
                failures.push((shape.hidden, checkpointing, ratio));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "estimate off by over 15 %: {failures:?}"
    );
}
