//! The pre-norm causal decoder that the Llama family (Llama, Mistral, Qwen2, SmolLM2) and
//! ChatGLM2/3 share: RMSNorm, rotary positions, grouped-query attention, a SwiGLU feed-forward.
//! [`crate::models::llama`] and [`crate::models::chatglm`] plan it from their configs;
//! what differs between them (fused projections, how much of a head rotates, whether key/value
//! prefixes count as past positions) is data here, not a second copy of the graph.
use super::cache::KvCache;
use super::plan::{BlockOf, DecoderSpec, GateUp, Plan, Qkv, SiteSpec};
use crate::error::{Error, Result};
use crate::hooks::{Hooks, ModelInfo, SiteInfo};
use crate::layers::{Linear, LinearSites, Param, RmsNorm};
use crate::ops;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};

pub type Block = BlockOf<Linear, RmsNorm>;

impl Block {
    /// Every tensor in checkpoint order: norms around the attention and feed-forward
    /// projections.
    fn params(&self) -> Vec<&Param> {
        let mut out: Vec<&Param> = self.input_norm.params().into_iter().collect();
        for l in self.qkv.items().into_iter().chain([&self.attention_out]) {
            out.extend(l.params());
        }
        out.extend(self.post_attention_norm.params());
        for l in self.gate_up.items().into_iter().chain([&self.down]) {
            out.extend(l.params());
        }
        out
    }
}

/// A batch of token ids, each `[batch, seq]`, padded on the right.
pub struct DecoderInputs {
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding; `None` when nothing is padded.
    pub attention_mask: Option<Tensor>,
}

/// What [`Decoder::embed`] hands every block.
struct Stage {
    /// The first block's input `[batch, prompt + seq, hidden]`.
    hidden: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_bias: Option<Tensor>,
    batch: usize,
    seq: usize,
    prompt_len: usize,
    prefix_len: usize,
    first_position: usize,
}

/// Adds `grad` (if any) to the gradient of `t` in `into`, detached.
fn add_grad(
    into: &mut candle_core::backprop::GradStore,
    t: &Tensor,
    grad: Option<&Tensor>,
) -> Result<()> {
    if let Some(grad) = grad {
        let sum = match into.remove(t) {
            Some(old) => (old + grad)?,
            None => grad.clone(),
        };
        into.insert(t, sum.detach());
    }
    Ok(())
}

/// Moves the gradients of `trainable` from `from` into `into`, and returns the gradient of the
/// segment's `input`, which the segment before receives.
fn keep_grads(
    into: &mut candle_core::backprop::GradStore,
    from: candle_core::backprop::GradStore,
    trainable: &[Tensor],
    input: &candle_core::Var,
) -> Result<Tensor> {
    for t in trainable {
        add_grad(into, t, from.get(t))?;
    }
    from.get(input.as_tensor())
        .map(Tensor::detach)
        .ok_or_else(|| Error::InvalidConfig("no gradient reached a block's input".into()))
}

/// A causal decoder with its language-model head.
pub struct Decoder {
    spec: DecoderSpec,
    embed: Param,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    /// `None`: the head is the input embedding table (tied embeddings).
    lm_head: Option<Linear>,
    /// The checkpoint's config.json, written back when a merged or fully trained model is saved.
    config_json: serde_json::Value,
    /// Rotary cosines and sines of positions `0..n` on the model's device, kept across steps
    /// (see [`Decoder::rope_tables`]).
    rope: std::sync::Mutex<Option<(Tensor, Tensor)>>,
}

