//! An adapter-free graft BERT against candle-transformers' bert on the same inputs.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use graft_model::models::bert::{Bert, Config, Inputs, PREFIX};
use graft_model::weights::Weights;
use graft_model::NoHooks;

fn minilm() -> std::path::PathBuf {
    graft_model::zoo::MINILM
        .ensure(&mut |m| eprintln!("{m}"))
        .expect("all-MiniLM-L6-v2 (run `cargo xtask fetch-model minilm`)")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap()
}

#[test]
fn graft_bert_matches_candle_transformers() {
    let dir = minilm();
    let device = Device::Cpu;
    // The fixture's two sentences as Hugging Face's tokenizer encodes them, padded to 16.
    let ids: [[u32; 16]; 2] = [
        [
            101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102, 0, 0, 0, 0,
        ],
        [
            101, 16381, 1011, 8114, 2986, 1011, 17372, 15581, 2545, 2442, 2461, 102, 0, 0, 0, 0,
        ],
    ];
    let mask: [[u32; 16]; 2] = [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    ];
    let input_ids = Tensor::new(&ids, &device).unwrap();
    let attention_mask = Tensor::new(&mask, &device).unwrap();
    let token_type_ids = input_ids.zeros_like().unwrap();

    let config = Config::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::load(&dir.join("model.safetensors"), DType::F32, &device)
        .unwrap()
        .with_prefix(PREFIX);
    let ours = Bert::load(config, &weights, true).unwrap();
    let inputs = Inputs {
        input_ids: input_ids.clone(),
        attention_mask: attention_mask.clone(),
        token_type_ids: Some(token_type_ids.clone()),
    };
    let (hidden, _) = ours.forward(&inputs, &NoHooks).unwrap();
    // The pooler's shortcut (last layer for the first position only) changes nothing there.
    let first = ours.forward_first(&inputs, &NoHooks).unwrap();
    assert_eq!(first.dims(), &[2, 1, 384]);
    let first_diff = max_abs_diff(&first, &hidden.narrow(1, 0, 1).unwrap());
    assert!(first_diff <= 1e-6, "forward_first differs by {first_diff}");

    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let reference_config: candle_transformers::models::bert::Config =
        serde_json::from_str(&text).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &device)
            .unwrap()
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &reference_config)
        .unwrap()
        .forward(&input_ids, &token_type_ids, Some(&attention_mask))
        .unwrap();

    // f32 rounding of products summed in another order (OpenBLAS picks its kernel by CPU),
    // relative to the largest hidden value (5.7): measured 1.2e-5 absolute on an AMD EPYC with
    // OpenBLAS, under 1e-5 elsewhere.
    let scale = max_abs_diff(&reference, &reference.zeros_like().unwrap());
    let diff = max_abs_diff(&hidden, &reference);
    assert!(
        diff <= 4e-6 * scale,
        "max abs diff {diff} > 4e-6 x {scale} (largest hidden value)"
    );
}
