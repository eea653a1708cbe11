//! Frozen projection weights kept quantized in GGML blocks (QLoRA-style training on a
//! quantized base): the weight lives as blocks of 8- or 4-bit integers with a scale each, and
//! every product dequantizes it a block of rows at a time (see `ops::quantized_linear`).
use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How a base's frozen projections are kept: `[model] quantize` in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantization {
    /// 8-bit integers, one f16 scale per 32 (8.5 bits a weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's 4-bit k-quant: super-blocks of 256 with 6-bit sub-block scales and mins
    /// (4.5 bits a weight). A weight whose rows are not a multiple of 256 wide takes q5_0
    /// (5.5 bits, blocks of 32), as llama.cpp's quantizer does.
    #[serde(rename = "q4_k")]
    Q4K,
}

impl Quantization {
    pub const NAMES: [&'static str; 2] = ["q8_0", "q4_k"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The block format for a weight whose rows are `width` wide, `None` when no block of
    /// this family divides them (the weight then stays unquantized).
    pub fn format_for(self, width: usize) -> Option<GgmlDType> {
        let candidates: &[GgmlDType] = match self {
            Self::Q8_0 => &[GgmlDType::Q8_0],
            Self::Q4K => &[GgmlDType::Q4K, GgmlDType::Q5_0],
        };
        candidates
            .iter()
            .copied()
            .find(|f| width > 0 && width.is_multiple_of(f.block_size()))
    }

    /// Bytes a weight of `[out, width]` takes in this family (its dense size in `dense` bytes
    /// a value when no block fits), for memory estimates.
    pub fn bytes(self, out: usize, width: usize, dense: usize) -> usize {
        match self.format_for(width) {
            Some(f) => out * width / f.block_size() * f.type_size(),
            None => out * width * dense,
        }
    }
}

impl std::str::FromStr for Quantization {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "q8_0" => Ok(Self::Q8_0),
            "q4_k" => Ok(Self::Q4K),
            other => Err(Error::InvalidConfig(format!(
                "quantization `{other}`: expected one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The name llama.cpp gives a block format.
pub fn format_name(format: GgmlDType) -> String {
    match format {
        GgmlDType::Q2K => "q2_k".into(),
        GgmlDType::Q3K => "q3_k".into(),
        GgmlDType::Q4K => "q4_k".into(),
        GgmlDType::Q5K => "q5_k".into(),
        GgmlDType::Q6K => "q6_k".into(),
        GgmlDType::Q8K => "q8_k".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A frozen weight `[out, in]` as GGML blocks, each row a whole number of blocks, on the
/// device it was quantized onto.
#[derive(Clone)]
pub struct QuantizedWeight {
    blocks: Arc<QTensor>,
    /// The dtype a dequantized weight takes, the activations' (the base's) dtype.
    dtype: DType,
}

impl QuantizedWeight {
    /// `weight` `[out, in]` (on any device, any float dtype) in the `family` format that fits
    /// its rows, onto `device`; `None` when no block divides its rows. Dequantized, it is
    /// used in `dtype`.
    pub fn quantize(
        weight: &Tensor,
        family: Quantization,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>> {
        let (out, width) = weight.dims2()?;
        let source = weight.to_device(&Device::Cpu)?;
        Self::quantize_rows((out, width), family, dtype, device, &mut |rows| {
            Ok(source
                .narrow(0, rows.start, rows.len())?
                .to_dtype(DType::F32)?)
        })
    }

    /// Rows of a weight `[out, width]` at a time (f32 blocks of about 4 MiB, which `rows_of`
    /// makes), in the `family` format that fits its rows, onto `device`; `None` when no block
    /// divides its rows. The weight is never held whole in f32: a 65024 x 4096 head would be
    /// 1 GiB of it beside the model.
    pub fn quantize_rows(
        (out, width): (usize, usize),
        family: Quantization,
        dtype: DType,
        device: &Device,
        rows_of: &mut dyn FnMut(std::ops::Range<usize>) -> Result<Tensor>,
    ) -> Result<Option<Self>> {
        let Some(format) = family.format_for(width) else {
            return Ok(None);
        };
        let step = Self::rows_at_a_time(width);
        let mut bytes = Vec::with_capacity(out * width / format.block_size() * format.type_size());
        for start in (0..out).step_by(step) {
            let rows = rows_of(start..(start + step).min(out))?;
            bytes.extend_from_slice(&QTensor::quantize(&rows, format)?.data()?);
        }
        let blocks = candle_core::quantized::ggml_file::qtensor_from_ggml(
            format,
            &bytes,
            vec![out, width],
            device,
        )?;
        Ok(Some(Self {
            blocks: Arc::new(blocks),
            dtype,
        }))
    }

    /// Rows of a `width`-wide weight that [`QuantizedWeight::quantize_rows`] takes at a time:
    /// about 2^20 values.
    pub fn rows_at_a_time(width: usize) -> usize {
        ((1 << 20) / width.max(1)).max(1)
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = self.blocks.shape().dims();
        (dims[0], dims[1])
    }

    pub fn format(&self) -> GgmlDType {
        self.blocks.dtype()
    }

    /// The dtype it is used in: the model's activations'.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.blocks.device()
    }

    /// Bytes its blocks take.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// The whole weight dequantized, in its dtype.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        self.blocks
            .dequantize(&self.blocks.device())?
            .to_dtype(self.dtype)
    }

    /// Rows `rows` dequantized to f32, row-major (`rows.len() * in` values). CPU only.
    pub(crate) fn rows_f32(&self, rows: std::ops::Range<usize>) -> candle_core::Result<Vec<f32>> {
        let (out, width) = self.dims();
        if rows.end > out {
            candle_core::bail!("quantized weight: rows {rows:?} of {out}");
        }
        let format = self.format();
        let row_bytes = width / format.block_size() * format.type_size();
        let data = self.blocks.data()?;
        let part = &data[rows.start * row_bytes..rows.end * row_bytes];
        let blocks = format.from_data(std::borrow::Cow::Borrowed(part));
        match blocks.dequantize(rows.len() * width)? {
            candle_core::CpuStorage::F32(values) => Ok(values),
            _ => candle_core::bail!("quantized weight: its blocks did not dequantize to f32"),
        }
    }
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedWeight({:?} {:?})", self.format(), self.dims())
    }
}