impl Decoder {
    pub fn new(
        spec: DecoderSpec,
        embed: Param,
        blocks: Vec<Block>,
        final_norm: RmsNorm,
        lm_head: Option<Linear>,
        config_json: serde_json::Value,
    ) -> Result<Self> {
        if spec.num_heads == 0
            || spec.num_kv_heads == 0
            || !spec.num_heads.is_multiple_of(spec.num_kv_heads)
        {
            return Err(Error::InvalidConfig(format!(
                "{} attention heads cannot share {} key/value heads",
                spec.num_heads, spec.num_kv_heads
            )));
        }
        if spec.rope.rotary_dims > spec.head_dim || !spec.rope.rotary_dims.is_multiple_of(2) {
            return Err(Error::InvalidConfig(format!(
                "{} rotary features in a head of {}",
                spec.rope.rotary_dims, spec.head_dim
            )));
        }
        Ok(Self {
            spec,
            embed,
            blocks,
            final_norm,
            lm_head,
            config_json,
            rope: std::sync::Mutex::new(None),
        })
    }

    /// Loads the tensors `plan` names into a decoder; `config_json` is written back on save.
    pub fn from_plan(
        plan: &Plan,
        weights: &Weights,
        config_json: serde_json::Value,
    ) -> Result<Self> {
        let spec = &plan.spec;
        let h = spec.hidden_size;
        let eps = spec.rms_norm_eps;
        let linear = |s: &SiteSpec| {
            Linear::load(
                weights,
                &s.name,
                s.in_features,
                s.out_features,
                s.bias,
                s.layer,
            )
        };
        let norm = |name: &str| RmsNorm::load(weights, name, h, eps);
        let mut blocks = Vec::with_capacity(plan.blocks.len());
        for b in &plan.blocks {
            blocks.push(Block {
                input_norm: norm(&b.input_norm)?,
                qkv: b.qkv.try_map(linear)?,
                attention_out: linear(&b.attention_out)?,
                post_attention_norm: norm(&b.post_attention_norm)?,
                gate_up: b.gate_up.try_map(linear)?,
                down: linear(&b.down)?,
            });
        }
        Self::new(
            spec.clone(),
            Param::load(weights, &plan.embed, &[spec.vocab_size, h])?,
            blocks,
            norm(&plan.final_norm)?,
            plan.lm_head.as_ref().map(linear).transpose()?,
            config_json,
        )
    }

