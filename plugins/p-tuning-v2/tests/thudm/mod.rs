//! graft's ChatGLM2 against THUDM's own `modeling_chatglm.py`: a tiny random ChatGLM2 in the
//! real checkpoint's layout, and the logits THUDM's code computed at every position of two
//! rows, without and with a P-tuning v2 prefix as THUDM's `ptuning/` trains it (see
//! `../shared/fixtures/README.md`). The folder is opened as a user's model folder; the prefix,
//! THUDM's `ptuning/` output folder, is read as `graft_trainer::thudm` reads it and loaded
//! through graft's P-tuning v2 method.
//!
//! `GRAFT_CHATGLM_FIXTURE` names another folder made the same way. Two test binaries include
//! this module: `thudm_parity` runs the CPU's fused kernels, `thudm_parity_reference_ops` the
//! composed ops a `--features cuda` build runs (`GRAFT_REFERENCE_OPS=1`).
use graft_peft::candle::{DType, Device, Tensor};
use graft_peft::graft_model::decoder::{Decoder, DecoderInputs};
use graft_peft::graft_model::{Hooks, NoHooks};
use graft_peft::prompt_learning::THUDM_PREFIX;
use graft_peft::{Adapter, AttachContext};
use std::path::PathBuf;

/// Largest difference allowed between graft's f32 logits and THUDM's (float32, CPU), what the
/// issue asks. Measured on the shared fixture: 1.8e-6 without the prefix and 2.0e-6 with it on
/// the fused path, 1.9e-6 and 2.4e-6 on the reference path (logits up to about 3: a few float32
/// roundings).
pub const F32_TOLERANCE: f32 = 1e-4;

/// Largest difference allowed between graft's bf16 logits and THUDM's float32 ones, relative
/// to the largest logit, for each rounding stage: the embedded input and each block's output
/// (so `num_layers + 1` of them). bf16 keeps 8 bits of mantissa (2^-8 = 0.0039 a rounding), and
/// the weights are rounded too, so the error grows with depth. Measured on the shared fixture
/// (2 layers): 0.0198 of the largest without the prefix and 0.0187 with it on the fused path,
/// 0.0194 and 0.0177 on the reference path; on a 3-layer fixture made the same way, up to 0.0306
/// (reference path, with the prefix). 0.01 a stage allows 0.03 at 2 layers and 0.04 at 3.
pub const BF16_TOLERANCE_PER_STAGE: f32 = 0.01;

/// The fixture's `num_layers` (config.json).
pub fn num_layers() -> usize {
    let path = fixture().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["num_layers"]
        .as_u64()
        .expect("num_layers in config.json") as usize
}

pub fn fixture() -> PathBuf {
    match std::env::var_os("GRAFT_CHATGLM_FIXTURE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/chatglm2_thudm"),
    }
}

/// What THUDM's code computed (`expected.json`).
pub struct Expected {
    pub input_ids: Vec<Vec<u32>>,
    /// `[rows, positions, vocab]`.
    pub logits: Tensor,
    pub pre_seq_len: usize,
    pub logits_with_prefix: Tensor,
}

pub fn expected() -> Expected {
    let path = fixture().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    let logits = |key: &str| {
        let rows: Vec<Vec<Vec<f32>>> = serde_json::from_value(json[key].clone())
            .unwrap_or_else(|e| panic!("{}: `{key}`: {e}", path.display()));
        let shape = (rows.len(), rows[0].len(), rows[0][0].len());
        let flat: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        Tensor::from_vec(flat, shape, &Device::Cpu).unwrap()
    };
    Expected {
        logits: logits("logits"),
        pre_seq_len: json["pre_seq_len"].as_u64().expect("pre_seq_len") as usize,
        logits_with_prefix: logits("logits_with_prefix"),
        input_ids: ids,
    }
}

/// The fixture folder opened as a user's model folder, in `dtype`.
pub fn model(dtype: DType) -> Decoder {
    Decoder::open(&fixture(), dtype, &Device::Cpu).unwrap()
}

