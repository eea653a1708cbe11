//! The key/value cache of generation.
use candle_core::Tensor;

/// Keys and values of the positions already seen, for generation one token at a time.
#[derive(Default)]
pub struct KvCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    /// Position id the next token gets.
    pub(super) next_position: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing has been run through it yet.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}
