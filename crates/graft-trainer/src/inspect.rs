//! `graft inspect`: what a decoder and a LoRA adapter on it cost, from the config alone (no
//! weights read), so that a 6B model can be sized on a machine that cannot hold it.
use crate::Result;
use candle_core::DType;
use graft_model::decoder::Plan;
use graft_model::load::read_plan;
use graft_model::quant::Quantization;
use graft_peft::TargetModules;
use serde::Serialize;
use std::path::Path;

/// A training step's shape.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    pub batch: usize,
    pub seq_len: usize,
    /// The dtype the base weights and activations are kept in (trainable tensors are f32).
    pub dtype: DType,
    /// Gradient checkpointing: each block recomputed in the backward pass.
    pub checkpointing: bool,
    /// The projection weights kept quantized in this family (`[model] quantize`).
    pub quantize: Option<Quantization>,
    /// Tokens of each sequence that take a loss (train-lm computes the head's logits at those
    /// alone: a response's); `None`: every token.
    pub labelled: Option<usize>,
    /// The step runs the composed ops (a CUDA build): a quantized product dequantizes its
    /// whole weight; the CPU's kernels dequantize [`CPU_DEQUANTIZED_VALUES`] at a time. A
    /// LoRA step's activations are then [`composed_step_bytes`]'s (`graft inspect --device
    /// cuda`).
    pub composed_ops: bool,
    /// Key/value prefix positions every layer attends to (prefix tuning, P-tuning v2 without
    /// projection): its table is then what trains, instead of LoRA; 0: LoRA.
    pub prefix: usize,
}

/// Values of a quantized weight the CPU's product dequantizes at a time, in f32 (a block of
/// its rows: `ops/cpu/data.rs`, `widened_blocks`).
pub const CPU_DEQUANTIZED_VALUES: usize = 2 << 20;

/// Bytes one training step holds, by what holds them.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// The frozen base weights (the projections in their block formats when quantized).
    pub weights: usize,
    /// With a quantized base: what a product holds dequantized at a time: on the composed ops
    /// the largest projection weight in the activations' dtype, on the CPU's kernels a block
    /// of its rows in f32 (8 MiB).
    pub dequantized: usize,
    /// The trainable tensors with their gradients and AdamW's two moments, all f32.
    pub trainable: usize,
    /// Activations the backward pass reads (see [`activation_elements`]); with checkpointing,
    /// each block's input and one block's activations and their gradients.
    pub activations: usize,
    /// The logits of the labelled tokens and the log-softmax over them (f32).
    pub logits: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub model_type: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
    pub params: usize,
    /// Linear sites the targets select, and the LoRA values on them.
    pub lora_sites: usize,
    pub lora_trainable: usize,
    /// The values the step trains: LoRA's, or the prefix table's with [`StepShape::prefix`].
    pub trainable: usize,
    pub memory: Memory,
}

/// LoRA's trainable values at rank `r` on the sites `targets` selects: r·(in + out) per site.
pub fn lora_trainable(plan: &Plan, targets: &TargetModules, r: usize) -> Result<(usize, usize)> {
    let sites = plan.sites();
    let selected = targets.select("lora", &sites)?;
    let values = selected
        .iter()
        .map(|s| r * (s.in_features + s.out_features))
        .sum();
    Ok((selected.len(), values))
}

/// Activation values a training step keeps for the backward pass, per the graph graft builds:
/// per layer and token, the two norms' inputs and outputs (4h), queries, keys and values before
/// and after the rotary embedding (2(q + 2kv)), the attention context (q), the two residual
/// sums (2h) and the SwiGLU's gate, up branch and product (3f: the fused kernel keeps no
/// activation); plus the attention
/// probabilities (heads · s per token) where they fit the 256 MiB a layer may keep.
///
/// With checkpointing the forward pass keeps each block's input (h per token and layer), and
/// the backward holds one block's activations at a time, with their gradients beside them
/// (counted as twice one block's).
pub fn activation_elements(plan: &Plan, shape: StepShape) -> usize {
    let s = &plan.spec;
    let (q, kv) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
    let per_token =
        4 * s.hidden_size + 2 * (q + 2 * kv) + q + 2 * s.hidden_size + 3 * s.intermediate_size;
    let tokens = shape.batch * shape.seq_len;
    let probs = shape.batch * s.num_heads * shape.seq_len * (shape.seq_len + shape.prefix);
    let kept_probs = if probs * shape.dtype.size_in_bytes() <= 256 << 20 {
        probs
    } else {
        0
    };
    let one_block = tokens * per_token + kept_probs;
    if shape.checkpointing {
        (s.num_layers + 1) * tokens * s.hidden_size + 2 * one_block
    } else {
        s.num_layers * one_block
    }
}