/// THUDM's prefix table as `ptuning/main.py` saves it (`ptuning/`: `pytorch_model.bin` with
/// `transformer.prefix_encoder.embedding.weight`, config.json with `pre_seq_len`), read as graft
/// reads such a folder and loaded through graft's P-tuning v2 method.
pub fn prefix(model: &Decoder, pre_seq_len: usize) -> Box<dyn Adapter> {
    let saved = graft_trainer::thudm::read(&fixture().join("ptuning"), &Device::Cpu).unwrap();
    assert!(saved.tensors.contains_key(THUDM_PREFIX));
    assert_eq!(saved.config["pre_seq_len"], pre_seq_len);
    let info = model.info();
    let sites = model.sites();
    let base = model.named_tensors();
    let tokenize = |_: &str| -> graft_peft::Result<Vec<u32>> { Ok(Vec::new()) };
    let ctx = AttachContext {
        info: &info,
        sites: &sites,
        dtype: graft_peft::graft_model::ops::compute_dtype(model.dtype()),
        device: &Device::Cpu,
        seed: 0,
        base_tensors: &base,
        quantized: &[],
        tokenize: &tokenize,
        total_steps: 0,
    };
    graft_plugin_p_tuning_v2::method()
        .load(&saved.config, &saved.tensors, &ctx)
        .unwrap()
}

/// Logits `[rows, positions, vocab]` in f32 at every position of `ids`, with an all-ones
/// attention mask (as THUDM's run) or none.
pub fn logits(model: &Decoder, hooks: &dyn Hooks, ids: &[Vec<u32>], with_mask: bool) -> Tensor {
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let inputs = DecoderInputs {
        input_ids: Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap(),
        attention_mask: with_mask.then(|| Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap()),
    };
    let hidden = model.forward(&inputs, hooks, None).unwrap();
    model
        .lm_head(&hidden, hooks)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    max_diff(t, &t.zeros_like().unwrap())
}

/// The largest difference of `ours` from `theirs`, at every position of every row.
pub fn max_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "logits of every position");
    graft_testkit::max_abs_diff(ours, theirs).unwrap() as f32
}

/// graft's logits against THUDM's in `dtype`, without and with the prefix, with and without
/// an attention mask; `path` names the ops in the messages. Asserts within the f32 tolerance,
/// or bf16's relative one, and that the prefix moves the logits (so it is not ignored).
pub fn check(dtype: DType, path: &str) {
    let expected = expected();
    let model = model(dtype);
    let adapter = prefix(&model, expected.pre_seq_len);
    let stages = (num_layers() + 1) as f32;
    let bound = |theirs: &Tensor| match dtype {
        DType::F32 => F32_TOLERANCE,
        _ => BF16_TOLERANCE_PER_STAGE * stages * max_abs(theirs),
    };
    for with_mask in [true, false] {
        for (what, hooks, theirs) in [
            (
                "without the prefix",
                &NoHooks as &dyn Hooks,
                &expected.logits,
            ),
            (
                "with THUDM's P-tuning v2 prefix",
                adapter.as_ref() as &dyn Hooks,
                &expected.logits_with_prefix,
            ),
        ] {
            let ours = logits(&model, hooks, &expected.input_ids, with_mask);
            let diff = max_diff(&ours, theirs);
            eprintln!(
                "{path}, {dtype:?}, {what}, mask {with_mask}: within {diff:e} of THUDM's \
                 ({:e} of the largest)",
                diff / max_abs(theirs)
            );
            assert!(
                diff <= bound(theirs),
                "{path}, {dtype:?}, {what}, mask {with_mask}: logits differ from THUDM's by \
                 {diff}, over {}",
                bound(theirs)
            );
        }
    }
    // The prefix matters: THUDM's logits move by about 2.4 with it.
    let moved = max_diff(&expected.logits, &expected.logits_with_prefix);
    assert!(
        moved > 100.0 * F32_TOLERANCE,
        "the fixture's prefix moves logits by {moved}"
    );
}