    /// The projection weights kept quantized, by checkpoint key.
    pub fn quantized(&self) -> Vec<(&str, &crate::quant::QuantizedWeight)> {
        self.linears().filter_map(Linear::quantized).collect()
    }

    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    pub fn config_json(&self) -> &serde_json::Value {
        &self.config_json
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            model_type: self.spec.model_type.clone(),
            hidden_size: self.spec.hidden_size,
            num_layers: self.spec.num_layers,
            num_heads: self.spec.num_heads,
            num_kv_heads: self.spec.num_kv_heads,
            head_dim: self.spec.head_dim,
            vocab_size: self.spec.vocab_size,
            word_embeddings: self.embed.key().to_string(),
        }
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(Block::projections)
            .chain(self.lm_head.as_ref())
    }

    pub fn sites(&self) -> Vec<SiteInfo> {
        self.linears().map(Linear::info).collect()
    }

    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(Block::projections_mut)
            .chain(self.lm_head.as_mut())
            .find(|l| l.name() == name)
    }

    /// Every base tensor under its checkpoint key, in checkpoint order.
    pub fn params(&self) -> Vec<&Param> {
        let mut out = vec![&self.embed];
        out.extend(self.blocks.iter().flat_map(Block::params));
        out.extend(self.final_norm.params());
        out.extend(self.lm_head.iter().flat_map(|l| l.params()));
        out
    }

    /// `(key, tensor)` of every base tensor.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params()
            .into_iter()
            .map(|p| (p.key().to_string(), p.value().clone()))
            .collect()
    }

    pub fn dtype(&self) -> DType {
        self.embed.value().dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed.value().device()
    }

    /// Final hidden states `[batch, seq, hidden]` of the input tokens (virtual prompt tokens
    /// are attended to but not returned). With a cache, the tokens continue what it holds and
    /// their keys and values are added to it.
    pub fn forward(
        &self,
        inputs: &DecoderInputs,
        hooks: &dyn Hooks,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let stage = self.embed(inputs, hooks, cache.as_deref())?;
        let mut hidden = stage.hidden.clone();
        for index in 0..self.blocks.len() {
            let past_kv = cache.as_ref().and_then(|c| c.layers.get(index)).cloned();
            let (out, kv) = self.layer(index, &stage, &hidden, past_kv, hooks)?;
            hidden = out;
            if let Some(c) = cache.as_deref_mut() {
                if index < c.layers.len() {
                    c.layers[index] = kv;
                } else {
                    c.layers.push(kv);
                }
            }
        }
        if let Some(c) = cache {
            c.next_position = stage.first_position + stage.prompt_len + stage.seq;
        }
        self.finish(&stage, &hidden, hooks)
    }

    /// `loss_of(final hidden states)` and its gradients for the tensors `trainable`, with each
    /// block recomputed in the backward pass (gradient checkpointing): the forward pass records
    /// no graph and keeps only each block's input `[batch, seq, hidden]`; the backward rebuilds
    /// one block's graph at a time, from the last, and carries the gradient of its input to the
    /// block before. The gradients are those of an ordinary backward up to the order of the
    /// additions (a test compares them for every method, with dropout on).
    ///
    /// `dropout` is the method's generator of random draws ([`crate::init::Dropout`]): each
    /// recomputation draws the masks its forward drew, as PyTorch's `checkpoint` restores the
    /// RNG state, and the generator is left where the forward left it.
    pub fn checkpointed_grads(
        &self,
        inputs: &DecoderInputs,
        hooks: &dyn Hooks,
        dropout: Option<&crate::init::Dropout>,
        trainable: &[Tensor],
        loss_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let position = || dropout.map(|d| d.position()).transpose();
        let rewind = |to: Option<u128>| match (dropout, to) {
            (Some(d), Some(to)) => d.rewind(to),
            _ => Ok(()),
        };
        let at_embed = position()?;
        let stage = ops::without_grad(|| self.embed(inputs, hooks, None))?;
        let mut block_inputs = vec![stage.hidden.clone()];
        let mut at_block = Vec::with_capacity(self.blocks.len());
        for index in 0..self.blocks.len() {
            at_block.push(position()?);
            let last = &block_inputs[index];
            let out = ops::without_grad(|| self.layer(index, &stage, last, None, hooks))?.0;
            block_inputs.push(out);
        }
        let mut grads = candle_core::backprop::GradStore::default();
        // The head: the final norm and whatever `loss_of` runs, from the last block's output.
        let last = block_inputs.pop().unwrap_or_else(|| stage.hidden.clone());
        let top = candle_core::Var::from_tensor(&last)?;
        let loss = loss_of(&self.finish(&stage, top.as_tensor(), hooks)?)?;
        let after_forward = position()?;
        let mut upstream = keep_grads(&mut grads, loss.backward()?, trainable, &top)?;
        for index in (0..self.blocks.len()).rev() {
            let input = candle_core::Var::from_tensor(&block_inputs[index])?;
            block_inputs.truncate(index);
            rewind(at_block[index])?;
            let out = self.layer(index, &stage, input.as_tensor(), None, hooks)?.0;
            let surrogate = (out * &upstream)?.sum_all()?;
            upstream = keep_grads(&mut grads, surrogate.backward()?, trainable, &input)?;
        }
        // The embeddings, with any virtual tokens: trained by prompt methods and full
        // fine-tuning.
        rewind(at_embed)?;
        let embedded = self.embed(inputs, hooks, None)?.hidden;
        if embedded.track_op() {
            let surrogate = (embedded * upstream)?.sum_all()?;
            let from = surrogate.backward()?;
            for t in trainable {
                add_grad(&mut grads, t, from.get(t))?;
            }
        }
        rewind(after_forward)?;
        Ok((loss, grads))
    }

    /// The input of the first block: the embedded tokens after any virtual tokens, and what
    /// every block needs besides (rotary tables, key bias, prefix length).
    fn embed(
        &self,
        inputs: &DecoderInputs,
        hooks: &dyn Hooks,
        cache: Option<&KvCache>,
    ) -> Result<Stage> {
        let (b, s) = inputs.input_ids.dims2()?;
        let table = self.embed.resolve(hooks)?;
        let dtype = table.dtype();
        let device = table.device().clone();
        let fresh = cache.is_none_or(|c| c.is_empty());
        let mut hidden = table
            .index_select(&inputs.input_ids.flatten_all()?, 0)?
            .reshape((b, s, ()))?;
        // Virtual tokens and key/value prefixes belong to the start of a sequence only.
        let prompt = if fresh { hooks.prompt(b)? } else { None };
        let prompt_len = match &prompt {
            Some(p) => p.dim(1)?,
            None => 0,
        };
        if let Some(p) = prompt {
            hidden = Tensor::cat(&[&p.to_dtype(dtype)?, &hidden], 1)?;
        }
        let prefix_len = if fresh { hooks.kv_prefix_len() } else { 0 };
        let t = prompt_len + s;
        let past = match cache.and_then(|c| c.layers.first()) {
            Some((keys, _)) => keys.dim(1)?,
            None => 0,
        };
        let first_position = match cache {
            Some(c) if !fresh => c.next_position,
            _ if self.spec.prefix_shifts_positions => prefix_len,
            _ => 0,
        };
        if first_position + t > self.spec.max_positions {
            return Err(Error::InvalidConfig(format!(
                "positions up to {} exceed the model's {}",
                first_position + t,
                self.spec.max_positions
            )));
        }
        let (cos, sin) = self.rope_tables(first_position, t, dtype, &device)?;
        // One additive bias per key: past and prefix keys and virtual tokens are always seen.
        let key_bias = match &inputs.attention_mask {
            Some(mask) => {
                let seen = past + prefix_len + prompt_len;
                let mask = mask.to_dtype(DType::F32)?;
                let mask = if seen > 0 {
                    Tensor::cat(&[&Tensor::ones((b, seen), DType::F32, &device)?, &mask], 1)?
                } else {
                    mask
                };
                Some(ops::additive_mask(&mask, dtype)?)
            }
            None => None,
        };
        Ok(Stage {
            hidden,
            cos,
            sin,
            key_bias,
            batch: b,
            seq: s,
            prompt_len,
            prefix_len,
            first_position,
        })
    }

    /// Block `index` on `hidden`, with the method's key/value prefix of that layer and the
    /// cached keys and values `past`; returns its output and its keys and values.
    fn layer(
        &self,
        index: usize,
        stage: &Stage,
        hidden: &Tensor,
        past: Option<(Tensor, Tensor)>,
        hooks: &dyn Hooks,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let prefix = if stage.prefix_len > 0 {
            hooks.kv_prefix(index, stage.batch)?
        } else {
            None
        };
        self.block_forward(
            &self.blocks[index],
            hidden,
            &stage.cos,
            &stage.sin,
            prefix,
            past,
            stage.key_bias.as_ref(),
            hooks,
        )
    }

    /// The final norm of the last block's output, without the virtual tokens.
    fn finish(&self, stage: &Stage, hidden: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let hidden = self.final_norm.forward(hidden, hooks)?;
        if stage.prompt_len > 0 {
            Ok(hidden.narrow(1, stage.prompt_len, stage.seq)?)
        } else {
            Ok(hidden)
        }
    }

    /// Next-token logits `[.., vocab]` of final hidden states `[.., hidden]`.
    pub fn lm_head(&self, hidden: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(hidden, hooks),
            None => Ok(ops::linear(hidden, &self.embed.resolve(hooks)?, None)?),
        }
    }

    /// Writes a Hugging Face model folder (config.json, model.safetensors) of the model as
    /// `hooks` resolve its tensors: full fine-tuning's trained ones, or the frozen base.
    pub fn save(&self, dir: &std::path::Path, hooks: &dyn Hooks) -> Result<()> {
        self.save_with(dir, hooks, Vec::new(), &self.config_json)
    }

    /// [`Decoder::save`] with `extra` tensors (a task head) and another config.json.
    pub fn save_with(
        &self,
        dir: &std::path::Path,
        hooks: &dyn Hooks,
        extra: Vec<(String, Tensor)>,
        config_json: &serde_json::Value,
    ) -> Result<()> {
        let mut tensors = extra;
        tensors.extend(self.resolved_tensors(hooks, "saved in a full model")?);
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        crate::formats::safetensors::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
        crate::formats::safetensors::save_json(config_json, &dir.join("config.json"))
    }

    /// `(key, tensor)` of every base tensor as `hooks` resolve it, for writing the whole
    /// model (`what` says how, for the refusal when a projection is kept quantized).
    pub fn resolved_tensors(
        &self,
        hooks: &dyn Hooks,
        what: &'static str,
    ) -> Result<Vec<(String, Tensor)>> {
        if let Some((key, blocks)) = self.quantized().first() {
            return Err(Error::Quantized {
                key: key.to_string(),
                format: crate::quant::format_name(blocks.format()),
                what,
            });
        }
        self.params()
            .into_iter()
            .map(|p| Ok((p.key().to_string(), p.resolve(hooks)?.detach())))
            .collect()
    }

    /// Cosines and sines `[t, rotary_dims / 2]` of positions `first..first + t`: views of
    /// tables kept on the device, made again (for twice the positions, up to the model's
    /// limit) only when a step needs a later position or another dtype, so that steps upload
    /// nothing.
    fn rope_tables(
        &self,
        first: usize,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let end = first + t;
        let mut kept = self
            .rope
            .lock()
            .map_err(|_| Error::InvalidConfig("the rotary tables' lock is poisoned".into()))?;
        let fits = |(cos, _): &(Tensor, Tensor)| {
            cos.dtype() == dtype && cos.device().same_device(device) && cos.dims()[0] >= end
        };
        if !kept.as_ref().is_some_and(fits) {
            let positions = end
                .next_power_of_two()
                .min(self.spec.max_positions)
                .max(end);
            *kept = Some(self.rope_tables_of(positions, dtype, device)?);
        }
        let (cos, sin) = kept
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig("no rotary tables".into()))?;
        Ok((cos.narrow(0, first, t)?, sin.narrow(0, first, t)?))
    }

    /// Cosines and sines `[positions, rotary_dims / 2]` of positions `0..positions`, computed
    /// in f32 as transformers does, so that angles agree to the last bit with the references.
    fn rope_tables_of(
        &self,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let rope = &self.spec.rope;
        let half = rope.rotary_dims / 2;
        let inv_freq: Vec<f32> = rope
            .inv_freq()
            .into_iter()
            .map(|f| rope.llama3.map_or(f, |scaling| scaling.apply(f)))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for position in 0..positions {
            for f in &inv_freq {
                let angle = position as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        prefix: Option<(Tensor, Tensor)>,
        past: Option<(Tensor, Tensor)>,
        key_bias: Option<&Tensor>,
        hooks: &dyn Hooks,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let spec = &self.spec;
        let (b, t, _) = x.dims3()?;
        let d = spec.head_dim;
        let (q_width, kv_width) = (spec.num_heads * d, spec.num_kv_heads * d);
        let normed = block.input_norm.forward(x, hooks)?;
        let (q, k, v) = match &block.qkv {
            Qkv::Separate { q, k, v } => (
                q.forward(&normed, hooks)?,
                k.forward(&normed, hooks)?,
                v.forward(&normed, hooks)?,
            ),
            Qkv::Fused(qkv) => {
                let all = qkv.forward(&normed, hooks)?;
                (
                    all.narrow(2, 0, q_width)?,
                    all.narrow(2, q_width, kv_width)?,
                    all.narrow(2, q_width + kv_width, kv_width)?,
                )
            }
        };
        let rotate = |x: Tensor, heads: usize| -> Result<Tensor> {
            Ok(ops::rope(
                &x.reshape((b, t, heads, d))?,
                cos,
                sin,
                spec.rope.interleaved,
            )?
            .reshape((b, t, heads * d))?)
        };
        let q = rotate(q, spec.num_heads)?;
        let mut k = rotate(k, spec.num_kv_heads)?;
        let mut v = v.contiguous()?;
        if let Some((pk, pv)) = prefix {
            // Prefixes come as [b, prefix, kv_heads, head_dim], already in rotated key space.
            let flat = |p: Tensor| -> Result<Tensor> {
                let (pb, pt, ph, pd) = p.dims4()?;
                if (pb, ph, pd) != (b, spec.num_kv_heads, d) {
                    return Err(Error::InvalidConfig(format!(
                        "a key/value prefix of shape {:?}, expected [{b}, _, {}, {d}]",
                        p.dims(),
                        spec.num_kv_heads
                    )));
                }
                Ok(p.to_dtype(x.dtype())?.reshape((pb, pt, ph * pd))?)
            };
            k = Tensor::cat(&[&flat(pk)?, &k], 1)?;
            v = Tensor::cat(&[&flat(pv)?, &v], 1)?;
        }
        if let Some((pk, pv)) = past {
            k = Tensor::cat(&[&pk, &k], 1)?;
            v = Tensor::cat(&[&pv, &v], 1)?;
        }
        let context = ops::attention(
            &q,
            &k,
            &v,
            &ops::AttentionSpec {
                heads: spec.num_heads,
                kv_heads: spec.num_kv_heads,
                causal: true,
                key_bias,
            },
        )?;
        let x = (x + block.attention_out.forward(&context, hooks)?)?;
        let normed = block.post_attention_norm.forward(&x, hooks)?;
        let inner = match &block.gate_up {
            GateUp::Separate { gate, up } => {
                ops::swiglu(&gate.forward(&normed, hooks)?, &up.forward(&normed, hooks)?)?
            }
            GateUp::Fused(gate_up) => {
                let both = gate_up.forward(&normed, hooks)?;
                let n = spec.intermediate_size;
                ops::swiglu(&both.narrow(2, 0, n)?, &both.narrow(2, n, n)?)?
            }
        };
        let out = (x + block.down.forward(&inner, hooks)?)?;
        Ok((out, (k, v)))
    }
}

impl LinearSites for Decoder {
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Decoder::linear_mut(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny random Llama (2 rotary pairs a head, 64 positions).
    fn tiny() -> Decoder {
        let json = serde_json::json!({
            "vocab_size": 11, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
        });
        let config: crate::models::llama::Config = serde_json::from_value(json.clone()).unwrap();
        let plan = crate::models::llama::plan(&config).unwrap();
        let path = std::path::Path::new("tiny");
        let weights =
            crate::formats::random::weights(&plan, 0.02, 1, DType::F32, &Device::Cpu, None, path)
                .unwrap();
        Decoder::from_plan(&plan, &weights, json).unwrap()
    }

    /// The kept tables' views equal tables made for exactly the positions asked, bit for bit,
    /// as the tables grow (up to the model's 64 positions) and when the dtype changes.
    #[test]
    fn kept_rotary_tables_give_the_positions_asked() {
        let model = tiny();
        let values = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        for (first, t, dtype) in [
            (0, 3, DType::F32),
            (5, 40, DType::F32),
            (2, 7, DType::F32),
            (60, 4, DType::BF16),
        ] {
            let (cos, sin) = model.rope_tables(first, t, dtype, &Device::Cpu).unwrap();
            let (all_cos, all_sin) = model
                .rope_tables_of(first + t, dtype, &Device::Cpu)
                .unwrap();
            assert_eq!(cos.dtype(), dtype);
            assert_eq!(values(&cos), values(&all_cos.narrow(0, first, t).unwrap()));
            assert_eq!(values(&sin), values(&all_sin.narrow(0, first, t).unwrap()));
        }
        let kept = model.rope.lock().unwrap();
        assert_eq!(kept.as_ref().unwrap().0.dims(), [64, 2]);
    }
}