/// Bytes a LoRA step holds at its peak on the composed ops a CUDA build runs (as measured on the
/// CPU under `GRAFT_REFERENCE_OPS=1` by plugins/lora's `tests/cuda_memory.rs`): candle's graph
/// keeps every intermediate of the forward pass until the backward ends, so per layer and token
/// (B the dtype's bytes, W the f32 bytes of the norms and scores, 0 extra when B is f32):
/// each norm's f32 copy, square, quotient and product and its cast back (3W + [W + B]), each
/// projection's output, three with LoRA (base, update, sum), the rotary embedding's four
/// products, two sums and concatenation (4·rotary·B per head, plus a copy when a head only
/// partly rotates or the projections are fused), the attention's head-major copies of q, k and
/// v (and k, v repeated for grouped queries), context and its copy, the residual sums and the
/// SwiGLU's two products; per score (batch · heads · queries · keys): the product in B, its
/// f32 copy, the scaled, biased, shifted, exponentiated and normalised scores and the cast back
/// (5W + [W + B]). The gradients of constants (masks, maxima, frozen norm weights, angles) are
/// not kept ([`graft_model::ops::reference::with_constant`]). On top, the backward's largest
/// transient: about 9 score-sized f32 buffers in a layer's attention, or 6 logits-sized ones
/// in the loss (measured). With checkpointing: each block's input, the head's graph, one
/// block's graph and that transient.
///
/// Returns (activations with the transient, the head's graph).
pub fn composed_step_bytes(
    plan: &Plan,
    shape: StepShape,
    lora: &dyn Fn(&str) -> bool,
) -> (usize, usize) {
    let s = &plan.spec;
    let b = shape.dtype.size_in_bytes();
    let w = graft_model::ops::compute_dtype(shape.dtype).size_in_bytes();
    // The casts to f32 and back, absent when the activations are f32 already.
    let (to_wide, to_narrow) = if w == b { (0, 0) } else { (w, b) };
    let tokens = shape.batch * shape.seq_len;
    let keys = shape.seq_len + shape.prefix;
    let (q, kv) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
    let h = s.hidden_size;
    let norm = tokens * h * (3 * w + to_wide + to_narrow);
    let sites = plan.sites();
    let per_layer = |layer: usize| -> usize {
        let in_layer = sites.iter().filter(|site| site.layer == Some(layer));
        let fused_qkv = in_layer
            .clone()
            .any(|site| site.out_features == q + 2 * kv && q + 2 * kv != h);
        let projections: usize = in_layer
            .map(|site| {
                let copies = if lora(&site.name) { 3 } else { 1 };
                copies * tokens * site.out_features * b
            })
            .sum();
        let rotary = s.rope.rotary_dims;
        let partial = usize::from(rotary < s.head_dim || fused_qkv);
        let rope = |heads: usize| tokens * heads * (4 * rotary + partial * s.head_dim) * b;
        let repeated = if s.num_heads == s.num_kv_heads {
            0
        } else {
            2 * shape.batch * keys * q * b
        };
        let heads_copies = (tokens * q + 2 * shape.batch * keys * kv) * b + repeated;
        let scores = shape.batch * s.num_heads * shape.seq_len * keys;
        let score_bytes = scores * (b + 5 * w + to_wide + to_narrow);
        let bias = shape.batch * shape.seq_len * keys * w;
        let context = 2 * tokens * q * b;
        let residuals = 2 * tokens * h * b;
        let swiglu = 2 * tokens * s.intermediate_size * b;
        let fused_copies = if fused_qkv { tokens * kv * b } else { 0 };
        2 * norm
            + projections
            + rope(s.num_heads)
            + rope(s.num_kv_heads)
            + fused_copies
            + heads_copies
            + score_bytes
            + bias
            + context
            + residuals
            + swiglu
    };
    let labelled = shape.labelled.unwrap_or(shape.seq_len).min(shape.seq_len);
    let logits = shape.batch * labelled * s.vocab_size;
    // The final norm, the labelled rows, their logits in B, and the loss's f32 copy, shifted
    // logits, exponentials and log-probabilities.
    let head = norm + shape.batch * labelled * h * b + logits * (b + 3 * w + to_wide);
    let transient = (9 * shape.batch * s.num_heads * shape.seq_len * keys * w).max(6 * logits * w);
    let blocks = if shape.checkpointing {
        let largest = (0..s.num_layers).map(per_layer).max().unwrap_or(0);
        (s.num_layers + 1) * tokens * h * b + largest
    } else {
        (0..s.num_layers).map(per_layer).sum::<usize>()
    };
    (blocks + transient, head)
}

