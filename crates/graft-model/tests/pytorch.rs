//! PyTorch checkpoints read without Python: THUDM's float16 `pytorch_model-*.bin` shards of the
//! tiny ChatGLM2 in `../shared/fixtures/chatglm2_thudm/bin/` (`torch.save`'s zips, see
//! `../shared/fixtures/README.md`), and pickles that would run code, built here, refused.
//! `GRAFT_CHATGLM_FIXTURE` names another folder made the same way.
mod common;

use candle_core::{DType, Device, Tensor};
use graft_model::decoder::{Decoder, DecoderInputs};
use graft_model::error::Error;
use graft_model::formats::pytorch::PytorchFile;
use graft_model::weights::Weights;
use graft_model::NoHooks;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    match std::env::var_os("GRAFT_CHATGLM_FIXTURE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/chatglm2_thudm"),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap()
}

/// The fixture's f32 weights by name.
fn safetensors_weights() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn rounded_to_f16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F16)
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap()
}

#[test]
fn every_tensor_of_the_bin_shards_is_the_safetensors_one_in_float16() {
    let bin = fixture().join("bin");
    let theirs = safetensors_weights();
    // The shards as the index names them, however many the fixture has.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bin.join("pytorch_model.bin.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|file| file.as_str().unwrap())
        .collect();
    let mut stored = Vec::new();
    for shard in shards {
        PytorchFile::open(&bin.join(shard))
            .unwrap()
            .read_each(|name, t| {
                stored.push((name, t.dtype()));
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(stored.len(), theirs.len(), "{stored:?}");
    assert!(stored.iter().all(|(_, d)| *d == DType::F16), "{stored:?}");

    // Through the index, as a model folder loads.
    let ours = Weights::load_folder(&bin, DType::F32, &Device::Cpu, None).unwrap();
    for (name, t) in &theirs {
        let found = ours.get(name, t.dims()).unwrap();
        assert_eq!(
            max_abs_diff(&found, &rounded_to_f16(t)),
            0.0,
            "tensor `{name}`"
        );
    }
}

/// `expected.json`'s two rows and THUDM's float32 logits at every position.
fn expected() -> (Vec<Vec<u32>>, Tensor) {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    let rows: Vec<Vec<Vec<f32>>> = serde_json::from_value(json["logits"].clone()).unwrap();
    let shape = (rows.len(), rows[0].len(), rows[0][0].len());
    let flat: Vec<f32> = rows.into_iter().flatten().flatten().collect();
    (ids, Tensor::from_vec(flat, shape, &Device::Cpu).unwrap())
}

fn logits(model: &Decoder, ids: &[Vec<u32>]) -> Tensor {
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let inputs = DecoderInputs {
        input_ids: Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap(),
        attention_mask: Some(Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap()),
    };
    let hidden = model.forward(&inputs, &NoHooks, None).unwrap();
    model.lm_head(&hidden, &NoHooks).unwrap()
}

/// Largest difference allowed between the `bin/` model's f32 logits and THUDM's float32 ones
/// (`expected.json`, from the unrounded weights): the float16 rounding of every weight moves
/// them. Measured on the shared fixture: 4.1e-3, with logits up to about 3 (float16 keeps 11
/// bits, a relative 4.9e-4 a rounding); 8e-3 leaves about twice that.
const F16_WEIGHTS_TOLERANCE: f32 = 8e-3;

#[test]
fn a_model_opened_from_the_bin_shards_gives_the_float16_weights_logits() {
    let (ids, theirs) = expected();
    let from_bin = Decoder::open(&fixture().join("bin"), DType::F32, &Device::Cpu).unwrap();
    let ours = logits(&from_bin, &ids);

    // The same graph on the safetensors weights rounded to float16: the same logits exactly.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let rounded: std::collections::HashMap<String, Tensor> = safetensors_weights()
        .iter()
        .map(|(k, t)| (k.clone(), rounded_to_f16(t)))
        .collect();
    candle_core::safetensors::save(&rounded, dir.path().join("model.safetensors")).unwrap();
    let from_rounded = Decoder::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&ours, &logits(&from_rounded, &ids)), 0.0);

    let diff = max_abs_diff(&ours, &theirs);
    eprintln!("bin/ (float16 weights) logits within {diff:e} of THUDM's float32 ones");
    assert!(
        diff <= F16_WEIGHTS_TOLERANCE,
        "logits differ from THUDM's by {diff}, over {F16_WEIGHTS_TOLERANCE}"
    );
}

/// A pickle of `{"w": tensor [2, 2] f32 from storage "0"}` as `torch.save` (protocol 2) writes
/// it, with `rebuild` as the module and name of the global that rebuilds the tensor.
fn state_dict_pickle(rebuild: &str) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00(X\x01\x00\x00\x00wc".to_vec();
    p.extend_from_slice(rebuild.as_bytes());
    p.extend_from_slice(b"\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n");
    p.extend_from_slice(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ");
    p.extend_from_slice(b"K\x00K\x02K\x02\x86K\x02K\x01\x86\x89ccollections\nOrderedDict\n)Rt");
    p.extend_from_slice(b"Ru.");
    p
}

#[test]
fn a_state_dict_built_here_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let pickle = state_dict_pickle("torch._utils\n_rebuild_tensor_v2");
    common::write_torch_checkpoint(dir.path(), &pickle, &[]);
    let weights = Weights::load_folder(dir.path(), DType::F32, &Device::Cpu, None).unwrap();
    let w = weights.get("w", &[2, 2]).unwrap();
    assert_eq!(w.to_vec2::<f32>().unwrap(), [[1., 2.], [3., 4.]]);

    // Bytes cut short anywhere are an error, never a panic or a tensor.
    for end in 0..pickle.len() {
        let path = common::write_torch_checkpoint(dir.path(), &pickle[..end], &[]);
        assert!(PytorchFile::open(&path).is_err(), "cut at {end}");
    }
}

/// `pickle` in a checkpoint folder is refused, naming `what`.
fn assert_refused(pickle: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    common::write_torch_checkpoint(dir.path(), pickle, &[]);
    let err = Weights::load_folder(dir.path(), DType::F32, &Device::Cpu, None)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::PickleRefused { .. }), "{msg}");
    assert!(msg.contains(what), "{msg}");
    assert!(msg.contains("pytorch_model.bin"), "{msg}");
}

#[test]
fn pickles_that_would_run_code_are_refused_by_name() {
    // os.system as Python pickles it on Linux, in the tensor's place and alone.
    assert_refused(&state_dict_pickle("posix\nsystem"), "`posix.system`");
    assert_refused(
        b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.",
        "`os.system`",
    );
    // builtins.eval through protocol 4's STACK_GLOBAL.
    assert_refused(
        b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x012\x85R.",
        "`builtins.eval`",
    );
    // An allowed global called through an opcode that builds objects (INST).
    assert_refused(b"\x80\x02(icollections\nOrderedDict\n.", "INST");
}