/// Inspects the decoder at `path` (a model folder, a config.json or a `.gguf` file) with LoRA
/// of rank `r` on `targets` (PEFT's default for the architecture when `None`).
pub fn inspect(
    path: &Path,
    targets: Option<TargetModules>,
    r: usize,
    shape: StepShape,
) -> Result<Inspection> {
    let (plan, _) = read_plan(path)?;
    let s = &plan.spec;
    let targets = TargetModules::or_default(
        &targets,
        graft_peft::DefaultTargets::QueryValue,
        "lora",
        &s.model_type,
    )?;
    let (lora_sites, lora_trainable) = lora_trainable(&plan, &targets, r)?;
    let params = plan.param_count();
    let bytes = shape.dtype.size_in_bytes();
    let (weights, dequantized) = match shape.quantize {
        None => (params * bytes, 0),
        Some(family) => {
            let sites = plan.sites();
            let projections: usize = sites.iter().map(|s| s.out_features * s.in_features).sum();
            let quantized: usize = sites
                .iter()
                .map(|s| family.bytes(s.out_features, s.in_features, bytes))
                .sum();
            let largest = sites
                .iter()
                .map(|s| s.out_features * s.in_features)
                .max()
                .unwrap_or(0);
            let held = if shape.composed_ops {
                largest * bytes
            } else {
                largest.min(CPU_DEQUANTIZED_VALUES) * 4
            };
            ((params - projections) * bytes + quantized, held)
        }
    };
    let trained = match shape.prefix {
        0 => lora_trainable,
        // A key and a value of every key/value head, per layer and position.
        n => n * s.num_layers * 2 * s.num_kv_heads * s.head_dim,
    };
    // Value, gradient and two AdamW moments, in f32 whatever the base's dtype (f64 in f64).
    let trainable = 4 * trained * graft_model::ops::compute_dtype(shape.dtype).size_in_bytes();
    let (activations, logits) = if shape.composed_ops && shape.prefix == 0 {
        let sites = plan.sites();
        let selected = targets.select("lora", &sites)?;
        let lora = |name: &str| selected.iter().any(|site| site.name == name);
        composed_step_bytes(&plan, shape, &lora)
    } else {
        let labelled = shape.labelled.unwrap_or(shape.seq_len).min(shape.seq_len);
        (
            activation_elements(&plan, shape) * bytes,
            3 * shape.batch * labelled * s.vocab_size * 4,
        )
    };
    Ok(Inspection {
        model_type: s.model_type.clone(),
        layers: s.num_layers,
        hidden_size: s.hidden_size,
        heads: s.num_heads,
        kv_heads: s.num_kv_heads,
        vocab_size: s.vocab_size,
        params,
        lora_sites,
        lora_trainable,
        trainable: trained,
        memory: Memory {
            weights,
            dequantized,
            trainable,
            activations,
            logits,
            total: weights + dequantized + trainable + activations + logits,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatGLM2-6B's config.json, as THUDM publishes it.
    const CHATGLM2_6B: &str = r#"{
        "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": false, "add_qkv_bias": true, "apply_query_key_layer_scaling": true,
        "apply_residual_connection_post_layernorm": false, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": true, "bias_dropout_fusion": true, "ffn_hidden_size": 13696,
        "fp32_residual_connection": false, "hidden_dropout": 0.0, "hidden_size": 4096,
        "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": true,
        "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28,
        "original_rope": true, "padded_vocab_size": 65024, "post_layer_norm": true,
        "rmsnorm": true, "seq_length": 32768, "use_cache": true, "torch_dtype": "float16",
        "transformers_version": "4.27.1", "tie_word_embeddings": false, "eos_token_id": 2,
        "pad_token_id": 0
    }"#;

    #[test]
    fn chatglm2_6b_counts_from_its_config_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, CHATGLM2_6B).unwrap();
        let shape = StepShape {
            batch: 1,
            seq_len: 512,
            dtype: DType::BF16,
            checkpointing: true,
            quantize: None,
            labelled: None,
            composed_ops: false,
            prefix: 0,
        };
        let report = inspect(
            &path,
            Some(TargetModules::Names(vec!["query_key_value".into()])),
            8,
            shape,
        )
        .unwrap();
        // The figures PEFT's print_trainable_parameters reports for ChatGLM2-6B with LoRA r 8
        // on query_key_value: 6,243,584,000 parameters, 1,949,696 trainable (28 sites). That
        // the byte counts match the tensors a real step holds is checked on small models by
        // plugins/lora's `inspect_counts_the_tensors_a_lora_step_holds`.
        assert_eq!(report.params, 6_243_584_000);
        assert_eq!(report.lora_sites, 28);
        assert_eq!(report.lora_trainable, 1_949_696);
        // What docs/usage.md's decoder section quotes: under 16 GB with checkpointing (12.33 GiB),
        // and over it without (the 28 layers' activations).
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        eprintln!("with checkpointing: {:.2} GiB", gib(report.memory.total));
        assert!(report.memory.total < 16_000_000_000, "{:?}", report.memory);
        let without = inspect(
            &path,
            Some(TargetModules::Names(vec!["query_key_value".into()])),
            8,
            StepShape {
                checkpointing: false,
                ..shape
            },
        )
        .unwrap();
        eprintln!("without: {:.2} GiB", gib(without.memory.total));
        assert!(without.memory.activations > 4 * report.memory.activations);

        // On a q4_k base (every projection 4096 wide in q4_k, the 13696-wide down projection in
        // q5_0; the 0.5 GiB embedding table in bf16): 4.51 GiB on the CPU, whose kernels
        // dequantize a few rows at a time; 6.19 GiB on the composed ops a GPU runs, which hold
        // one whole dequantized weight (the 65024 x 4096 head, 0.50 GiB) and every
        // intermediate of the head and a block.
        let q4 = |composed_ops| {
            let shape = StepShape {
                quantize: Some(Quantization::Q4K),
                composed_ops,
                ..shape
            };
            let target = Some(TargetModules::Names(vec!["query_key_value".into()]));
            inspect(&path, target, 8, shape).unwrap().memory
        };
        let (cpu, gpu) = (q4(false), q4(true));
        eprintln!(
            "on a q4_k base: {:.2} GiB on the CPU, {:.2} GiB on a GPU",
            gib(cpu.total),
            gib(gpu.total)
        );
        assert!(3 * cpu.weights < report.memory.weights);
        assert!(cpu.total < 5_000_000_000, "{cpu:?}");
        assert_eq!(gpu.weights, cpu.weights);
        assert!(gpu.dequantized > 500 << 20, "{gpu:?}");
        assert!(gpu.total < 7_000_000_000, "{gpu:?}");
    }

    /// The quantized weights inspect counts for SmolLM2 are the bytes its quantized load holds
    /// (block formats per site, embeddings and norms in the dtype), in each family.
    #[test]
    fn quantized_weights_are_counted_as_a_quantized_load_holds_them() {
        use candle_core::Device;
        use graft_model::decoder::Decoder;
        let path = graft_model::zoo::SMOLLM2
            .ensure(&mut |m| eprintln!("{m}"))
            .expect("SmolLM2 (run `cargo xtask fetch-model smollm2`)")
            .join(graft_model::zoo::SMOLLM2_GGUF);
        for family in [Quantization::Q8_0, Quantization::Q4K] {
            let shape = StepShape {
                batch: 1,
                seq_len: 8,
                dtype: DType::BF16,
                checkpointing: true,
                quantize: Some(family),
                labelled: None,
                composed_ops: false,
                prefix: 0,
            };
            let report = inspect(&path, None, 8, shape).unwrap();
            let model =
                Decoder::open_quantized(&path, DType::BF16, Some(family), &Device::Cpu).unwrap();
            let blocks: usize = model
                .quantized()
                .iter()
                .map(|(_, b)| b.size_in_bytes())
                .sum();
            let dense: usize = model
                .params()
                .iter()
                .map(|p| p.value().elem_count() * 2)
                .sum();
            assert_eq!(model.quantized().len(), 30 * 7, "{family}");
            assert_eq!(report.memory.weights, blocks + dense, "{family}");
        }
    }
}
